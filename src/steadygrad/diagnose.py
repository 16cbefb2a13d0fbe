"""Rules over per-layer records: what is wrong, where, the numbers that show it, and what to try.

``diagnose(report_or_history, model=None, inputs=None)`` returns ``Finding``s. Each rule's thresholds
are the named constants below; rules that need the model's weights (symmetric units, bias before a
BatchNorm) or the inputs (centring) run when those are given.

Every rule that produces findings lives here. Two read only the model, not the records, and are called
separately (the doctor calls them; ``diagnose`` itself does not, so a Monitor's diagnosis is unchanged):
``architecture_findings(model)`` (a deep plain stack, a tanh/sigmoid fed by an unnormalized layer) and
``recurrent_findings(model, inputs, loss)`` (the gradient's change along time through a recurrent layer).
"""

from __future__ import annotations

import copy
import itertools
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from steadygrad import kinds
from steadygrad.measure.records import FlowReport, LayerRecord
from steadygrad.structure import describe

__all__ = ["ACTIONS", "Finding", "Fix", "architecture_findings", "diagnose", "recurrent_findings"]

# -- thresholds ---------------------------------------------------------------------------------------
VANISHING_RATIO = 1e-3  # first layer's gradient below 1/1000 of the last layer's
VANISHING_ABSOLUTE = 1e-7  # or a layer's gradient norm below this, whatever the last layer's
EXPLODING_RATIO = 1e3  # first layer's gradient above 1000x the last layer's
EXPLODING_GROWTH = 1e2  # the gradient norm grew 100x from the first logged step to the last
SATURATION_FRACTION = 0.5  # over half of a layer's tanh/sigmoid outputs saturated (|tanh| > 0.99, ...)
DEAD_FRACTION = 0.5  # over half of a layer's rectifier units dead (SageMaker Debugger's rule)
SIGNAL_CHANGE = 10.0  # activation std changes more than 10x from the first layer to the last at init
NONCENTERED_RATIO = 0.5  # input features' mean |mean_j| / std_j above this: not zero-centred
UPDATE_RATIO_LOW = 1e-5  # median ||dW|| / ||W|| per step below this: the layer barely learns
UPDATE_RATIO_HIGH = 1e-1  # above this: steps are large relative to the weights (1e-3 is typical)
SYMMETRY_TOLERANCE = 1e-6  # relative spread of a layer's rows below this: its units are identical
DEEP_WITHOUT_SKIPS = 20  # a plain stack this deep (weight layers) gets a "deep_without_skips" finding
EXPLODING_OVER_TIME = 1e3  # first input step's gradient above 1000x the last's
VANISHING_OVER_TIME = 1e-4  # or below 1/10000 of it

SEVERITIES = ("info", "warning", "critical")
# What a ``Fix`` may ask for. The doctor registers one candidate builder per action
# (``steadygrad.doctor._BUILDERS``); a new fix is a name here plus one ``@candidate(name)`` there.
ACTIONS = (
    "reinit",
    "add_norm",
    "add_skips",
    "clip",
    "lower_lr",
    "raise_lr",
    "standardize_inputs",
    "swap_activation",
    "remove_bias",
)


@dataclass(frozen=True)
class Fix:
    """A candidate fix as a structured action that a program can apply (``steadygrad doctor``)."""

    action: str  # one of ACTIONS
    params: dict = field(default_factory=dict)  # e.g. {"scheme": "he_normal"}, {"mode": "norm", "threshold": 1.0}
    reason: str = ""

    def __post_init__(self) -> None:
        # Checked here, where a fix is made, so a misspelt action fails at the rule that wrote it rather than
        # being silently dropped later by the doctor, which has no candidate for it.
        if self.action not in ACTIONS:
            raise ValueError(
                f"Unknown fix action {self.action!r}. Accepted: {', '.join(ACTIONS)}. To add a fix, add its name "
                "to steadygrad.diagnose.ACTIONS and register a candidate builder for it in steadygrad.doctor."
            )

    def __str__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.action}({params})" if params else self.action


@dataclass
class Finding:
    """One diagnosis: what, how bad, where, the numbers, in a sentence, and what to try."""

    kind: str  # e.g. "vanishing_gradients"
    severity: str  # info, warning or critical
    layers: list[str]
    evidence: dict
    message: str
    fixes: list[Fix] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["fixes"] = [asdict(f) for f in self.fixes]
        return out

    def __str__(self) -> str:
        return f"[{self.severity}] {self.message}"


def _finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _with_gradient(report: FlowReport) -> list[LayerRecord]:
    return [r for r in report.records if math.isfinite(r.grad_norm) and r.grad_norm > 0]


def _saturating(report: FlowReport) -> bool:
    return any(k in r.kind for r in report.records for k in ("Sigmoid", "Tanh"))


def _reinit_fix(report: FlowReport) -> Fix:
    """He for rectifier nets, Glorot for saturating ones (He et al. 2015; Glorot & Bengio 2010)."""
    if _saturating(report):
        return Fix(
            "reinit",
            {"scheme": "glorot_normal"},
            "Glorot init keeps tanh/sigmoid layers in their linear range",
        )
    return Fix("reinit", {"scheme": "he_normal"}, "He init keeps the variance of rectifier layers")


# -- rules --------------------------------------------------------------------------------------------


def _nonfinite(history: Sequence[FlowReport]) -> list[Finding]:
    for report in history:
        broken = [r for r in report.records if r.nonfinite_act or r.nonfinite_grad]
        if broken:
            first = broken[0]
            where = "outputs" if first.nonfinite_act else "gradients"
            step = f" at step {report.step}" if report.step is not None else ""
            norms = _finite(r.weight_grad_norm for r in history[0].records)
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
                        _reinit_fix(report),
                    ],
                )
            ]
    return []


def _vanishing(report: FlowReport) -> list[Finding]:
    layers = _with_gradient(report)
    if len(layers) < 2:
        return []
    last = layers[-1].grad_norm
    weak = [r for r in layers[:-1] if r.grad_norm / last < VANISHING_RATIO or r.grad_norm < VANISHING_ABSOLUTE]
    if not weak:
        return []
    ratio = layers[0].grad_norm / last
    per_layer = ratio ** (1 / (len(layers) - 1))
    fixes = [_reinit_fix(report), Fix("add_norm", {"kind": "batch"}), Fix("add_skips", {"kind": "residual"})]
    if _saturating(report):
        fixes.append(Fix("swap_activation", {"to": "relu"}, "ReLU does not saturate for positive inputs"))
    return [
        Finding(
            "vanishing_gradients",
            "warning",
            [r.label for r in weak],
            {
                "first_to_last_ratio": ratio,
                "per_layer_factor": per_layer,
                "smallest_grad_norm": min(r.grad_norm for r in weak),
            },
            f"Gradients vanish: at {layers[0].label} the gradient is {ratio:.2g} of its size at {layers[-1].label} "
            f"(about {per_layer:.2f}x per layer); {len(weak)} layer(s) receive almost none.",
            fixes,
        )
    ]


def _exploding(history: Sequence[FlowReport]) -> list[Finding]:
    findings = []
    report = history[-1]
    layers = _with_gradient(report)
    if len(layers) >= 2 and layers[0].grad_norm / layers[-1].grad_norm > EXPLODING_RATIO:
        ratio = layers[0].grad_norm / layers[-1].grad_norm
        threshold = statistics.median(_finite(r.weight_grad_norm for r in report.records) or [1.0])
        findings.append(
            Finding(
                "exploding_gradients",
                "warning",
                [layers[0].label],
                {"first_to_last_ratio": ratio},
                f"Gradients explode across depth: {ratio:.2g}x larger at {layers[0].label} than at {layers[-1].label}.",
                [
                    Fix("clip", {"mode": "norm", "threshold": round(threshold, 6)}),
                    _reinit_fix(report),
                    Fix("add_norm", {"kind": "batch"}),
                ],
            )
        )
    if len(history) >= 2:

        def total(rep):
            return math.sqrt(sum(v**2 for v in _finite(r.weight_grad_norm for r in rep.records)))

        first, last = total(history[0]), total(history[-1])
        if first > 0 and last / first > EXPLODING_GROWTH:
            findings.append(
                Finding(
                    "exploding_gradients",
                    "warning",
                    [],
                    {
                        "growth_over_steps": last / first,
                        "first_step": history[0].step,
                        "last_step": history[-1].step,
                    },
                    f"The gradient norm grew {last / first:.2g}x between steps {history[0].step} and "
                    f"{history[-1].step}.",
                    [
                        Fix("clip", {"mode": "norm", "threshold": round(first, 6)}),
                        Fix("lower_lr", {"factor": 0.1}),
                    ],
                )
            )
    return findings


def _fractions(history: Sequence[FlowReport], attr: str, limit: float) -> dict[str, float]:
    """Layers whose ``attr`` exceeds ``limit`` in the latest report."""
    return {
        r.label: getattr(r, attr)
        for r in history[-1].records
        if math.isfinite(getattr(r, attr)) and getattr(r, attr) > limit
    }


def _saturated(history: Sequence[FlowReport]) -> list[Finding]:
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


def _dead(history: Sequence[FlowReport]) -> list[Finding]:
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


def _signal(history: Sequence[FlowReport]) -> list[Finding]:
    stds = [(r.label, r.act_std) for r in history[0].records if math.isfinite(r.act_std) and r.act_std > 0]
    if len(stds) < 3:
        return []
    (first_name, first), (last_name, last) = (
        stds[0],
        stds[-2],
    )  # the head's output is the logits: leave it out
    change = last / first
    if 1 / SIGNAL_CHANGE <= change <= SIGNAL_CHANGE:
        return []
    direction = "shrinks" if change < 1 else "grows"
    return [
        Finding(
            "poor_signal_propagation",
            "warning",
            [first_name, last_name],
            {"std_first": first, "std_last": last, "change": change},
            f"At the first logged step the activation std {direction} {change:.2g}x from {first_name} to "
            f"{last_name}: the "
            "initialization does not preserve the signal's variance.",
            [_reinit_fix(history[0]), Fix("add_norm", {"kind": "batch"})],
        )
    ]


def _update_ratio(history: Sequence[FlowReport]) -> list[Finding]:
    by_layer: dict[str, list[float]] = {}
    for report in history:
        for r in report.records:
            if math.isfinite(r.update_ratio):
                by_layer.setdefault(r.label, []).append(r.update_ratio)
    medians = {name: statistics.median(values) for name, values in by_layer.items()}
    low = {n: v for n, v in medians.items() if v < UPDATE_RATIO_LOW}
    high = {n: v for n, v in medians.items() if v > UPDATE_RATIO_HIGH}
    findings = []
    if high:
        findings.append(
            Finding(
                "update_ratio_high",
                "warning",
                list(high),
                {"median_update_ratio": high},
                f"Updates are large relative to the weights in {len(high)} layer(s) (median ||dW||/||W|| up to "
                f"{max(high.values()):.2g}; about 1e-3 is typical): the learning rate is likely too high.",
                [Fix("lower_lr", {"factor": 0.1})],
            )
        )
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


def _symmetric(model: nn.Module) -> list[Finding]:
    identical = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not kinds.is_weight_layer(module, *kinds.AFFINE) or weight is None or weight.shape[0] < 2:
            continue
        rows = weight.detach().reshape(weight.shape[0], -1).double()
        spread = (rows - rows[:1]).abs().max()
        if float(spread) <= SYMMETRY_TOLERANCE * max(float(rows.abs().max()), 1e-12):
            identical.append(name)
    if not identical:
        return []
    return [
        Finding(
            "symmetric_units",
            "critical",
            identical,
            {"layers_with_identical_rows": len(identical)},
            f"Every unit of {', '.join(identical)} has the same weights: they compute the same function and get the "
            "same gradient, so training can never tell them apart.",
            [Fix("reinit", {"scheme": "he_normal"}, "random weights break the symmetry")],
        )
    ]


def _bias_before_norm(model: nn.Module) -> list[Finding]:
    redundant = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (name, layer), (_, after) in itertools.pairwise(children):
            is_bn = isinstance(after, nn.modules.batchnorm._BatchNorm) or "BatchNorm" in type(after).__name__
            has_bias = kinds.is_weight_layer(layer, *kinds.AFFINE) and layer.bias is not None
            if is_bn and has_bias:
                redundant.append(f"{parent_name}.{name}" if parent_name else name)
    if not redundant:
        return []
    return [
        Finding(
            "bias_before_batchnorm",
            "info",
            redundant,
            {"layers": len(redundant)},
            f"{', '.join(redundant)} add a bias that the BatchNorm right after subtracts again with the batch mean: "
            "it gets zero gradient and can be dropped (bias=False); BatchNorm's beta takes its role.",
            [Fix("remove_bias", {"layers": redundant})],
        )
    ]


def _noncentred(inputs: torch.Tensor) -> list[Finding]:
    x = inputs.detach().double().reshape(inputs.shape[0], -1)
    mean, std = x.mean(0), x.std(0)
    varying = std > 1e-8 * float(std.max().clamp(min=1e-300))  # constant features (blank pixels) say nothing
    if not bool(varying.any()):
        return []
    ratio = float((mean[varying].abs() / std[varying]).mean())
    all_positive = bool((x >= 0).all())
    if ratio <= NONCENTERED_RATIO and not all_positive:
        return []
    return [
        Finding(
            "noncentred_inputs",
            "warning",
            ["input"],
            {"mean_abs_mean_over_std": ratio, "all_non_negative": all_positive},
            f"The inputs are not zero-centred (mean |mean|/std over features: {ratio:.2g}"
            f"{'; every value is >= 0' if all_positive else ''}): the first layer's weight updates then share a "
            "sign and zig-zag (LeCun et al. 1998).",
            [Fix("standardize_inputs")],
        )
    ]


def architecture_findings(model: nn.Module) -> list[Finding]:
    """Findings the records cannot show, read from the model's structure: a plain stack of at least
    ``DEEP_WITHOUT_SKIPS`` weight layers (each multiplies the gradient once more: He et al. 2016), and
    sigmoid/tanh modules fed directly by an unnormalized weight layer (nothing keeps their inputs out of
    the flat tails: Ioffe & Szegedy 2015)."""
    findings = []
    weight_layers = [name for name, m in model.named_modules() if kinds.is_weight_layer(m, *kinds.AFFINE)]
    structure = describe(model)
    # a model that describes itself is believed; otherwise only an nn.Sequential is known to have no skips
    plain = structure.skip == "none" if structure is not None else isinstance(model, nn.Sequential)
    if plain and len(weight_layers) >= DEEP_WITHOUT_SKIPS:
        findings.append(
            Finding(
                "deep_without_skips",
                "warning",
                weight_layers[:1] + weight_layers[-1:],
                {"weight_layers": len(weight_layers)},
                f"{len(weight_layers)} weight layers in a plain stack with no skip connection: every layer "
                "multiplies the "
                "gradient once more on its way down.",
                [Fix("add_skips", {"kind": "residual"}), Fix("add_norm", {"kind": "batch"})],
            )
        )
    exposed = []
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for (_, layer), (after_name, after) in itertools.pairwise(children):
            if kinds.is_weight_layer(layer, *kinds.AFFINE) and kinds.is_activation(after, "saturating"):
                exposed.append(f"{parent_name}.{after_name}" if parent_name else after_name)
    if exposed:
        findings.append(
            Finding(
                "saturating_without_norm",
                "info",
                exposed,
                {"activations": len(exposed)},
                f"{len(exposed)} sigmoid/tanh activation(s) take an unnormalized layer's output directly: "
                "nothing keeps "
                "their inputs out of the flat tails.",
                [Fix("add_norm", {"kind": "batch"}), Fix("swap_activation", {"to": "relu"})],
            )
        )
    return findings


def recurrent_findings(model: nn.Module, inputs: torch.Tensor, loss: Callable[[object], torch.Tensor]) -> list[Finding]:
    """For a model with a recurrent layer on (N, T, F) inputs: how the gradient reaching input step t changes
    along time, ||dL/dx_1|| / ||dL/dx_T||: a recurrent net is T layers deep in time (Bengio et al. 1994).

    Args:
        model: not modified; the backward pass runs on a deep copy.
        inputs: a batch, (N, T, F); other shapes (or T < 2, or no ``nn.RNNBase``) give no finding.
        loss: the model's output -> a scalar loss (the doctor passes its training loss on this batch).
    """
    if inputs.dim() != 3 or inputs.shape[1] < 2 or not any(isinstance(m, nn.RNNBase) for m in model.modules()):
        return []
    copy_ = copy.deepcopy(model)
    x = inputs.detach().clone().requires_grad_(True)
    loss(copy_(x)).backward()
    per_step = x.grad.norm(dim=(0, 2))
    ratio = float(per_step[0] / per_step[-1]) if float(per_step[-1]) > 0 else math.inf
    evidence = {"first_to_last_step_ratio": ratio, "steps": inputs.shape[1]}
    recurrent = [n for n, m in model.named_modules() if isinstance(m, nn.RNNBase)]
    if not math.isfinite(ratio) or ratio > EXPLODING_OVER_TIME:
        return [
            Finding(
                "exploding_over_time",
                "warning",
                recurrent,
                evidence,
                f"The gradient grows {ratio:.2g}x going back {inputs.shape[1]} time steps: the recurrence explodes.",
                [
                    Fix("clip", {"mode": "norm"}),
                    Fix("reinit", {"scheme": "orthogonal"}),
                    Fix("lower_lr", {"factor": 0.1}),
                ],
            )
        ]
    if ratio < VANISHING_OVER_TIME:
        return [
            Finding(
                "vanishing_over_time",
                "warning",
                recurrent,
                evidence,
                f"The gradient reaching the first of {inputs.shape[1]} time steps is {ratio:.2g} of the last's: "
                "early inputs barely affect learning.",
                [Fix("reinit", {"scheme": "orthogonal"})],
            )
        ]
    return []


REUSED_CALLS = 3  # a weight layer called this many times in one forward is a recurrence (or shared depth)


def _reused(report: FlowReport) -> list[Finding]:
    """Effective depth through reuse: a weight layer called T >= ``REUSED_CALLS`` times in one forward (a
    recurrence written by hand, ``h = cell(h, x_t)`` in a Python loop, or weights shared across depth) makes the
    gradient pass through it T times, as an ``nn.RNN`` does along time (Bengio et al. 1994). Its records, one per
    call, give the along-time ratio ||dL/dy_1|| / ||dL/dy_T|| whatever the code looks like; the thresholds are
    ``recurrent_findings``' (``EXPLODING_OVER_TIME``, ``VANISHING_OVER_TIME``). Only modules with weights count:
    an activation module reused by every layer (``self.act``, torchvision's ``self.relu``) is depth, not time.
    The layers of one recurrence (its input and state projections) share one finding."""
    calls: dict[str, list[LayerRecord]] = {}
    for record in report.records:
        calls.setdefault(record.name, []).append(record)
    ratios: dict[str, tuple[float, int]] = {}
    for name, records in calls.items():
        records = sorted(records, key=lambda r: r.call)
        first, last = records[0], records[-1]
        if len(records) < REUSED_CALLS or not math.isfinite(first.weight_var):
            continue
        if math.isfinite(first.grad_norm) and math.isfinite(last.grad_norm) and last.grad_norm > 0:
            ratios[name] = (first.grad_norm / last.grad_norm, len(records))
    findings = []
    for kind, bad, words, fixes in (
        (
            "exploding_over_time",
            lambda ratio: ratio > EXPLODING_OVER_TIME,
            "{ratio:.2g}x the gradient at its last: it explodes through the recurrence",
            [Fix("clip", {"mode": "norm"}), Fix("reinit", {"scheme": "orthogonal"}), Fix("lower_lr", {"factor": 0.1})],
        ),
        (
            "vanishing_over_time",
            lambda ratio: ratio < VANISHING_OVER_TIME,
            "{ratio:.2g} of the gradient at its last: early steps barely learn",
            [Fix("reinit", {"scheme": "orthogonal"})],
        ),
    ):
        layers = {name: value for name, value in ratios.items() if bad(value[0])}
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


def diagnose(
    report_or_history: FlowReport | Sequence[FlowReport],
    model: nn.Module | None = None,
    inputs: torch.Tensor | None = None,
) -> list[Finding]:
    """Findings, most severe first, from one probe report or a monitor's history of reports.

    Args:
        report_or_history: a ``FlowReport`` or a sequence of them (``Monitor.history.reports``).
        model: enables the rules that read weights (symmetric units, bias before BatchNorm).
        inputs: a batch of inputs; enables the centring rule.

    The structural rules ``architecture_findings`` and ``recurrent_findings`` are not run here; call them
    with the model (the doctor does).
    """
    history = [report_or_history] if isinstance(report_or_history, FlowReport) else list(report_or_history)
    if not history or not all(isinstance(r, FlowReport) for r in history):
        raise TypeError("diagnose takes a FlowReport or a non-empty sequence of them (a Monitor's history).")
    findings = _nonfinite(history)
    findings += _vanishing(history[-1]) + _exploding(history) + _saturated(history) + _dead(history)
    findings += _signal(history) + _update_ratio(history) + _reused(history[-1])
    if model is not None:
        findings += _symmetric(model) + _bias_before_norm(model)
    if inputs is not None:
        findings += _noncentred(inputs)
    return sorted(findings, key=lambda f: -SEVERITIES.index(f.severity))
