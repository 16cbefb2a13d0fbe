"""Effective depth through reuse: the along-time rule for any module called several times in one forward."""

from __future__ import annotations

import math

from steadygrad.diagnose._core import EXPLODING_OVER_TIME, Finding, Fix, vanishing_in_time
from steadygrad.measure.records import FlowReport, LayerRecord

REUSED_CALLS = 3  # a weight layer called this many times in one forward is a recurrence (or shared depth)


def reused(report: FlowReport) -> list[Finding]:
    """Effective depth through reuse: a weight layer called T >= ``REUSED_CALLS`` times in one forward (a
    recurrence written by hand, ``h = cell(h, x_t)`` in a Python loop, or weights shared across depth) makes the
    gradient pass through it T times, as an ``nn.RNN`` does along time (Bengio et al. 1994). Its records, one per
    call, give the along-time ratio ||dL/dy_1|| / ||dL/dy_T|| whatever the code looks like; the thresholds are
    ``recurrent_findings``' (``EXPLODING_OVER_TIME``; ``vanishing_in_time``). Only modules with weights count:
    an activation module reused by every layer (``self.act``, torchvision's ``self.relu``) is depth, not time.
    The layers of one recurrence (its input and state projections) share one finding."""
    calls: dict[str, list[LayerRecord]] = {}
    for record in report.records:
        calls.setdefault(record.name, []).append(record)
    ratios: dict[str, tuple[float, int]] = {}
    for name, records in calls.items():
        records = sorted(records, key=lambda r: r.call)
        if len(records) < REUSED_CALLS or not math.isfinite(records[0].weight_var):
            continue
        # a call whose output gradient is exactly zero is structural, not decay: a gate on h_0 = 0 (r * h in a
        # GRU) passes nothing back. The ratio is read from the first call the gradient reaches.
        flowing = [r for r in records if math.isfinite(r.grad_norm) and r.grad_norm > 0]
        if len(flowing) >= REUSED_CALLS:
            ratios[name] = (flowing[0].grad_norm / flowing[-1].grad_norm, len(flowing))
    findings = []
    for kind, bad, words, fixes in (
        (
            "exploding_over_time",
            lambda ratio, steps: ratio > EXPLODING_OVER_TIME,
            "{ratio:.2g}x the gradient at its last: it explodes through the recurrence",
            [Fix("clip", {"mode": "norm"}), Fix("reinit", {"scheme": "orthogonal"}), Fix("lower_lr", {"factor": 0.1})],
        ),
        (
            "vanishing_over_time",
            vanishing_in_time,
            "{ratio:.2g} of the gradient at its last: early steps barely learn",
            [Fix("reinit", {"scheme": "orthogonal"})],
        ),
    ):
        layers = {name: value for name, value in ratios.items() if bad(*value)}
        if not layers:
            continue
        worst = max(layers, key=lambda n: abs(math.log(layers[n][0])))
        ratio, steps = layers[worst]
        findings.append(
            Finding(
                kind,
                "warning",
                list(layers),
                {
                    "first_to_last_call_ratio": {name: value[0] for name, value in layers.items()},
                    "calls": {name: value[1] for name, value in layers.items()},
                    "per_call_factor": ratio ** (1 / (steps - 1)),
                },
                f"{worst} is called {steps} times in one forward (a recurrence or shared weights), and the gradient "
                f"at its first call is " + words.format(ratio=ratio) + ".",
                fixes,
            )
        )
    return findings
