"""Claim 10: the hand-derived BatchNorm backward equals autograd's."""

import torch

from steadygrad.lab.base import Claim, ClaimResult, Context, Table, fmt, verdict
from steadygrad.norm import BatchNorm1d, BatchNorm2d

CLAIM = Claim(
    10,
    "bn-backward",
    "The hand-derived BatchNorm backward equals autograd's.",
    "Ioffe & Szegedy 2015, section 3; the seed material's derivation",
    "steadygrad's BatchNorm (backward: dx = (gamma inv_std / m)(m dy - sum dy - x_hat sum(dy x_hat)), dgamma = "
    "sum(dy x_hat), dbeta = sum dy) against torch's BatchNorm differentiated by autograd, in float64, on random "
    "inputs with non-trivial gamma and beta; and torch.autograd.gradcheck against finite differences.",
    "Gradients of x, gamma and beta agree to 1e-10; gradcheck passes.",
    "Backpropagating through a normalization is three chain-rule terms: directly through x_hat, through the "
    "mean and through the variance; the last two make the gradient sum to zero over the batch.",
)


def run(ctx: Context) -> ClaimResult:
    g = ctx.generator(10)
    rows, worst = [], 0.0
    for ours_cls, shape in ((BatchNorm1d, (64, 16)), (BatchNorm1d, (8, 16, 5)), (BatchNorm2d, (8, 16, 4, 4))):
        ours = ours_cls(16, dtype=torch.float64)
        theirs = getattr(torch.nn, ours_cls.__name__)(16, dtype=torch.float64)
        with torch.no_grad():
            theirs.weight.copy_(torch.rand(16, generator=g, dtype=torch.float64) + 0.5)
            theirs.bias.copy_(torch.randn(16, generator=g, dtype=torch.float64))
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1
        dy = torch.randn(shape, generator=g, dtype=torch.float64)
        grads = []
        for module in (ours, theirs):
            xi = x.clone().requires_grad_(True)
            module(xi).backward(dy)
            grads.append((xi.grad, module.weight.grad, module.bias.grad))
        diffs = [float((a - b).abs().max()) for a, b in zip(*grads, strict=True)]
        worst = max(worst, *diffs)
        rows.append([f"{ours_cls.__name__} {tuple(shape)}", *[fmt(d) for d in diffs]])
    small = BatchNorm1d(4, dtype=torch.float64)
    with torch.no_grad():
        small.weight.uniform_(0.5, 1.5, generator=g)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    passed = torch.autograd.gradcheck(lambda t: small(t), (x,))
    return ClaimResult(
        CLAIM,
        verdict(worst < 1e-10, passed),
        f"Largest difference from autograd over x, gamma and beta: {fmt(worst)} (float64); finite-difference "
        f"gradcheck {'passes' if passed else 'fails'}.",
        numbers={"max_abs_difference": worst, "gradcheck": passed},
        tables=[Table("max |hand-derived - autograd|", ["layer, input", "dL/dx", "dL/dgamma", "dL/dbeta"], rows)],
    )
