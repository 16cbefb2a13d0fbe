"""Claim 6: residual and dense skip connections raise the gradient reaching early layers and the input,
and make a 50-layer network trainable."""

import math
import statistics

import torch

from steadygrad.lab.base import Claim, ClaimResult, Context, Figure, Table, fmt, png, subplots, verdict
from steadygrad.measure import probe
from steadygrad.nets import NetSpec, build

CLAIM = Claim(
    6,
    "skip-connections",
    "Residual and dense skip connections raise the gradient reaching early layers and the input, and make a "
    "50-layer network trainable.",
    "The seed material's 4-layer experiment; He et al. 2016 (ResNet); Huang et al. 2017 (DenseNet)",
    "(a) The seed's 4-layer sigmoid network (10 inputs, width 32): the gradient norm with respect to the input "
    "without skips, with residual and with dense connections, averaged over seeds. (b) 50-layer sigmoid MLPs "
    "trained on digits: plain, residual (branch scale 1/sqrt(50)) and dense.",
    "(a) Both skips raise the input gradient several-fold. (b) The plain net stays near chance; both skip nets learn.",
    "A skip gives the gradient a path around the layers that multiply it down: dL/dx = dL/dy (I + dF/dx) for a "
    "residual block, so it cannot vanish through the identity term.",
)

SKIPS = ("none", "residual", "dense")


def run(ctx: Context) -> ClaimResult:
    seeds = ctx.seeds(30, 8)
    input_grads = {}
    for skip in SKIPS:
        norms = []
        for seed in seeds:
            spec = NetSpec(
                depth=4,
                width=32,
                in_features=10,
                out_features=1,
                activation="sigmoid",
                init="glorot_uniform",
                skip=skip,
            )
            net = build(spec, ctx.generator(600 + seed))
            x = torch.randn(32, 10, generator=ctx.generator(700 + seed))
            norms.append(probe(net, x).input_grad_norm)
        input_grads[skip] = statistics.mean(norms)
    epochs = ctx.size(3, 1)
    accuracy, early = {}, {}
    for skip in SKIPS:
        spec = NetSpec(
            depth=ctx.size(50, 30),
            width=64,
            in_features=64,
            activation="sigmoid",
            init="glorot_normal",
            skip=skip,
            residual_scale=ctx.size(50, 30) ** -0.5 if skip == "residual" else 1.0,
        )
        net = build(spec, ctx.generator(60))
        report = probe(net, ctx.digits.x_train[:256], ctx.digits.y_train[:256])
        early[skip] = report.records[0].grad_norm
        accuracy[skip] = ctx.train(net, epochs=epochs, lr=1e-3, optimizer="adam").final.get("test_accuracy", 0.0)
    figure, axes = subplots(2)
    axes[0].bar(SKIPS, [input_grads[s] for s in SKIPS], color=["gray", "tab:blue", "tab:green"])
    axes[0].set_yscale("log")
    axes[0].set_title("4-layer net: ||dL/dx|| (mean over seeds)")
    axes[1].bar(SKIPS, [accuracy[s] for s in SKIPS], color=["gray", "tab:blue", "tab:green"])
    axes[1].axhline(0.1, color="red", lw=0.8, ls="--", label="chance")
    axes[1].set_title(f"{ctx.size(50, 30)}-layer sigmoid MLP: held-out accuracy")
    axes[1].legend(fontsize=8)
    raises = input_grads["residual"] > 3 * input_grads["none"] and input_grads["dense"] > 3 * input_grads["none"]
    trainable = min(accuracy["residual"], accuracy["dense"]) > accuracy["none"] + 0.3
    return ClaimResult(
        CLAIM,
        verdict(raises, trainable),
        f"Input gradient of the 4-layer net (mean of {len(seeds)} seeds): none {fmt(input_grads['none'])}, residual "
        f"{fmt(input_grads['residual'])}, dense {fmt(input_grads['dense'])}. The deep sigmoid net reaches "
        f"{accuracy['none']:.2f} plain, {accuracy['residual']:.2f} residual, {accuracy['dense']:.2f} dense.",
        numbers={"input_grad": input_grads, "accuracy": accuracy, "first_layer_grad": early},
        tables=[
            Table(
                "Skip connections",
                ["skip", "4-layer ||dL/dx||", "deep net: first-layer gradient at init", "deep net: held-out accuracy"],
                [[s, fmt(input_grads[s]), fmt(early[s]), f"{accuracy[s]:.3f}"] for s in SKIPS],
            )
        ],
        figures=[Figure("Skips open a path for the gradient", png(figure))],
        notes="" if not math.isnan(accuracy["none"]) else "The plain network diverged.",
    )
