"""What a rule returns (``Finding``, ``Fix``), the thresholds every rule reads, and the helpers they share."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from steadygrad.measure.records import FlowReport, LayerRecord

# -- thresholds ---------------------------------------------------------------------------------------
VANISHING_RATIO = 1e-3  # a layer's gradient below 1/1000 of the same layer's at the last depth
EXPLODING_RATIO = 1e3  # or above 1000x it
EXPLODING_GROWTH = 1e2  # the gradient norm grew 100x from the first logged step to the last
# A weight layer's gain sqrt(fan_in * E[W^2]) (``_flow.layer_gain``): variance-scaling inits give 0.58 (torch's
# default) to 1.41 (He), 5/3 at most (tanh's orthogonal gain); the fixed std 0.02 of GPT-2/BERT/ConvNeXt gives
# 0.02 * sqrt(width), 0.08 at width 16. Both limits sit about 8x beyond that range.
LAYER_GAIN_LOW = 1e-2  # a weight layer that multiplies signal and gradient by under 1/100 (fan_in * E[W^2] < 1e-4)
LAYER_GAIN_HIGH = 10.0  # or by over 10
SATURATION_FRACTION = 0.5  # over half of a layer's tanh/sigmoid outputs saturated (|tanh| > 0.99, ...)
DEAD_FRACTION = 0.5  # over half of a layer's rectifier units dead (SageMaker Debugger's rule)
SIGNAL_CHANGE = 10.0  # activation std of the same layer changes more than 10x from the first depth to the last
NONCENTERED_RATIO = 0.5  # input features' mean |mean_j| / std_j above this: not zero-centred
NONCENTERED_NOISE = 3.0  # ... and above 3x what a zero-mean feature shows by chance on this many samples
UPDATE_RATIO_LOW = 1e-5  # median ||dW|| / ||W|| per step below this: the layer barely learns
UPDATE_RATIO_HIGH = 1e-1  # above this: steps are large relative to the weights (1e-3 is typical)
SYMMETRY_TOLERANCE = 1e-6  # relative spread of a layer's rows below this: its units are identical
DEEP_WITHOUT_SKIPS = 20  # a plain stack this deep (weight layers) gets a "deep_without_skips" finding
EXPLODING_OVER_TIME = 1e3  # first input step's gradient above 1000x the last's
VANISHING_OVER_TIME = 1e-4  # or below 1/10000 of it
# ... and shrinking faster than this per step. A gated cell starts out forgetting about half of its memory per
# step (an LSTM's or GRU's gates are sigmoid(~0) = 0.5 at init: PyTorch's default LSTMCell measures 0.55 per step,
# a hand-written GRU 0.68), so over 20+ steps any standard cell is below 1e-4 overall; a recurrence that keeps
# less than 0.45 of the gradient per step forgets faster than a default LSTM starts out, and is vanishing.
VANISHING_PER_STEP = 0.45


def vanishing_in_time(ratio: float, steps: int) -> bool:
    """Whether the gradient's change over ``steps`` calls or time steps (first over last) is vanishing: below
    ``VANISHING_OVER_TIME`` overall *and* below ``VANISHING_PER_STEP`` per step."""
    return ratio < VANISHING_OVER_TIME and steps > 1 and ratio ** (1 / (steps - 1)) < VANISHING_PER_STEP


# The loss of the first step above this many times ln(classes): the logits are far too large. An untrained
# classifier predicts near-uniformly and scores about ln(C) (Karpathy's "verify loss @ init"); only logits
# scaled up by a too-large init (or a missing 1/sqrt(d) somewhere) make it confidently wrong at 3x that.
LOSS_AT_INIT = 3.0

# a layer's attention entropy, averaged over heads, below 10% of uniform attention's: rows attend as over n^0.1 keys
ATTENTION_COLLAPSE_FRACTION = 0.1
# the largest attention logit grew 10x between the first and last logged steps, ending above 30 (e^30: one-hot rows)
ATTENTION_LOGIT_GROWTH = 10.0
ATTENTION_LOGIT_LARGE = 30.0

# A residual stream (the outputs of a stack's blocks) whose second moment more than doubles per block, over at least
# STREAM_MIN_BLOCKS blocks and 100x in all. Under additive growth q_l = q_0 + l c (pre-LN, theory.pre_ln_stream)
# the factor per block (q_0 + (l + 1) c) / (q_0 + l c) is at most 2, so compounding beyond it means each block
# outweighs the whole stream it adds to.
STREAM_GROWTH_PER_BLOCK = 2.0
STREAM_GROWTH_TOTAL = 100.0
STREAM_MIN_BLOCKS = 4
# The gradient into a residual stack's bottom block below 1/20 of its top block's. Through the identity path
# u + J^T u a stream without a norm on it passes the bottom at least about the top's gradient (pre-LN, gated or
# norm-free stacks measure 1-6x, fresh post-LN ones 1-3x); only norms on the stream (post-LN) divide it, by
# sqrt(1 + Var F / Var x) per sublayer (theory.post_ln_gradient). 20x below the top is far outside that range:
# a 6-layer BERT after 20 steps at Adam 3e-3 measures 0.015.
STREAM_GRADIENT_RATIO = 0.05

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
    "warmup",
    "agc",
    "change_optimizer",
    "scale_residual",
    "rebuild",
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


NO_FINDINGS = "No findings: gradients and activations looked healthy at every logged step."


def findings_text(findings: Sequence[Finding]) -> list[str]:
    """The findings as the CLI prints them, one line each with its fixes on the next: ``- [warning] ...`` and
    ``  try: reinit(scheme=he), ...``; or the one line that says there is none."""
    if not findings:
        return [NO_FINDINGS]
    lines = []
    for finding in findings:
        lines.append(f"- {finding}")
        if finding.fixes:
            lines.append("  try: " + ", ".join(str(fix) for fix in finding.fixes))
    return lines


def finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def has_gradient(record: LayerRecord) -> bool:
    """A finite, non-zero gradient: exact zeros are a finding of their own (``zero_gradients``), not a ratio."""
    return math.isfinite(record.grad_norm) and record.grad_norm > 0


def saturating(report: FlowReport) -> bool:
    return any(k in r.kind for r in report.records for k in ("Sigmoid", "Tanh"))


def reinit_fix(report: FlowReport) -> Fix:
    """He for rectifier nets, Glorot for saturating ones (He et al. 2015; Glorot & Bengio 2010)."""
    if saturating(report):
        return Fix(
            "reinit",
            {"scheme": "glorot_normal"},
            "Glorot init keeps tanh/sigmoid layers in their linear range",
        )
    return Fix("reinit", {"scheme": "he_normal"}, "He init keeps the variance of rectifier layers")
