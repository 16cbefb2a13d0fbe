"""Claim 11: folding BatchNorm into the preceding layer changes no output at inference."""

import time

import torch

from steadygrad.lab.base import Claim, ClaimResult, Context, Table, fmt, verdict
from steadygrad.nets import NetSpec, build
from steadygrad.norm import fold_batchnorm_report

CLAIM = Claim(
    11,
    "bn-folding",
    "Folding BatchNorm into the preceding layer changes no output at inference.",
    "The seed material (at inference BN is a fixed linear map); Jacob et al. 2018",
    "Train a conv net with BatchNorm on digits, fold every BN into the convolution or Linear before it "
    "(steadygrad.norm.fold_batchnorm), and compare eval-mode outputs and predictions on the held-out set.",
    "Outputs agree within 1e-5 relative, every prediction is the same, and no BatchNorm is left.",
    "In eval mode BN computes gamma (z - mu) / sqrt(var + eps) + beta with constants: an affine map that composes "
    "with the affine layer before it into one layer, W' = W s, b' = (b - mu) s + beta.",
)


def run(ctx: Context) -> ClaimResult:
    spec = NetSpec(kind="cnn", depth=3, width=16, in_features=1, image_size=8, norm="batch")
    net = build(spec, ctx.generator(11))
    ctx.train(net, epochs=ctx.size(2, 1), lr=2e-3)
    net.eval()
    result = fold_batchnorm_report(net)
    folded = result.model
    x = ctx.digits.inputs_for("cnn", ctx.digits.x_test)
    with torch.no_grad():
        start = time.perf_counter()
        reference = net(x)
        t_ref = time.perf_counter() - start
        start = time.perf_counter()
        out = folded(x)
        t_fold = time.perf_counter() - start
    gap = float((out - reference).abs().max() / reference.abs().max())
    same = float((out.argmax(1) == reference.argmax(1)).double().mean())
    left = sum("BatchNorm" in type(m).__name__ for m in folded.modules())
    return ClaimResult(
        CLAIM,
        verdict(gap < 1e-5, same == 1.0, left == 0),
        f"After folding, outputs differ by {fmt(gap)} of their scale, {100 * same:.0f}% of predictions are unchanged "
        f"and {left} BatchNorm layers remain.",
        numbers={"relative_gap": gap, "same_predictions": same, "batchnorms_left": left},
        tables=[
            Table(
                "Folded versus original (eval mode, held-out set)",
                ["measurement", "value"],
                [
                    ["max |difference| / max |output|", fmt(gap)],
                    ["same prediction", f"{100 * same:.1f}%"],
                    ["BatchNorm layers left", str(left)],
                    *[[f"not folded: {bn}", reason] for bn, reason in result.not_folded],
                    ["inference time, original / folded", f"{1e3 * t_ref:.2f} ms / {1e3 * t_fold:.2f} ms"],
                ],
            )
        ],
    )
