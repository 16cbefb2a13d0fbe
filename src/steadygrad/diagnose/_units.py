"""The rules on units and steps: non-finite values, saturated and dead units, the size of updates."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from steadygrad.diagnose._core import (
    DEAD_FRACTION,
    LOSS_AT_INIT,
    SATURATION_FRACTION,
    UPDATE_RATIO_HIGH,
    UPDATE_RATIO_LOW,
    Finding,
    Fix,
    finite,
    reinit_fix,
)
from steadygrad.measure.records import FlowReport


def nonfinite(history: Sequence[FlowReport]) -> list[Finding]:
    for report in history:
        broken = [r for r in report.records if r.nonfinite_act or r.nonfinite_grad]
        if broken:
            first = broken[0]
            where = "outputs" if first.nonfinite_act else "gradients"
            step = f" at step {report.step}" if report.step is not None else ""
            norms = finite(r.weight_grad_norm for r in history[0].records)
            threshold = statistics.median(norms) if norms else 1.0
            return [
                Finding(
                    "nonfinite",
                    "critical",
                    [r.label for r in broken],
                    {
                        "step": report.step,
                        "first_layer": first.label,
                        "nonfinite_act": first.nonfinite_act,
                        "nonfinite_grad": first.nonfinite_grad,
                    },
                    f"NaN or Inf appears{step} in the {where} of {first.label} first.",
                    [
                        Fix(
                            "clip",
                            {"mode": "norm", "threshold": round(threshold, 6)},
                            "clip at the median gradient norm seen",
                        ),
                        Fix("lower_lr", {"factor": 0.1}),
                        reinit_fix(report),
                    ],
                )
            ]
    return []


def _fractions(history: Sequence[FlowReport], attr: str, limit: float) -> dict[str, float]:
    """Layers whose ``attr`` exceeds ``limit`` in the latest report."""
    return {
        r.label: getattr(r, attr)
        for r in history[-1].records
        if math.isfinite(getattr(r, attr)) and getattr(r, attr) > limit
    }


def saturated(history: Sequence[FlowReport]) -> list[Finding]:
    layers = _fractions(history, "saturated", SATURATION_FRACTION)
    if not layers:
        return []
    worst = max(layers, key=layers.get)
    return [
        Finding(
            "saturated_activations",
            "warning",
            list(layers),
            {"saturated_fraction": layers},
            f"{len(layers)} layer(s) have most tanh/sigmoid units saturated, where their derivative is almost 0 "
            f"(worst: {worst}, {100 * layers[worst]:.0f}%).",
            [
                Fix("reinit", {"scheme": "glorot_normal"}),
                Fix("add_norm", {"kind": "batch", "position": "before"}),
                Fix("swap_activation", {"to": "relu"}),
            ],
        )
    ]


def dead(history: Sequence[FlowReport]) -> list[Finding]:
    layers = _fractions(history, "dead", DEAD_FRACTION)
    if not layers:
        return []
    worst = max(layers, key=layers.get)
    return [
        Finding(
            "dead_units",
            "warning",
            list(layers),
            {"dead_fraction": layers},
            f"{len(layers)} layer(s) have most rectifier units dead, never positive on the batch "
            f"(worst: {worst}, {100 * layers[worst]:.0f}%); dead units pass no gradient.",
            [
                Fix("reinit", {"scheme": "he_normal"}),
                Fix("lower_lr", {"factor": 0.1}),
                Fix("swap_activation", {"to": "leaky_relu"}),
            ],
        )
    ]


def update_ratio(history: Sequence[FlowReport]) -> list[Finding]:
    """The median update-to-weight ratio per layer against the range where training makes steady progress.

    The learning rate is one number for the whole model, so "too high" is a warning when the typical layer's
    ratio is above ``UPDATE_RATIO_HIGH`` (the median over layers). A few layers above it while the rest are not
    are layers whose weights are small for the step the optimizer takes (Adam moves every weight by about lr,
    so its ratio is about lr / rms(W)): a layer initialized small, like a policy head of gain 0.01, grows out of
    its init this way; that is said at info level. A layer whose ratio was infinite had all-zero weights before
    that update (a zero-initialized head, a residual block's zero norm gain): its weights are the sum of its own
    updates, its ratio about 1/t after t steps whatever the rate, and it is left out.

    A norm's gain starts at 1 and its shift at 0 and both stay near there in a healthy run: a small relative update
    of its gain (Adam's step is about lr per value, lr / 1 of the gain's scale, and a fine-tuning rate of 5e-5 moves
    it less) says nothing about the learning rate, so norms are not said to "barely change".
    """
    by_layer: dict[str, list[float]] = {}
    from_zero: set[str] = set()
    norms: set[str] = set()
    for report in history:
        for r in report.records:
            if "norm" in r.kind.lower():
                norms.add(r.label)
            if math.isfinite(r.update_ratio):
                by_layer.setdefault(r.label, []).append(r.update_ratio)
            elif r.update_ratio == math.inf:
                from_zero.add(r.label)
    medians = {name: statistics.median(values) for name, values in by_layer.items() if name not in from_zero}
    low = {n: v for n, v in medians.items() if v < UPDATE_RATIO_LOW and n not in norms}
    high = {n: v for n, v in medians.items() if v > UPDATE_RATIO_HIGH}
    findings = []
    if high:
        findings.append(_high_updates(high, statistics.median(medians.values())))
    if low:
        findings.append(
            Finding(
                "update_ratio_low",
                "info",
                list(low),
                {"median_update_ratio": low},
                f"{len(low)} layer(s) barely change (median ||dW||/||W|| down to {min(low.values()):.2g}): "
                "the learning "
                "rate may be too low, or their gradient vanishes.",
                [Fix("raise_lr", {"factor": 10.0})],
            )
        )
    return findings


def _high_updates(high: dict[str, float], typical: float) -> Finding:
    largest = max(high.values())
    evidence = {"median_update_ratio": high, "median_over_layers": typical}
    if typical > UPDATE_RATIO_HIGH:
        return Finding(
            "update_ratio_high",
            "warning",
            list(high),
            evidence,
            f"Updates are large relative to the weights in {len(high)} layer(s) (median ||dW||/||W|| up to "
            f"{largest:.2g}, {typical:.2g} for the typical layer; about 1e-3 is typical): the learning rate is "
            "likely too high.",
            [Fix("lower_lr", {"factor": 0.1})],
        )
    return Finding(
        "update_ratio_high",
        "info",
        list(high),
        evidence,
        f"{len(high)} layer(s) take steps large relative to their weights (median ||dW||/||W|| up to {largest:.2g}) "
        f"while the typical layer's is {typical:.2g}: their weights are small for the optimizer's step, as a layer "
        "initialized small is while it grows out of its init. If it persists, give them a lower learning rate.",
    )


def loss_at_init(history: Sequence[FlowReport]) -> list[Finding]:
    """The first report's cross-entropy is over ``LOSS_AT_INIT`` x ln(classes) (``FlowReport.chance_loss``, set
    by the probe): the outputs are confidently wrong before any training, which only oversized logits do."""
    report = history[0]
    chance = report.chance_loss
    if not (math.isfinite(chance) and math.isfinite(report.loss)) or report.loss <= LOSS_AT_INIT * chance:
        return []
    return [
        Finding(
            "loss_at_init_high",
            "warning",
            [],
            {"loss": report.loss, "chance_loss": chance, "times_chance": report.loss / chance},
            f"The loss is {report.loss:.3g}, {report.loss / chance:.2g}x the {chance:.3g} (ln of the number of "
            "classes) that uniform predictions score: the model is confidently wrong before training, so its "
            "logits are far too large (an init too large, or a missing scale before the output).",
            [reinit_fix(report)],  # the init is the cause: a lower learning rate only slows the way out,
        )
    ]
