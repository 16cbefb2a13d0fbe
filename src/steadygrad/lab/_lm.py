"""What the transformer claims share: a character-level language model on the standard library's sources,
trained for a few hundred steps with Adam, its losses and attention records kept."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache

import torch
import torch.nn.functional as F

from steadygrad.data import char_tokens, next_token_windows, python_source_text
from steadygrad.measure import Monitor


@cache
def corpus(chars: int = 120_000) -> torch.Tensor:
    """Token ids of the standard library's source text (cached for the run)."""
    return char_tokens(python_source_text(chars))[0]


def batch(
    tokens: torch.Tensor, size: int, length: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    return next_token_windows(tokens, size, length, generator)


def spec(ctx, **changes):
    """The claims' language model: 8 blocks of width 64 (quick: 4 of width 32), 4 heads, 32 characters."""
    from steadygrad.nets import NetSpec

    sizes = {"depth": ctx.size(8, 4), "width": ctx.size(64, 32), "heads": 4, "seq_len": 32, "vocab": 128}
    return NetSpec(kind="transformer", **{**sizes, **changes})


_RUNS: dict = {}


def trained(ctx, spec, lr: float, warmup: int = 0, log_every: int = 0) -> Run:
    """``train`` a freshly built ``spec`` for the context's steps (150, quick 50); runs shared between claims of one
    lab run (claims 20 and 21 both train the plain post-LN stack) are trained once."""
    from steadygrad.nets import build

    steps = ctx.size(150, 50)
    key = (spec, lr, warmup, log_every, steps, ctx.seed, ctx.quick)
    if key not in _RUNS:
        net = build(spec, ctx.generator(20))
        _RUNS[key] = train(net, steps, lr, warmup=warmup, generator=ctx.generator(21), log_every=log_every)
    return _RUNS[key]


def plot_losses(ax, runs: dict, title: str) -> None:
    for name, run in runs.items():
        ax.plot(range(1, len(run.losses) + 1), run.losses, label=name + (" (diverged)" if run.diverged else ""))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats / character)")
    ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
    ax.set_title(title)
    ax.legend(fontsize=8)


def show(run: Run) -> str:
    return "diverged" if run.diverged else f"{run.final:.3f}"


@dataclass
class Run:
    losses: list[float]
    diverged: bool
    entropy_min: list[float] = field(default_factory=list)  # lowest head's entropy over layers, per logged step
    max_logit: list[float] = field(default_factory=list)  # largest attention logit over layers, per logged step

    @property
    def final(self) -> float:
        """Mean loss over the last tenth of the steps (inf when the run diverged)."""
        if self.diverged:
            return math.inf
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail)


def train(net, steps: int, lr: float, *, warmup: int = 0, generator, batch_size: int = 16, log_every: int = 0) -> Run:
    """Adam (betas 0.9, 0.98, as Vaswani et al.) on next-character prediction, linear warmup over ``warmup``
    steps; a loss that is not finite, or above 3x the loss at chance, ends the run as diverged."""
    tokens = corpus()
    length = net.spec.seq_len
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: min(1.0, (t + 1) / warmup) if warmup else 1.0)
    chance = math.log(net.spec.vocab)
    run = Run([], False)
    monitor = Monitor(net, optimizer=optimizer, every=log_every) if log_every else None
    try:
        if monitor is not None:
            monitor.attach()
        for _ in range(steps):
            x, y = batch(tokens, batch_size, length, generator)
            loss = F.cross_entropy(net(x).flatten(0, 1), y.flatten())
            if monitor is not None:
                monitor.observe_loss(loss)
            value = float(loss.detach())
            run.losses.append(value)
            if not math.isfinite(value) or value > 3 * chance:
                run.diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    finally:
        if monitor is not None:
            monitor.detach()
    if monitor is not None:
        for report in monitor.history.reports:
            attention = [r for r in report.records if math.isfinite(r.attn_entropy)]
            run.entropy_min.append(min((r.attn_entropy_min for r in attention), default=math.nan))
            run.max_logit.append(max((r.attn_max_logit for r in attention), default=math.nan))
    return run


def stream_profile(net, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[list[torch.Tensor], list[float]]:
    """The residual stream x_0 (embeddings) .. x_L (after the last block) of a built transformer on one batch,
    detached, and the gradient norm ||dL/dx_l|| of the next-token loss at each (the net's gradients are cleared)."""
    streams: list[torch.Tensor] = []

    def keep(tensor: torch.Tensor) -> None:
        tensor.retain_grad()
        streams.append(tensor)

    hooks = [net.blocks[0].register_forward_pre_hook(lambda module, args: keep(args[0]))]
    hooks += [block.register_forward_hook(lambda module, args, out: keep(out)) for block in net.blocks]
    try:
        F.cross_entropy(net(tokens).flatten(0, 1), targets.flatten()).backward()
    finally:
        for hook in hooks:
            hook.remove()
    net.zero_grad(set_to_none=True)
    return [x.detach() for x in streams], [float(x.grad.norm()) for x in streams]


def _gains(branch, x: torch.Tensor, generator: torch.Generator) -> tuple[float, float]:
    """A branch's forward gain E[F(x)^2] / E[x^2] and backward gain E[(J^T u)^2] / E[u^2], u ~ N(0, 1)."""
    x = x.detach().requires_grad_(True)
    y = branch(x)
    u = torch.randn(y.shape, generator=generator)
    (back,) = torch.autograd.grad(y, x, u)
    forward = y.detach().square().mean() / x.detach().square().mean()
    return float(forward), float(back.square().mean() / u.square().mean())


def post_ln_gains(net, streams: list[torch.Tensor], generator: torch.Generator) -> tuple[list, list]:
    """Per block of a post-LN net, its attention and MLP sublayers' forward and backward gains
    (``theory.post_ln_gradient``), each measured on the input it sees: the block's input x_(l-1) for attention,
    norm1(x + attn(x)) for the MLP."""
    forward, backward = [], []
    for block, x in zip(net.blocks, streams, strict=False):
        with torch.no_grad():
            h = block.norm1(x + block.attn(x))
        (v1, g1), (v2, g2) = _gains(block.attn, x, generator), _gains(block.mlp, h, generator)
        forward.append([v1, v2])
        backward.append([g1, g2])
    return forward, backward


def branch_second_moment(block, x: torch.Tensor) -> float:
    """What a pre-LN block adds to the stream at x: E[attn(norm1(x))^2] + E[mlp(norm2(x'))^2]."""
    with torch.no_grad():
        a = block.attn(block.norm1(x))
        m = block.mlp(block.norm2(x + a))
        return float(a.square().mean() + m.square().mean())
