"""Claim 1: He-uniform weights have variance 2/fan_in, Glorot-uniform 2/(fan_in + fan_out)."""

import numpy as np
import torch

from steadygrad.init import glorot_uniform_, he_uniform_
from steadygrad.lab.base import Claim, ClaimResult, Context, Figure, Table, fmt, png, subplots, verdict

CLAIM = Claim(
    1,
    "init-variance",
    "He-uniform weights have variance 2/fan_in and Glorot-uniform weights 2/(fan_in + fan_out).",
    "He et al. 2015 (eq. 10); Glorot & Bengio 2010 (eq. 16); the seed material's printed 0.1925",
    "Draw the seed's two Dense layers (10 -> 32, 100 -> 128) many times with each scheme and measure the "
    "weights' variance; the seed printed one draw of each.",
    "The mean measured variance matches the closed form within 2%, and one draw lands near it.",
    "Variance-scaling schemes set Var[w] from the fans so that each layer keeps the signal's variance; the limit "
    "of He-uniform is sqrt(6/fan_in), of Glorot-uniform sqrt(6/(fan_in + fan_out)).",
)

LAYERS = [(10, 32), (100, 128)]
SEED_PRINTED = {("he_uniform", 10, 32): 0.1925}


def run(ctx: Context) -> ClaimResult:
    generator = ctx.generator(1)
    draws = ctx.size(400, 50)
    rows, errors = [], []
    for name, fn, closed in (
        ("he_uniform", he_uniform_, lambda i, o: 2 / i),
        ("glorot_uniform", glorot_uniform_, lambda i, o: 2 / (i + o)),
    ):
        for fan_in, fan_out in LAYERS:
            variances = torch.stack([fn(torch.empty(fan_out, fan_in), generator=generator).var() for _ in range(draws)])
            expected = closed(fan_in, fan_out)
            mean = float(variances.mean())
            errors.append(abs(mean / expected - 1))
            printed = SEED_PRINTED.get((name, fan_in, fan_out))
            rows.append(
                [
                    name,
                    f"{fan_in} -> {fan_out}",
                    fmt(expected, 4),
                    fmt(float(variances[0]), 4),
                    fmt(mean, 4),
                    f"{100 * (mean / expected - 1):+.2f}%",
                    "-" if printed is None else str(printed),
                ]
            )
    figure, (ax,) = subplots()
    weights = he_uniform_(torch.empty(128, 100), generator=generator).flatten().numpy()
    bound = np.sqrt(6 / 100)
    ax.hist(weights, bins=40, density=True, alpha=0.7, label="He-uniform draw, 100 -> 128")
    ax.plot([-bound, -bound, bound, bound], [0, 1 / (2 * bound), 1 / (2 * bound), 0], "k--", label="U(-sqrt(6/100), +)")
    ax.set_xlabel("weight")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    holds = max(errors) < 0.02
    return ClaimResult(
        CLAIM,
        verdict(holds),
        f"Over {draws} draws the largest gap between measured and closed-form variance is {100 * max(errors):.2f}%; "
        f"He-uniform 10 -> 32 has variance 2/10 = 0.2 (the seed printed one draw, 0.1925).",
        numbers={"max_relative_error": max(errors), "draws": draws},
        tables=[
            Table(
                "Weight variance: closed form, one draw (as the seed printed), mean of many draws",
                ["scheme", "layer", "closed form", "one draw", "mean of draws", "error", "seed printed"],
                rows,
            )
        ],
        figures=[Figure("He-uniform weights fill U(-b, b) with b = sqrt(6/fan_in)", png(figure))],
    )
