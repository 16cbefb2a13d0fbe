"""Claim 15: in an RNN the effective depth is layers times time steps."""

import itertools
import statistics

import torch
from torch import nn

from steadygrad.init import init_model
from steadygrad.lab.base import Claim, ClaimResult, Context, Figure, Table, fmt, png, subplots, verdict

CLAIM = Claim(
    15,
    "rnn-effective-depth",
    "In an RNN the effective depth is layers times time steps: the gradient reaching early steps shrinks with "
    "sequence length.",
    "The seed material; Bengio, Simard, Frasconi 1994; Pascanu et al. 2013",
    "A 1-layer and a 2-layer tanh RNN (width 64, Glorot init) read random sequences; the loss sits on the last "
    "output. Measure ||dL/dx_1|| / ||dL/dx_T||, the gradient reaching the first input relative to the last, for "
    "several lengths T, averaged over seeds.",
    "The ratio falls with every added step, to below 1e-2 at the longest sequence.",
    "Unrolled in time, an RNN is a feed-forward net with layers x T layers that share weights, and its gradients "
    "vanish (or explode) through that depth like any other.",
)


def _ratio(layers: int, steps: int, ctx: Context, seed: int) -> float:
    torch.manual_seed(ctx.seed + seed)
    rnn = nn.RNN(8, 64, num_layers=layers, batch_first=True)
    init_model(rnn, "glorot_uniform", generator=ctx.generator(150 + seed))
    x = torch.randn(16, steps, 8, generator=ctx.generator(160 + seed), requires_grad=True)
    out = rnn(x)[0][:, -1]
    out.square().sum().backward()
    norms = x.grad.norm(dim=(0, 2))
    return float(norms[0] / norms[-1])


def run(ctx: Context) -> ClaimResult:
    lengths = ctx.size([5, 10, 20, 50, 100], [5, 10, 20, 40])
    seeds = ctx.seeds(5, 2)
    ratios = {}
    for layers in (1, 2):
        for steps in lengths:
            logs = [torch.tensor(_ratio(layers, steps, ctx, s)).log().item() for s in seeds]
            ratios[(layers, steps)] = float(torch.tensor(statistics.mean(logs)).exp())
    figure, (ax,) = subplots()
    for layers in (1, 2):
        ax.plot(lengths, [ratios[(layers, t)] for t in lengths], marker="o", label=f"{layers}-layer tanh RNN")
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("||dL/dx_1|| / ||dL/dx_T||")
    ax.legend()
    falls = all(ratios[(1, a)] > ratios[(1, b)] for a, b in itertools.pairwise(lengths))
    deeper = ratios[(2, lengths[-1])] <= ratios[(1, lengths[-1])]
    longest = lengths[-1]
    return ClaimResult(
        CLAIM,
        verdict(falls, ratios[(1, longest)] < 1e-2),
        f"The gradient reaching the first step is {fmt(ratios[(1, lengths[0])])} of the last step's at T = "
        f"{lengths[0]} and {fmt(ratios[(1, longest)])} at T = {longest} (1 layer); {fmt(ratios[(2, longest)])} with "
        "2 layers.",
        numbers={f"{layers}x{t}": ratios[(layers, t)] for layers in (1, 2) for t in lengths},
        tables=[
            Table(
                "||dL/dx_1|| / ||dL/dx_T||",
                ["layers", *[f"T = {t}" for t in lengths]],
                [[str(layers), *[fmt(ratios[(layers, t)]) for t in lengths]] for layers in (1, 2)],
            )
        ],
        figures=[Figure("The gradient fades along the sequence", png(figure))],
        notes=(
            "A second layer " + ("shrinks" if deeper else "does not shrink") + " the ratio further here: the shortest "
            "path from the first input to the output crosses T + L - 1 cells, so time steps, not layers, dominate "
            "the depth the gradient travels."
        ),
    )
