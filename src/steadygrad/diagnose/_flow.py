"""The rules on how the gradient and the signal travel: vanishing, exploding, exactly-zero gradients, propagation.

Every comparison is between like things (``steadygrad.measure.series``): the same layer at the first and the last
depth, or a weight layer's own gain. A gradient that is exactly zero is not a ratio; it gets its own finding with
its cause.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence

import torch
from torch import nn

from steadygrad import _keras, kinds
from steadygrad.diagnose._core import (
    DEAD_FRACTION,
    EXPLODING_GROWTH,
    EXPLODING_RATIO,
    LAYER_GAIN_HIGH,
    LAYER_GAIN_LOW,
    SIGNAL_CHANGE,
    VANISHING_RATIO,
    Finding,
    Fix,
    finite,
    has_gradient,
    reinit_fix,
    saturating,
)
from steadygrad.measure.records import FlowReport, LayerRecord
from steadygrad.measure.series import Series, series

# -- what the model says about a record's module -----------------------------------------------------------


def _modules(model: nn.Module | None) -> dict[str, nn.Module]:
    if model is None:
        return {}
    if _keras.is_keras_layer(model):  # the records carry Keras' names (dense_1, block/dense_3)
        return dict(_keras.named_layers(model))
    named = dict(model.named_modules())
    named.setdefault(type(model).__name__, model)  # a model with no submodules is recorded under its class name
    return named


def _is_norm(record: LayerRecord, modules: dict[str, nn.Module]) -> bool:
    module = modules.get(record.name)
    if module is not None and kinds.norm_family(module) is not None:
        return True
    return "norm" in record.kind.lower()


def _is_embedding(record: LayerRecord, modules: dict[str, nn.Module]) -> bool:
    module = modules.get(record.name)
    return (module is not None and kinds.weight_family(module) == "embedding") or "Embedding" in record.kind


def output_start(report: FlowReport) -> int:
    """The execution index of the layer that computes the model's output: the last record of a layer with
    weights (a finite weight variance). It and whatever runs after it (a final ``nn.Tanh`` or ``nn.Softmax``
    module) are the output: their scale is the task's and the init's choice (a zero or 0.01-gain head), not
    something the signal did on its way up."""
    weighted = [r.index for r in report.records if math.isfinite(r.weight_var)]
    return max(weighted) if weighted else max((r.index for r in report.records), default=0)


def _fan_in(module: nn.Module, weight: torch.Tensor) -> int:
    """The inputs each output sums over: ``in_features``, the first dimension of a weight stored (in, out)
    (``kinds.weight_transposed``: Hugging Face's ``Conv1D``), a convolution's ``in_channels / groups * kernel``,
    else every dimension after the first."""
    if isinstance(getattr(module, "in_features", None), int):
        return module.in_features
    if kinds.weight_transposed(module):
        return weight.shape[0]
    return math.prod(weight.shape[1:])


def layer_gain(module: nn.Module) -> float | None:
    """sqrt(fan_in * E[W^2]): the factor by which a weight layer scales both the signal going up and the gradient
    going down (E||W^T g||^2 = fan_in * E[W^2] * ||g||^2 for weights independent of g). Variance-scaling inits set
    it near 1 (LeCun), sqrt(2) (He) or between (Glorot); None for layers it does not describe (transposed
    convolutions scale by their output fan)."""
    if _keras.is_keras_layer(module):  # a Dense or Conv layer's kernel, stored inputs-first
        found = _keras.kernel_and_fan_in(module)
        return None if found is None else math.sqrt(found[1] * float(found[0].detach().double().square().mean()))
    weight = getattr(module, "weight", None)
    transposed = getattr(module, "transposed", False)
    if not kinds.is_weight_layer(module, *kinds.AFFINE) or not isinstance(weight, torch.Tensor) or transposed:
        return None
    if weight.dim() < 2:
        return None
    return math.sqrt(_fan_in(module, weight) * float(weight.detach().double().square().mean()))


def _gains(report: FlowReport, modules: dict[str, nn.Module]) -> dict[str, float]:
    """The gain of each recorded weight layer whose output is not renormalized right after it, but the output's.

    A norm right after a layer makes the layer scale-invariant: its forward output is rescaled to unit variance,
    and its backward divides by the same standard deviation, undoing the weight's scale on the gradient too
    (Ioffe & Szegedy 2015; van Laarhoven 2017). A conv before a BatchNorm may be any size. The layer that
    computes the model's output is left out: a small output layer is a deliberate choice to start from
    near-uniform outputs (PPO's policy head, orthogonal with gain 0.01), and it scales every gradient below it
    alike, which is no change along depth. All-zero weights are a zero init, reported by ``zero_gradients``.
    """
    records = sorted(report.records, key=lambda r: r.index)
    output = output_start(report)
    gains = {}
    for record, after in itertools.pairwise([*records, None]):
        module = modules.get(record.name)
        hidden = after is not None and record.index < output
        gain = layer_gain(module) if module is not None and record.call == 1 and hidden else None
        if gain is None or gain == 0 or _is_norm(after, modules) or record.grad_norm == 0:
            # (a layer that gets exactly zero gradient passes none on, whatever its scale: zero_gradients says why)
            continue
        gains[record.label] = gain
    return gains


# -- vanishing and exploding -------------------------------------------------------------------------------


def _depth_ratios(report: FlowReport) -> list[tuple[Series, list[LayerRecord], float]]:
    """(series, its records with a gradient, first depth's gradient over the last depth's) per series."""
    out = []
    output = output_start(report)
    for s in series(report):
        # the output layer's gradient is the loss's, not something depth did: a head is not its hidden layers' peer
        flowing = [r for r in s.records if has_gradient(r) and r.index < output]
        if len(flowing) >= 2:
            out.append((s, flowing, flowing[0].grad_norm / flowing[-1].grad_norm))
    return out


def _gradient_fixes(report: FlowReport) -> list[Fix]:
    fixes = [reinit_fix(report), Fix("add_norm", {"kind": "batch"}), Fix("add_skips", {"kind": "residual"})]
    if saturating(report):
        fixes.append(Fix("swap_activation", {"to": "relu"}, "ReLU does not saturate for positive inputs"))
    return fixes


def vanishing(report: FlowReport, model: nn.Module | None = None) -> list[Finding]:
    """The gradient vanishes when the same layer gets far less of it at a shallower depth than at the last depth
    (each layer between multiplied it by a factor below 1), or when weight layers scale it down by over 100x
    each (an init far below 1/fan_in: no variance-scaling scheme does that at any width)."""
    # a residual stream's vanishing gradient is the post-LN rule's (``_stream``), with the transformer fixes
    weak_series = [
        (s, rs, ratio)
        for s, rs, ratio in _depth_ratios(report)
        if ratio < VANISHING_RATIO and not kinds.is_block(s.kind)
    ]
    small = {name: g for name, g in _gains(report, _modules(model)).items() if g < LAYER_GAIN_LOW}
    if not weak_series and not small:
        return []
    layers: list[str] = []
    evidence: dict = {}
    sentences = []
    if weak_series:
        _, flowing, ratio = min(weak_series, key=lambda item: item[2])
        last = flowing[-1].grad_norm
        weak = [r for _, rs, _ in weak_series for r in rs[:-1] if r.grad_norm / rs[-1].grad_norm < VANISHING_RATIO]
        per_depth = ratio ** (1 / (len(flowing) - 1))
        layers += [r.label for r in weak]
        evidence.update(
            first_to_last_ratio=ratio,
            per_layer_factor=per_depth,
            smallest_grad_norm=min(r.grad_norm for r in weak),
            series={s.label: ratio for s, _, ratio in weak_series},
        )
        sentences.append(
            f"Gradients vanish across depth: {flowing[0].label} gets {ratio:.2g} of the gradient that the layer in "
            f"its place gets at {flowing[-1].label} ({last:.2g}), about {per_depth:.2f}x per depth step; "
            f"{len(weak)} layer(s) receive almost none."
        )
    if small:
        layers += [name for name in small if name not in layers]
        evidence["layer_gain"] = small
        sentences.append(_gain_sentence("vanish", small))
    return [Finding("vanishing_gradients", "warning", layers, evidence, " ".join(sentences), _gradient_fixes(report))]


def _gain_sentence(verb: str, gains: dict[str, float]) -> str:
    return (
        f"Gradients {verb} through {len(gains)} weight layer(s) that scale it by about "
        f"{statistics.median(gains.values()):.2g}x each (sqrt(fan_in * E[W^2]); an init of variance about 1/fan_in "
        "keeps it near 1)."
    )


def _clip_fix(report: FlowReport) -> Fix:
    threshold = statistics.median(finite(r.weight_grad_norm for r in report.records) or [1.0])
    return Fix("clip", {"mode": "norm", "threshold": round(threshold, 6)})


def _exploding_across_depth(report: FlowReport, model: nn.Module | None) -> list[Finding]:
    """The mirror of ``vanishing``: the same layer gets over 1000x more gradient at a shallower depth, or weight
    layers scale it up by over 10x each (6x the largest gain a standard init uses, 5/3 for tanh)."""
    strong = [(s, rs, ratio) for s, rs, ratio in _depth_ratios(report) if ratio > EXPLODING_RATIO]
    large = {name: g for name, g in _gains(report, _modules(model)).items() if g > LAYER_GAIN_HIGH}
    if not strong and not large:
        return []
    layers: list[str] = []
    evidence: dict = {}
    sentences = []
    if strong:
        _, flowing, ratio = max(strong, key=lambda item: item[2])
        layers.append(flowing[0].label)
        evidence.update(first_to_last_ratio=ratio, series={s.label: ratio for s, _, ratio in strong})
        sentences.append(
            f"Gradients explode across depth: {ratio:.2g}x larger at {flowing[0].label} than at the layer in its "
            f"place at the last depth, {flowing[-1].label}."
        )
    if large:
        layers += [name for name in large if name not in layers]
        evidence["layer_gain"] = large
        sentences.append(_gain_sentence("explode", large))
    fixes = [_clip_fix(report), reinit_fix(report), Fix("add_norm", {"kind": "batch"})]
    return [Finding("exploding_gradients", "warning", layers, evidence, " ".join(sentences), fixes)]


def _exploding_over_steps(history: Sequence[FlowReport]) -> list[Finding]:
    if len(history) < 2:
        return []

    def total(rep):
        return math.sqrt(sum(v**2 for v in finite(r.weight_grad_norm for r in rep.records)))

    first, last = total(history[0]), total(history[-1])
    if not (first > 0 and last / first > EXPLODING_GROWTH):
        return []
    return [
        Finding(
            "exploding_gradients",
            "warning",
            [],
            {"growth_over_steps": last / first, "first_step": history[0].step, "last_step": history[-1].step},
            f"The gradient norm grew {last / first:.2g}x between steps {history[0].step} and {history[-1].step}.",
            [Fix("clip", {"mode": "norm", "threshold": round(first, 6)}), Fix("lower_lr", {"factor": 0.1})],
        )
    ]


def exploding(history: Sequence[FlowReport], model: nn.Module | None = None) -> list[Finding]:
    return _exploding_across_depth(history[-1], model) + _exploding_over_steps(history)


# -- exactly-zero gradients --------------------------------------------------------------------------------


def _all_zero_weight(module: nn.Module | None) -> bool:
    found = _keras.kernel_and_fan_in(module) if _keras.is_keras_layer(module) else None
    weight = found[0] if found is not None else getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.numel() > 0 and not bool(weight.detach().any())


def _blocker(records: list[LayerRecord], i: int) -> LayerRecord | None:
    """The first record after ``records[i]`` whose output got a gradient: in a chain, the layer that passed
    none of it back."""
    return next((r for r in records[i + 1 :] if has_gradient(r)), None)


def _zero_parameters(model: nn.Module | None) -> list[str]:
    """The model's all-zero parameters that are not biases (a zero bias blocks nothing): ReZero's and SkipInit's
    residual gates (``alpha = 0``), LoRA's B, a zero-initialized head; at step 0 each passes no gradient back."""
    if model is None:
        return []
    return [
        name
        for name, p in model.named_parameters()
        if kinds.parameter_role(name.rsplit(".", 1)[-1]) != "bias" and p.numel() and not bool(p.detach().any())
    ]


def _cause(blocker: LayerRecord | None, modules: dict[str, nn.Module]) -> str:
    if blocker is None:
        return "unknown"
    if math.isfinite(blocker.dead) and blocker.dead >= 1.0:
        return "dead"  # a rectifier whose every unit is off passes zero gradient for every sample
    if _all_zero_weight(modules.get(blocker.name)):
        return "zero_init"  # dL/dx = W^T dL/dy = 0 while W is all zero
    if blocker.act_min == 0 and blocker.act_max == 0 and not math.isfinite(blocker.weight_var):
        return "dead"  # an activation whose every output is exactly zero (a Hardswish below -3): nothing flows back
    if math.isfinite(blocker.saturated) and blocker.saturated >= 1.0:
        return "saturated"  # a sigmoid or hard gate stuck at 0 or 1 everywhere: its derivative rounds to zero
    return "unknown"


_ZERO_MESSAGES = {
    "zero_init": (
        "info",
        "{n} layer(s) get exactly zero gradient because {blockers} (downstream of them) {have} an all-zero weight: "
        "a deliberate zero init (a zero-initialized head, a residual block's last norm gain) passes no gradient "
        "back at step 0 (dL/dx = W^T dL/dy = 0). Expected: the zero layer's own gradient is not zero, and once "
        "its first update makes it non-zero the layers below it train.",
    ),
    "dead": (
        "warning",
        "{n} layer(s) get exactly zero gradient because every unit of {blockers} (downstream of them) is dead, "
        "never active on the batch (its output is zero): nothing flows back through a unit that is off, so they "
        "cannot learn.",
    ),
    "saturated": (
        "warning",
        "{n} layer(s) get exactly zero gradient because every unit of {blockers} (downstream of them) is saturated, "
        "stuck where its derivative is zero (a gate at 0 or 1): nothing flows back through it.",
    ),
    "unknown": (
        "warning",
        "{n} layer(s) get exactly zero gradient ({blockers}: the first layer after them that gets any): they will "
        "not learn. Look for a softmax saturated to one-hot (attention logits far too large: its derivative "
        "rounds to exactly zero), a detached path, a zero multiplier or a mask.",
    ),
}


def _names(blockers: list[str]) -> str:
    return ", ".join(blockers[:3]) + (f" and {len(blockers) - 3} more" if len(blockers) > 3 else "")


def zero_gradients(report: FlowReport, model: nn.Module | None = None) -> list[Finding]:
    """Which layers got exactly zero gradient and why, one finding per cause: a zero-initialized layer
    downstream (expected at step 0: info), a dead rectifier downstream (a problem), or a cause the records and
    the model do not show. The cause is read at the first layer after the zero run that gets a gradient: in a
    chain, the layer that passed none of it back."""
    records = sorted(report.records, key=lambda r: r.index)
    modules = _modules(model)
    # a module another call of which gets a gradient learns: one call's exact zero is structural (a gate on
    # h_0 = 0 in a recurrence written by hand, r * h in a GRU), not a blocked layer
    learning = {r.name for r in records if has_gradient(r)}
    zero_gates = _zero_parameters(model)
    by_cause: dict[str, dict[str, list[str]]] = {}
    for i, record in enumerate(records):
        if record.grad_norm == 0 and record.name not in learning:
            blocker = _blocker(records, i)
            name = blocker.label if blocker is not None else "the output"
            cause = _cause(blocker, modules)
            if cause == "unknown" and zero_gates:  # ReZero, SkipInit: a zero scalar gate multiplies the branch
                cause, name = "zero_init", _names(zero_gates)
            by_cause.setdefault(cause, {}).setdefault(name, []).append(record.label)
    findings = []
    for cause, blocked in by_cause.items():
        severity, text = _ZERO_MESSAGES[cause]
        layers = [label for labels in blocked.values() for label in labels]
        blockers = list(blocked)
        one = len(blockers) == 1 and ", " not in blockers[0]  # a list of zero gates is one key
        message = text.format(n=len(layers), blockers=_names(blockers), have="has" if one else "have")
        evidence = {"cause": cause, "blocked_by": {b: len(ls) for b, ls in blocked.items()}}
        findings.append(Finding("zero_gradients", severity, layers, evidence, message))
    return findings


# -- signal propagation ------------------------------------------------------------------------------------


def _propagating(s: Series, report: FlowReport, modules: dict[str, nn.Module]) -> list[LayerRecord]:
    """The records of ``s`` whose output std says something about propagation: not an embedding (a lookup
    whose scale is its init's, 0.02 by design in BERT and GPT-2), not a norm (std 1 by construction), not the
    model's output (its scale is the task's: a zero-initialized head outputs 0), and not a silent layer."""
    output = output_start(report)
    first = s.records[0]
    if _is_embedding(first, modules) or _is_norm(first, modules):
        return []
    return [r for r in s.records if r.index < output and math.isfinite(r.act_std) and r.act_std > 0]


def _dead_between(report: FlowReport, start: int, end: int) -> bool:
    """Whether a mostly dead rectifier lies between two depths: the signal after it is what few units (or the
    biases) pass, and ``dead_units`` already says so."""
    return any(start <= r.index <= end and math.isfinite(r.dead) and r.dead > DEAD_FRACTION for r in report.records)


def signal(history: Sequence[FlowReport], model: nn.Module | None = None) -> list[Finding]:
    """At the first logged step, the activation std of the same layer changes over 10x from its first depth to
    its last: the init does not preserve the signal's variance across depth."""
    report, modules = history[0], _modules(model)
    changes = []
    for s in series(report):
        rs = _propagating(s, report, modules)
        if len(rs) >= 2 and not _dead_between(report, rs[0].index, rs[-1].index):
            changes.append((rs[0], rs[-1], rs[-1].act_std / rs[0].act_std))
    out_of_range = [c for c in changes if not 1 / SIGNAL_CHANGE <= c[2] <= SIGNAL_CHANGE]
    if not out_of_range:
        return []
    first, last, change = max(out_of_range, key=lambda c: abs(math.log(c[2])))
    direction = "shrinks" if change < 1 else "grows"
    return [
        Finding(
            "poor_signal_propagation",
            "warning",
            [first.label, last.label],
            {"std_first": first.act_std, "std_last": last.act_std, "change": change},
            f"At the first logged step the activation std {direction} {change:.2g}x from {first.label} to the layer "
            f"in its place at depth {last.label}: the initialization does not preserve the signal's variance.",
            [reinit_fix(report), Fix("add_norm", {"kind": "batch"})],
        )
    ]
