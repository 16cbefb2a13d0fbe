"""Claim 16: greedy layer-wise autoencoder pre-training helps a deep sigmoid network over a naive init."""

import statistics

from steadygrad.init import pretrain_autoencoders
from steadygrad.lab.base import Claim, ClaimResult, Context, Figure, Table, png, subplots, verdict
from steadygrad.nets import NetSpec, build

CLAIM = Claim(
    16,
    "pretraining",
    "Greedy layer-wise autoencoder pre-training helps a deep sigmoid network over a naive initialization.",
    "Hinton & Salakhutdinov 2006; Bengio, Lamblin, Popovici, Larochelle 2007",
    "A 6 x 100 sigmoid MLP on digits, Glorot init: fine-tuned directly with SGD (momentum 0.9, lr 0.5), or first "
    "pre-trained layer by layer as autoencoders (steadygrad.init.pretrain_autoencoders) and then fine-tuned the "
    "same way; several seeds.",
    "The pre-trained networks reach a clearly higher held-out accuracy (by more than 10 points on average).",
    "Pre-training starts each layer where it already represents its input, so the fine-tuning gradient does not "
    "have to pass through saturated random sigmoid layers first. ReLU, good inits and normalization later made it "
    "unnecessary.",
)


def run(ctx: Context) -> ClaimResult:
    epochs = ctx.size(5, 2)
    accuracy: dict[str, list[float]] = {"naive": [], "pre-trained": []}
    reconstruction = []
    for seed in ctx.seeds(2, 1):
        for name in accuracy:
            net = build(
                NetSpec(depth=6, width=100, in_features=64, activation="sigmoid", init="glorot_normal"),
                ctx.generator(170 + seed),
            )
            if name == "pre-trained":
                reconstruction = pretrain_autoencoders(
                    net, ctx.digits.x_train, epochs=ctx.size(5, 2), generator=ctx.generator(180 + seed)
                )
            result = ctx.train(net, epochs=epochs, lr=0.5, optimizer="momentum", seed=seed)
            accuracy[name].append(result.final.get("test_accuracy", 0.0))
    mean = {k: statistics.mean(v) for k, v in accuracy.items()}
    figure, (ax,) = subplots()
    ax.bar(list(mean), list(mean.values()), color=["gray", "tab:blue"])
    ax.axhline(0.1, color="red", ls="--", lw=0.8, label="chance")
    ax.set_ylabel("held-out accuracy (mean over seeds)")
    ax.legend()
    helps = mean["pre-trained"] > mean["naive"] + 0.1
    return ClaimResult(
        CLAIM,
        verdict(helps),
        f"After {epochs} epochs of fine-tuning: {mean['naive']:.2f} without pre-training, {mean['pre-trained']:.2f} "
        "with it (mean over seeds).",
        numbers={"accuracy": accuracy, "relative_reconstruction_error": reconstruction},
        tables=[
            Table(
                "6 x 100 sigmoid MLP",
                ["start", "held-out accuracy per seed", "mean"],
                [[k, ", ".join(f"{a:.3f}" for a in v), f"{mean[k]:.3f}"] for k, v in accuracy.items()],
            ),
            Table(
                "Pre-training: reconstruction error per layer (relative to the input's variance)",
                ["layer", "error"],
                [[str(i + 1), f"{e:.3f}"] for i, e in enumerate(reconstruction)],
            ),
        ],
        figures=[Figure("Pre-training versus a direct start", png(figure))],
        notes="With Adam instead of SGD the naive network trains about as well: adaptive steps, like the inits and "
        "normalizations that came later, remove the need for pre-training.",
    )
