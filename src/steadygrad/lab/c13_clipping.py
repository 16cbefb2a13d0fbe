"""Claim 13: gradient clipping keeps an exploding network training where the unclipped one diverges."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from steadygrad import clip
from steadygrad.init import orthogonal_
from steadygrad.lab.base import Claim, ClaimResult, Context, Figure, Table, fmt, png, subplots, verdict
from steadygrad.nets import NetSpec, build

CLAIM = Claim(
    13,
    "clipping",
    "Gradient clipping keeps an exploding network training where the unclipped one diverges; adaptive clipping "
    "(AGC) does too.",
    "Pascanu, Mikolov, Bengio 2013; Brock et al. 2021 (AGC)",
    "(a) The adding problem (T = 50) with a 50-unit tanh RNN whose recurrent weights start in the exploding regime "
    "(orthogonal x 1.5), SGD at lr 0.05: unclipped, clipped by norm at 1, and AGC at 0.05. (b) A 10-layer ReLU MLP "
    "on digits at a learning rate of 1.0: unclipped, clipped by norm at 1, and AGC.",
    "The unclipped runs go non-finite; the clipped runs stay finite and learn: (a) to less than half their starting "
    "test MSE, (b) to well above chance (30%).",
    "In the exploding regime a single step can be thousands of times too large. Clipping by norm keeps its "
    "direction and caps its length; AGC caps each unit's step relative to that unit's weights.",
)

MODES = ("none", "norm", "agc")


def _adding(n: int, steps: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of (value, marker): the target is the sum of the two marked values (Hochreiter & Schmidhuber 1997)."""
    values = torch.rand(n, steps, generator=generator)
    marks = torch.zeros(n, steps)
    rows = torch.arange(n)
    marks[rows, torch.randint(0, steps // 2, (n,), generator=generator)] = 1
    marks[rows, torch.randint(steps // 2, steps, (n,), generator=generator)] = 1
    return torch.stack([values, marks], dim=2), (values * marks).sum(1, keepdim=True)


class _AddingRNN(nn.Module):
    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, 50, batch_first=True)
        self.out = nn.Linear(50, 1)
        orthogonal_(self.rnn.weight_hh_l0, gain=1.5, generator=generator)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


def _clip(model, mode):
    if mode == "norm":
        clip.clip_grad_norm_(model.parameters(), 1.0)
    elif mode == "agc":
        clip.adaptive_clip_grad_(model.parameters(), 0.05)


def _adding_run(ctx, mode, steps):
    torch.manual_seed(ctx.seed)
    model = _AddingRNN(ctx.generator(13))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data_gen = ctx.generator(14)
    test_x, test_y = _adding(1000, 50, ctx.generator(15))
    with torch.no_grad():
        initial = float(F.mse_loss(model(test_x), test_y))
    losses = []
    for _ in range(steps):
        x, y = _adding(32, 50, data_gen)
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        if not torch.isfinite(loss):
            return math.inf, losses, initial
        loss.backward()
        _clip(model, mode)
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        test = float(F.mse_loss(model(test_x), test_y))
    return (test if math.isfinite(test) else math.inf), losses, initial


def run(ctx: Context) -> ClaimResult:
    steps = ctx.size(400, 120)
    adding = {mode: _adding_run(ctx, mode, steps) for mode in MODES}
    mlp = {}
    for mode in MODES:
        net = build(NetSpec(depth=10, width=64, in_features=64), ctx.generator(16))
        clip_spec = {"none": None, "norm": "norm:1.0", "agc": "agc:0.05"}[mode]
        result = ctx.train(net, epochs=ctx.size(3, 1), lr=1.0, optimizer="sgd", clip=clip_spec, batch_size=32)
        mlp[mode] = (result.status, result.final.get("test_accuracy", 0.0))
    figure, (ax,) = subplots()
    for mode in MODES:
        losses = adding[mode][1]
        if losses:
            ax.plot(
                range(1, len(losses) + 1),
                losses,
                label=f"{mode} ({'diverged' if adding[mode][0] == math.inf else 'finite'})",
            )
    ax.axhline(1 / 6, color="gray", ls="--", lw=0.8, label="answer the mean (MSE 0.167)")
    ax.set_yscale("log")
    ax.set_xlabel("SGD step")
    ax.set_ylabel("training MSE")
    ax.set_title("Adding problem, T = 50, exploding tanh RNN")
    ax.legend(fontsize=8)
    diverges = adding["none"][0] == math.inf and mlp["none"][0] != "completed"
    clipped_learn = all(adding[m][0] < adding[m][2] / 2 for m in ("norm", "agc")) and all(
        mlp[m][0] == "completed" and mlp[m][1] > 0.3 for m in ("norm", "agc")
    )
    return ClaimResult(
        CLAIM,
        verdict(diverges, clipped_learn),
        f"Adding problem: unclipped {'diverged' if adding['none'][0] == math.inf else fmt(adding['none'][0])}; "
        f"clipped by norm {fmt(adding['norm'][0])} and AGC {fmt(adding['agc'][0])} test MSE. ReLU MLP at lr 1.0: "
        f"unclipped {mlp['none'][0].replace('_', ' ')}; norm-clipped {mlp['norm'][1]:.2f} and AGC {mlp['agc'][1]:.2f} "
        "accuracy.",
        numbers={
            "adding_test_mse": {m: adding[m][0] for m in MODES},
            "mlp": {m: {"status": mlp[m][0], "accuracy": mlp[m][1]} for m in MODES},
        },
        tables=[
            Table(
                "Clipping",
                ["clipping", "adding: test MSE at start", "after training", "MLP at lr 1.0: status", "MLP: accuracy"],
                [
                    [
                        m,
                        fmt(adding[m][2]),
                        "diverged" if adding[m][0] == math.inf else fmt(adding[m][0]),
                        mlp[m][0],
                        f"{mlp[m][1]:.3f}",
                    ]
                    for m in MODES
                ],
            )
        ],
        figures=[Figure("Training loss on the adding problem", png(figure))],
        notes="Solving the adding problem at T = 50 (MSE near 0) takes a vanilla RNN far longer than a demo runs; "
        "what clipping buys here is that training continues at all.",
    )
