"""Rules over per-layer records: what is wrong, where, the numbers that show it, and what to try.

``diagnose(report_or_history, model=None, inputs=None)`` returns ``Finding``s. Each rule's thresholds are the
named constants of ``_core`` (re-exported here); rules that need the model's weights (symmetric units, a bias
before a BatchNorm, a weight layer's gain, a zero-initialized layer) or the inputs (centring) run when those are
given.

Every rule compares like with like: the depth rules read series of the same layer across depth
(``steadygrad.measure.series``), never one module against whatever module comes next, so an embedding, a norm,
a residual branch or an attention projection is not mistaken for a vanishing or exploding signal; a module called
several times in one forward (a recurrence written by hand) is read along its calls (``_reuse``). Exactly-zero
gradients are reported with their cause instead of being dropped.

Every rule that produces findings lives in this package. ``architecture_findings(model)`` reads only the model
(a deep plain stack, a tanh/sigmoid fed by an unnormalized layer) and is called separately (the doctor does).
``recurrent_findings(model, inputs, loss)`` (the gradient's change along time through an ``nn.RNN``/``LSTM``/
``GRU``, which the records see as one layer) runs inside ``diagnose`` when the model and a batch are given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from steadygrad.diagnose._attention import attention_collapse, attention_logit_growth
from steadygrad.diagnose._core import (
    ACTIONS,
    ATTENTION_COLLAPSE_FRACTION,
    ATTENTION_LOGIT_GROWTH,
    ATTENTION_LOGIT_LARGE,
    DEAD_FRACTION,
    DEEP_WITHOUT_SKIPS,
    EXPLODING_GROWTH,
    EXPLODING_OVER_TIME,
    EXPLODING_RATIO,
    LAYER_GAIN_HIGH,
    LAYER_GAIN_LOW,
    LOSS_AT_INIT,
    NO_FINDINGS,
    NONCENTERED_NOISE,
    NONCENTERED_RATIO,
    SATURATION_FRACTION,
    SEVERITIES,
    SIGNAL_CHANGE,
    STREAM_GRADIENT_RATIO,
    STREAM_GROWTH_PER_BLOCK,
    STREAM_GROWTH_TOTAL,
    STREAM_MIN_BLOCKS,
    SYMMETRY_TOLERANCE,
    UPDATE_RATIO_HIGH,
    UPDATE_RATIO_LOW,
    VANISHING_OVER_TIME,
    VANISHING_PER_STEP,
    VANISHING_RATIO,
    Finding,
    Fix,
    findings_text,
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
from steadygrad.diagnose._stream import explained_by_stream, stream_gradient_vanishing, stream_growth
from steadygrad.diagnose._units import dead, loss_at_init, nonfinite, saturated, update_ratio
from steadygrad.losses import projection_loss
from steadygrad.measure.records import FlowReport
from steadygrad.measure.series import Series, series, template

__all__ = [
    "ACTIONS",
    "ATTENTION_COLLAPSE_FRACTION",
    "ATTENTION_LOGIT_GROWTH",
    "ATTENTION_LOGIT_LARGE",
    "DEAD_FRACTION",
    "DEEP_WITHOUT_SKIPS",
    "EXPLODING_GROWTH",
    "EXPLODING_OVER_TIME",
    "EXPLODING_RATIO",
    "LAYER_GAIN_HIGH",
    "LAYER_GAIN_LOW",
    "LOSS_AT_INIT",
    "NONCENTERED_NOISE",
    "NONCENTERED_RATIO",
    "NO_FINDINGS",
    "REUSED_CALLS",
    "SATURATION_FRACTION",
    "SEVERITIES",
    "SIGNAL_CHANGE",
    "STREAM_GRADIENT_RATIO",
    "STREAM_GROWTH_PER_BLOCK",
    "STREAM_GROWTH_TOTAL",
    "STREAM_MIN_BLOCKS",
    "SYMMETRY_TOLERANCE",
    "UPDATE_RATIO_HIGH",
    "UPDATE_RATIO_LOW",
    "VANISHING_OVER_TIME",
    "VANISHING_PER_STEP",
    "VANISHING_RATIO",
    "Finding",
    "Fix",
    "Series",
    "architecture_findings",
    "diagnose",
    "findings_text",
    "layer_gain",
    "recurrent_findings",
    "series",
    "stream_gradient_vanishing",
    "stream_growth",
    "template",
]


def diagnose(
    report_or_history: FlowReport | Sequence[FlowReport],
    model: nn.Module | None = None,
    inputs: torch.Tensor | None = None,
    loss: Callable | None = None,
) -> list[Finding]:
    """Findings, most severe first, from one probe report or a monitor's history of reports.

    Args:
        report_or_history: a ``FlowReport`` or a sequence of them (``Monitor.history.reports``).
        model: enables the rules that read weights (symmetric units, bias before BatchNorm, each weight layer's
            gain, the cause of an exactly-zero gradient).
        inputs: the batch (a tensor, tuple or dict); enables the centring rule on its floating-point tensors and,
            with ``model``, for a model holding an ``nn.RNNBase`` on (N, T, F) inputs, the gradient along time.
        loss: ``output -> scalar`` for that along-time measurement (default: the probe's fixed random projection).

    The structural rule ``architecture_findings`` is not run here; call it with the model (the doctor does).
    """
    history = [report_or_history] if isinstance(report_or_history, FlowReport) else list(report_or_history)
    if not history or not all(isinstance(r, FlowReport) for r in history):
        raise TypeError("diagnose takes a FlowReport or a non-empty sequence of them (a Monitor's history).")
    findings = nonfinite(history)
    findings += vanishing(history[-1], model) + exploding(history, model) + zero_gradients(history[-1], model)
    findings += saturated(history) + dead(history) + signal(history, model) + update_ratio(history)
    findings += reused(history[-1]) + loss_at_init(history)
    findings += attention_collapse(history) + attention_logit_growth(history)
    findings += stream_growth(history[-1], model) + stream_gradient_vanishing(history[-1], model)
    if model is not None:
        findings += symmetric(model) + bias_before_norm(model)
    if inputs is not None:
        findings += noncentred(inputs)
    if model is not None and inputs is not None:
        # an nn.RNN/LSTM/GRU is one record, so its depth in time is measured apart, on a copy of the model: the
        # same finding a recurrence written as a Python loop gets from its per-call records (``reused``)
        findings += recurrent_findings(model, inputs, loss or projection_loss)
    findings = explained_by_stream(findings)
    return sorted(findings, key=lambda f: -SEVERITIES.index(f.severity))
