"""Claim 7: BatchNorm keeps activation statistics steady across depth, spreads gradient magnitudes
evenly, tolerates a much larger learning rate, and lets a deep sigmoid network train."""

import math

from steadygrad.lab.base import Claim, ClaimResult, Context, Figure, Table, fmt, png, subplots, verdict
from steadygrad.measure import probe
from steadygrad.nets import NetSpec, build

CLAIM = Claim(
    7,
    "batchnorm",
    "BatchNorm keeps activation statistics steady across depth, spreads gradient magnitudes evenly, tolerates a "
    "much larger learning rate, and lets a deep sigmoid network train.",
    "Ioffe & Szegedy 2015; the seed material's gradient-magnitude experiment",
    "(a) Probe a 20-layer sigmoid MLP (Glorot init) with and without BatchNorm before the activation. (b) Train a "
    "3 x 100 sigmoid MLP on digits with SGD at lr 0.1 and at lr 1.0, with and without BatchNorm.",
    "(a) With BN the activation std and the gradient norm vary far less across layers. (b) With BN the net trains "
    "at both rates and beats the plain net.",
    "Normalizing each layer's pre-activations to zero mean and unit variance keeps sigmoid units out of their flat "
    "tails whatever the weights do, so the gradient does not shrink layer after layer and larger steps are safe.",
)


def _spread(values) -> float:
    finite = [v for v in values if math.isfinite(v) and v > 0]
    return max(finite) / min(finite)


def run(ctx: Context) -> ClaimResult:
    x, y = ctx.digits.x_train[:256], ctx.digits.y_train[:256]
    probes = {}
    for norm in ("none", "batch"):
        net = build(
            NetSpec(depth=20, width=100, in_features=64, activation="sigmoid", init="glorot_normal", norm=norm),
            ctx.generator(7),
        )
        probes[norm] = probe(net, x, y)
    blocks = {k: [r for r in p.records if r.name.startswith("block")] for k, p in probes.items()}
    grad_spread = {k: _spread([r.grad_norm for r in b]) for k, b in blocks.items()}
    std_spread = {k: _spread([r.act_std for r in b]) for k, b in blocks.items()}
    epochs = ctx.size(6, 2)
    accuracy = {}
    curves = {}
    for norm in ("none", "batch"):
        for lr in (0.1, 1.0):
            net = build(
                NetSpec(depth=3, width=100, in_features=64, activation="sigmoid", init="glorot_normal", norm=norm),
                ctx.generator(8),
            )
            result = ctx.train(net, epochs=epochs, lr=lr, optimizer="sgd", batch_size=32)
            accuracy[(norm, lr)] = result.final.get("test_accuracy", 0.0)
            curves[(norm, lr)] = [e["test_accuracy"] for e in result.epochs]
    figure, axes = subplots(2)
    for norm, recs in blocks.items():
        axes[0].plot(range(1, len(recs) + 1), [r.grad_norm for r in recs], marker=".", label=f"norm={norm}")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("layer")
    axes[0].set_title("20-layer sigmoid MLP: ||dL/dy|| per layer")
    axes[0].legend(fontsize=8)
    for (norm, lr), curve in curves.items():
        axes[1].plot(range(1, len(curve) + 1), curve, marker="o", label=f"norm={norm}, lr={lr}")
    axes[1].set_xlabel("epoch")
    axes[1].set_title("3 x 100 sigmoid MLP: held-out accuracy")
    axes[1].legend(fontsize=8)
    steady = grad_spread["batch"] < grad_spread["none"] / 100 and std_spread["batch"] < std_spread["none"]
    trains = all(accuracy[("batch", lr)] > accuracy[("none", lr)] + 0.05 for lr in (0.1, 1.0))
    large_lr = accuracy[("batch", 1.0)] > 0.8
    return ClaimResult(
        CLAIM,
        verdict(steady, trains, large_lr),
        f"Across 20 sigmoid layers the gradient norm varies {fmt(grad_spread['none'])}x without BN and "
        f"{fmt(grad_spread['batch'])}x with it. The 3 x 100 net reaches {accuracy[('none', 0.1)]:.2f} / "
        f"{accuracy[('none', 1.0)]:.2f} without BN and {accuracy[('batch', 0.1)]:.2f} / {accuracy[('batch', 1.0)]:.2f} "
        "with it (lr 0.1 / 1.0).",
        numbers={
            "grad_spread": grad_spread,
            "std_spread": std_spread,
            "accuracy": {f"{n}@lr{lr}": a for (n, lr), a in accuracy.items()},
        },
        tables=[
            Table(
                "20-layer sigmoid MLP at initialization",
                ["norm", "gradient max/min over layers", "activation std max/min"],
                [[k, fmt(grad_spread[k]), fmt(std_spread[k])] for k in grad_spread],
            ),
            Table(
                f"3 x 100 sigmoid MLP after {epochs} epochs of SGD",
                ["norm", "lr 0.1", "lr 1.0"],
                [[n, f"{accuracy[(n, 0.1)]:.3f}", f"{accuracy[(n, 1.0)]:.3f}"] for n in ("none", "batch")],
            ),
        ],
        figures=[Figure("BatchNorm evens out the gradient and trains at a large learning rate", png(figure))],
    )
