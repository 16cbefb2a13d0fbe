"""Claim 2: too-small initialization makes signals vanish with depth; too-large makes them explode or saturate."""

import torch

from steadygrad.lab.base import Claim, ClaimResult, Context, Figure, Table, fmt, png, subplots, verdict
from steadygrad.measure import probe
from steadygrad.nets import NetSpec, build

CLAIM = Claim(
    2,
    "too-small-too-large",
    "Too-small initial weights make activations and gradients vanish with depth; too-large ones make them explode "
    "(ReLU) or saturate (tanh).",
    "The seed material; LeCun et al. 1998; Glorot & Bengio 2010",
    "Probe 20-layer, width-256 MLPs on a batch of 128: tanh and ReLU, each with N(0, 0.01^2) weights, with "
    "N(0, 1) weights and with a variance-preserving scheme.",
    "Small weights: last-layer activation std and first-layer gradient below 1e-3 of their starting size. Large: "
    "most tanh units saturated; ReLU activations growing over 1000x.",
    "The scale of the weights is multiplied into the signal once per layer: a factor of std * sqrt(fan_in) per "
    "layer compounds to vanishing or explosion in a deep net.",
)


def run(ctx: Context) -> ClaimResult:
    depth, width = ctx.size(20, 12), ctx.size(256, 64)
    x = torch.randn(128, width, generator=ctx.generator(2))
    reports = {}
    for act, good in (("tanh", "glorot_normal"), ("relu", "he_normal")):
        for init in ("small_normal", good, "large_normal"):
            net = build(
                NetSpec(depth=depth, width=width, in_features=width, activation=act, init=init), ctx.generator(3)
            )
            reports[(act, init)] = probe(net, x)
    rows = []
    for (act, init), r in reports.items():
        blocks = [rec for rec in r.records if rec.name.startswith("block")]
        sat = max((rec.saturated for rec in blocks if rec.saturated == rec.saturated), default=float("nan"))
        rows.append(
            [
                act,
                init,
                fmt(blocks[0].act_std),
                fmt(blocks[-1].act_std),
                fmt(r.gradient_ratio),
                "-" if sat != sat else f"{100 * sat:.0f}%",
            ]
        )
    figure, axes = subplots(2)
    for ax, act in zip(axes, ("tanh", "relu"), strict=True):
        for (a, init), r in reports.items():
            if a == act:
                blocks = [rec for rec in r.records if rec.name.startswith("block")]
                ax.plot(range(1, len(blocks) + 1), [rec.act_std for rec in blocks], marker=".", label=init)
        ax.set_yscale("log")
        ax.set_title(f"{act}: activation std per layer")
        ax.set_xlabel("layer")
        ax.legend(fontsize=8)

    def std_change(act, init):
        blocks = [rec for rec in reports[(act, init)].records if rec.name.startswith("block")]
        return blocks[-1].act_std / blocks[0].act_std

    small_vanishes = all(
        std_change(a, "small_normal") < 1e-3 and reports[(a, "small_normal")].gradient_ratio < 1e-3
        for a in ("tanh", "relu")
    )
    tanh_sat = min(rec.saturated for rec in reports[("tanh", "large_normal")].records if rec.name.startswith("block"))
    relu_growth = std_change("relu", "large_normal")
    large_fails = tanh_sat > 0.5 and relu_growth > 1e3
    return ClaimResult(
        CLAIM,
        verdict(small_vanishes, large_fails),
        f"N(0, 0.01^2): activation std falls {fmt(1 / std_change('tanh', 'small_normal'))}x (tanh) over "
        f"{depth} layers. "
        f"N(0, 1): at least {100 * tanh_sat:.0f}% of tanh units saturated in every layer; ReLU activations grow "
        f"{fmt(relu_growth)}x.",
        numbers={
            "small_std_change_tanh": std_change("tanh", "small_normal"),
            "small_std_change_relu": std_change("relu", "small_normal"),
            "large_tanh_min_saturation": tanh_sat,
            "large_relu_growth": relu_growth,
        },
        tables=[
            Table(
                f"{depth}-layer MLPs, width {width}",
                [
                    "activation",
                    "init",
                    "act std, layer 1",
                    f"act std, layer {depth}",
                    "gradient layer 1 / last",
                    "max saturated",
                ],
                rows,
            )
        ],
        figures=[
            Figure(
                "Activation std through depth",
                png(figure),
                "Variance-preserving schemes keep it level; the fixed scales do not.",
            )
        ],
    )
