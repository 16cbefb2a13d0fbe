"""Claim 4: saturating activations lose gradient with depth; ReLU with He init keeps it."""

import itertools
import statistics

import torch

from steadygrad.lab.base import Claim, ClaimResult, Context, Figure, Table, fmt, png, subplots, verdict
from steadygrad.measure import probe
from steadygrad.nets import NetSpec, build

CLAIM = Claim(
    4,
    "saturating-activations",
    "Saturating activations (sigmoid, tanh) lose gradient with depth; ReLU with He initialization keeps it.",
    "The seed material; Glorot & Bengio 2010; He et al. 2015",
    "Probe MLPs of width 128 at several depths: sigmoid and tanh with Glorot init, ReLU with He init; the ratio "
    "of the first layer's gradient norm to the last layer's, averaged (geometrically) over seeds.",
    "Sigmoid: the ratio falls exponentially with depth (below 1e-6 at the deepest); ReLU + He: within 10x of 1 "
    "at every depth.",
    "A sigmoid's derivative is at most 1/4, so each layer multiplies the gradient by about sigma_w^2/16 < 1; "
    "ReLU's derivative is 1 where active, and He's factor 2 makes up for the inactive half.",
)

SETUPS = [("sigmoid", "glorot_normal"), ("tanh", "glorot_normal"), ("relu", "he_normal")]


def run(ctx: Context) -> ClaimResult:
    depths = ctx.size([5, 10, 20, 40], [5, 10, 20])
    ratios: dict[tuple[str, int], float] = {}
    for act, init in SETUPS:
        for depth in depths:
            logs = []
            for seed in ctx.seeds(3, 1):
                x = torch.randn(128, 128, generator=ctx.generator(100 + seed))
                net = build(
                    NetSpec(depth=depth, width=128, in_features=128, activation=act, init=init),
                    ctx.generator(200 + seed),
                )
                logs.append(torch.tensor(probe(net, x).gradient_ratio).log().item())
            ratios[(act, depth)] = float(torch.tensor(statistics.mean(logs)).exp())
    figure, (ax,) = subplots()
    for act, _ in SETUPS:
        ax.plot(depths, [ratios[(act, d)] for d in depths], marker="o", label=act)
    ax.set_yscale("log")
    ax.set_xlabel("depth")
    ax.set_ylabel("gradient norm, first / last layer")
    ax.axhline(1, color="gray", lw=0.5)
    ax.legend()
    deepest = depths[-1]
    sigmoid_vanishes = ratios[("sigmoid", deepest)] < ctx.size(1e-6, 1e-3)
    monotone = all(ratios[("sigmoid", a)] > ratios[("sigmoid", b)] for a, b in itertools.pairwise(depths))
    relu_keeps = all(0.1 <= ratios[("relu", d)] <= 10 for d in depths)
    return ClaimResult(
        CLAIM,
        verdict(sigmoid_vanishes and monotone, relu_keeps),
        f"At depth {deepest}: sigmoid {fmt(ratios[('sigmoid', deepest)])}, tanh {fmt(ratios[('tanh', deepest)])}, "
        f"ReLU + He {fmt(ratios[('relu', deepest)])} (first-layer gradient over last-layer gradient).",
        numbers={f"{act}@{d}": ratios[(act, d)] for act, _ in SETUPS for d in depths},
        tables=[
            Table(
                "Gradient norm ratio, first / last layer",
                ["activation", *[f"depth {d}" for d in depths]],
                [[act, *[fmt(ratios[(act, d)]) for d in depths]] for act, _ in SETUPS],
            )
        ],
        figures=[Figure("The gradient reaching the first layer, relative to the last", png(figure))],
    )
