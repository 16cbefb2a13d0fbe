"""Claim 12: a bias right before BatchNorm gets zero gradient and can be dropped."""

import torch
import torch.nn.functional as F
from torch import nn

from steadygrad.lab.base import Claim, ClaimResult, Context, Table, fmt, verdict
from steadygrad.norm import BatchNorm1d

CLAIM = Claim(
    12,
    "bias-before-bn",
    "A bias right before BatchNorm gets zero gradient and can be dropped.",
    "Ioffe & Szegedy 2015, section 3.2; the seed material",
    "A Linear layer with a bias followed by BatchNorm, on digits: the gradient of the bias against the gradient of "
    "the weight; then the same network without the bias, trained side by side from the same weights.",
    "The bias's gradient is zero to rounding (below 1e-6 of the weight's) and the two networks stay identical "
    "through training.",
    "BN subtracts the batch mean, and a constant bias shifts that mean by exactly itself: it cancels. BN's own "
    "beta takes the bias's role.",
)


def _net(bias: bool) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 32, bias=bias), BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))


def run(ctx: Context) -> ClaimResult:
    torch.manual_seed(ctx.seed)
    with_bias, without = _net(True), _net(False)
    with torch.no_grad():
        with_bias[0].bias.normal_(0, 1, generator=ctx.generator(12))
    without.load_state_dict({k: v for k, v in with_bias.state_dict().items() if k != "0.bias"})
    x, y = ctx.digits.x_train, ctx.digits.y_train
    F.cross_entropy(with_bias(x[:128]), y[:128]).backward()
    ratio = float(with_bias[0].bias.grad.norm() / with_bias[0].weight.grad.norm())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (with_bias, without)]
    steps = ctx.size(100, 30)
    for step in range(steps):
        index = torch.randint(0, len(x), (64,), generator=ctx.generator(1000 + step))
        for model, optimizer in zip((with_bias, without), optimizers, strict=True):
            optimizer.zero_grad()
            F.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
    with torch.no_grad():
        gap = float((with_bias(ctx.digits.x_test) - without(ctx.digits.x_test)).abs().max())
    bias_moved = float(with_bias[0].bias.grad.abs().max())
    return ClaimResult(
        CLAIM,
        verdict(ratio < 1e-6, gap < 1e-3),
        f"The bias's gradient is {fmt(ratio)} of the weight's; after {steps} SGD steps the networks with and without "
        f"the bias differ by {fmt(gap)} in their outputs.",
        numbers={"bias_to_weight_gradient": ratio, "output_gap_after_training": gap, "last_bias_gradient": bias_moved},
        tables=[
            Table(
                "Linear + bias -> BatchNorm",
                ["measurement", "value"],
                [["||dL/db|| / ||dL/dW||", fmt(ratio)], [f"max output gap after {steps} steps", fmt(gap)]],
            )
        ],
    )
