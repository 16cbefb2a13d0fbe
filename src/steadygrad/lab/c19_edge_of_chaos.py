"""Claim 19: the edge of chaos: a deep tanh network trains at the critical weight scale and not in the
ordered phase, and its gradient follows the mean-field prediction."""

import math

import torch

from steadygrad import theory
from steadygrad.init import mean_field_
from steadygrad.lab.base import Claim, ClaimResult, Context, Figure, Table, fmt, png, subplots, verdict
from steadygrad.measure import probe
from steadygrad.nets import NetSpec, build

CLAIM = Claim(
    19,
    "edge-of-chaos",
    "A deep tanh network trains when its depth is within a few times the depth scale xi_c: at the critical "
    "sigma_w^2 a 60-layer tanh MLP trains while in the ordered phase it does not, and the measured gradient ratio "
    "follows the mean-field prediction.",
    'Schoenholz, Gilmer, Ganguli, Sohl-Dickstein 2017, "Deep Information Propagation"; Poole et al. 2016',
    "60-layer, width-64 tanh MLPs with W ~ N(0, sigma_w^2/fan_in), b ~ N(0, 0.05) (steadygrad.init.mean_field_): "
    "at the critical sigma_w^2 (steadygrad.theory) and in the ordered phase (sigma_w^2 = 1); SGD on digits; "
    "gradient ratios at initialization next to steadygrad.theory's predictions.",
    "The critical net learns (accuracy above 40%) while the ordered one stays near chance, and each measured "
    "first/last gradient ratio is within a factor e^1 of the prediction.",
    "Mean-field theory predicts how far signals and gradients travel (xi_c layers) from sigma_w^2 and sigma_b^2 "
    "alone; at the critical point xi_c diverges, and networks far deeper than xi_c elsewhere cannot be trained.",
)

SIGMA_B2 = 0.05


def run(ctx: Context) -> ClaimResult:
    critical = theory.critical_sigma_w2(SIGMA_B2, "tanh")
    depth = 60
    epochs = ctx.size(6, 2)
    rows, ok_ratio, accuracy, curves = [], [], {}, {}
    for name, sigma_w2 in (("critical", critical), ("ordered", 1.0)):
        scales = theory.depth_scales(sigma_w2, SIGMA_B2, "tanh")
        net = build(NetSpec(depth=depth, width=64, in_features=64, activation="tanh"))
        mean_field_(net, sigma_w2, SIGMA_B2, ctx.generator(190))
        x = ctx.digits.x_train[:256]
        report = probe(net, x, ctx.digits.y_train[:256], layers="block??.linear")
        measured = report.records[0].grad_norm / report.records[-1].grad_norm
        predicted = theory.gradient_ratio(depth, sigma_w2, SIGMA_B2, "tanh", float(x.square().mean()))
        ok_ratio.append(abs(math.log(measured / predicted)) < 1)
        result = ctx.train(net, epochs=epochs, lr=0.01, optimizer="sgd", batch_size=32)
        accuracy[name] = result.final.get("test_accuracy", 0.0)
        curves[name] = [e["test_accuracy"] for e in result.epochs]
        rows.append(
            [
                name,
                f"{sigma_w2:.3f}",
                f"{scales.chi_1:.3f}",
                fmt(scales.xi_c),
                fmt(predicted),
                fmt(measured),
                f"{accuracy[name]:.3f}",
            ]
        )
    figure, (ax,) = subplots()
    grid = torch.linspace(0.5, 4.0, 36).tolist()
    ax.plot(grid, [min(theory.depth_scales(s, SIGMA_B2, "tanh").xi_c, 1e3) for s in grid], label="xi_c (theory)")
    ax.axhline(depth, color="gray", ls="--", lw=0.8, label=f"depth {depth}")
    ax.axvline(critical, color="tab:red", lw=0.8, label=f"critical sigma_w^2 = {critical:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("sigma_w^2 (sigma_b^2 = 0.05)")
    ax.set_ylabel("depth scale xi_c (layers)")
    ax.legend(fontsize=8)
    trains = accuracy["critical"] > 0.4 and accuracy["ordered"] < 0.2
    return ClaimResult(
        CLAIM,
        verdict(trains, all(ok_ratio)),
        f"At the critical sigma_w^2 = {critical:.3f} the 60-layer tanh net reaches {accuracy['critical']:.2f} "
        f"held-out accuracy; in the ordered phase (sigma_w^2 = 1, xi_c = {rows[1][3]} "
        f"layers) {accuracy['ordered']:.2f}. Gradient ratios: predicted {rows[0][4]} / {rows[1][4]}, measured "
        f"{rows[0][5]} / {rows[1][5]}.",
        numbers={"critical_sigma_w2": critical, "accuracy": accuracy, "ratio_within_e": ok_ratio},
        tables=[
            Table(
                "60-layer tanh MLP",
                ["phase", "sigma_w^2", "chi_1", "xi_c", "predicted ratio", "measured ratio", "accuracy"],
                rows,
            )
        ],
        figures=[
            Figure(
                "Depth scale xi_c against the weight scale",
                png(figure),
                "Networks train when their depth is within a few xi_c.",
            )
        ],
    )
