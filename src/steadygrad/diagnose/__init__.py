"""Rules over per-layer records: what is wrong, where, the numbers that show it, and what to try.

``diagnose(report_or_history, model=None, inputs=None)`` returns ``Finding``s. Each rule's thresholds are the
named constants of ``_core`` (re-exported here); rules that need the model's weights (symmetric units, a bias
before a BatchNorm, a weight layer's gain, a zero-initialized layer) or the inputs (centring) run when those are
given.

Every rule compares like with like: the depth rules read series of the same layer across depth (``_series``),
never one module against whatever module comes next, so an embedding, a norm, a residual branch or an attention
projection is not mistaken for a vanishing or exploding signal; a module called several times in one forward (a
recurrence written by hand) is read along its calls (``_reuse``). Exactly-zero gradients are reported with their
cause instead of being dropped.

Every rule that produces findings lives in this package. Two read only the model, not the records, and are
called separately (the doctor calls them; ``diagnose`` itself does not, so a Monitor's diagnosis is unchanged):
``architecture_findings(model)`` (a deep plain stack, a tanh/sigmoid fed by an unnormalized layer) and
``recurrent_findings(model, inputs, loss)`` (the gradient's change along time through a recurrent layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from steadygrad.diagnose._core import (
    ACTIONS,
    DEAD_FRACTION,
    DEEP_WITHOUT_SKIPS,
    EXPLODING_GROWTH,
    EXPLODING_OVER_TIME,
    EXPLODING_RATIO,
    LAYER_GAIN_HIGH,
    LAYER_GAIN_LOW,
    NONCENTERED_NOISE,
    NONCENTERED_RATIO,
    SATURATION_FRACTION,
    SEVERITIES,
    SIGNAL_CHANGE,
    SYMMETRY_TOLERANCE,
    UPDATE_RATIO_HIGH,
    UPDATE_RATIO_LOW,
    VANISHING_OVER_TIME,
    VANISHING_RATIO,
    Finding,
    Fix,
)
from steadygrad.diagnose._flow import exploding, layer_gain, signal, vanishing, zero_gradients
from steadygrad.diagnose._model import (
    architecture_findings,
    bias_before_norm,
    noncentred,
    recurrent_findings,
    symmetric,
)
from steadygrad.diagnose._reuse import REUSED_CALLS, reused
from steadygrad.diagnose._series import Series, series, template
from steadygrad.diagnose._units import dead, nonfinite, saturated, update_ratio
from steadygrad.measure.records import FlowReport

__all__ = [
    "ACTIONS",
    "DEAD_FRACTION",
    "DEEP_WITHOUT_SKIPS",
    "EXPLODING_GROWTH",
    "EXPLODING_OVER_TIME",
    "EXPLODING_RATIO",
    "LAYER_GAIN_HIGH",
    "LAYER_GAIN_LOW",
    "NONCENTERED_NOISE",
    "NONCENTERED_RATIO",
    "REUSED_CALLS",
    "SATURATION_FRACTION",
    "SEVERITIES",
    "SIGNAL_CHANGE",
    "SYMMETRY_TOLERANCE",
    "UPDATE_RATIO_HIGH",
    "UPDATE_RATIO_LOW",
    "VANISHING_OVER_TIME",
    "VANISHING_RATIO",
    "Finding",
    "Fix",
    "Series",
    "architecture_findings",
    "diagnose",
    "layer_gain",
    "recurrent_findings",
    "series",
    "template",
]


def diagnose(
    report_or_history: FlowReport | Sequence[FlowReport],
    model: nn.Module | None = None,
    inputs: torch.Tensor | None = None,
) -> list[Finding]:
    """Findings, most severe first, from one probe report or a monitor's history of reports.

    Args:
        report_or_history: a ``FlowReport`` or a sequence of them (``Monitor.history.reports``).
        model: enables the rules that read weights (symmetric units, bias before BatchNorm, each weight layer's
            gain, the cause of an exactly-zero gradient).
        inputs: the batch (a tensor, tuple or dict); enables the centring rule on its floating-point tensors.

    The structural rules ``architecture_findings`` and ``recurrent_findings`` are not run here; call them
    with the model (the doctor does).
    """
    history = [report_or_history] if isinstance(report_or_history, FlowReport) else list(report_or_history)
    if not history or not all(isinstance(r, FlowReport) for r in history):
        raise TypeError("diagnose takes a FlowReport or a non-empty sequence of them (a Monitor's history).")
    findings = nonfinite(history)
    findings += vanishing(history[-1], model) + exploding(history, model) + zero_gradients(history[-1], model)
    findings += saturated(history) + dead(history) + signal(history, model) + update_ratio(history)
    findings += reused(history[-1])
    if model is not None:
        findings += symmetric(model) + bias_before_norm(model)
    if inputs is not None:
        findings += noncentred(inputs)
    return sorted(findings, key=lambda f: -SEVERITIES.index(f.severity))
