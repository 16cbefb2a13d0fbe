"""Rules on attention layers: entropy collapse at a step, and attention logits that keep growing over steps.

They read the attention fields of the records (``measure.attention``): only layers whose probabilities were
computed in eager form have them, so a model under fused attention gets no attention finding, never a false one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from steadygrad.diagnose._core import (
    ATTENTION_COLLAPSE_FRACTION,
    ATTENTION_LOGIT_GROWTH,
    ATTENTION_LOGIT_LARGE,
    Finding,
    Fix,
)
from steadygrad.measure.records import FlowReport

_ATTENTION_FIXES = [
    Fix("rebuild", {"qk_norm": True}, "normalize queries and keys (Dehghani et al. 2023)"),
    Fix("warmup", {"steps": 100}),
    Fix("lower_lr", {"factor": 0.3}),
]


def attention_collapse(history: Sequence[FlowReport]) -> list[Finding]:
    """Layers whose attention entropy, averaged over heads and rows, is below ``ATTENTION_COLLAPSE_FRACTION`` of
    uniform attention's at the last logged step (Zhai et al. 2023, "entropy collapse").

    The fraction f = H / log(n) means each row spreads its attention as over n^f keys: at f = 0.1 that is under 2
    keys of 1,000. One sharp head is often a learned one (a previous-token head), so the rule reads the mean over
    a layer's heads, which only falls that low when the layer's heads all attend to single keys.
    """
    records = [r for r in history[-1].records if math.isfinite(r.attn_entropy_fraction)]
    collapsed = {
        r.label: r.attn_entropy_fraction for r in records if r.attn_entropy_fraction < ATTENTION_COLLAPSE_FRACTION
    }
    if not collapsed:
        return []
    worst = min(collapsed, key=collapsed.get)
    logits = {r.label: r.attn_max_logit for r in records if r.label in collapsed and math.isfinite(r.attn_max_logit)}
    where = f"; its largest attention logit is {logits[worst]:.3g}" if worst in logits else ""
    return [
        Finding(
            "attention_entropy_collapse",
            "warning",
            list(collapsed),
            {"entropy_fraction": collapsed, "max_logit": logits},
            f"{len(collapsed)} attention layer(s) attend almost entirely to single keys: entropy at "
            f"{100 * collapsed[worst]:.1f}% of uniform attention's at {worst}{where}. Collapsed attention passes "
            "almost no gradient to the other keys and precedes divergence (Zhai et al. 2023).",
            list(_ATTENTION_FIXES),
        )
    ]


def attention_logit_growth(history: Sequence[FlowReport]) -> list[Finding]:
    """Layers whose largest attention logit grew ``ATTENTION_LOGIT_GROWTH``-fold from the first logged step to the
    last and ended above ``ATTENTION_LOGIT_LARGE`` (Dehghani et al. 2023: logits growing without bound make the
    softmax one-hot and training diverge). Needs two logged steps; a probe's single report has no growth."""
    if len(history) < 2:
        return []
    first = {r.label: r.attn_max_logit for r in history[0].records if math.isfinite(r.attn_max_logit)}
    last = {r.label: r.attn_max_logit for r in history[-1].records if math.isfinite(r.attn_max_logit)}
    growing = {
        name: (first[name], value)
        for name, value in last.items()
        if name in first
        and first[name] > 0
        and value > ATTENTION_LOGIT_LARGE
        and value / first[name] >= ATTENTION_LOGIT_GROWTH
    }
    if not growing:
        return []
    worst = max(growing, key=lambda n: growing[n][1] / growing[n][0])
    start, end = growing[worst]
    return [
        Finding(
            "attention_logit_growth",
            "warning",
            list(growing),
            {"max_logit_first_last": growing, "steps": [history[0].step, history[-1].step]},
            f"The largest attention logit grew {end / start:.3g}x over the logged steps in {len(growing)} layer(s) "
            f"(worst: {worst}, {start:.3g} -> {end:.3g}); logits that keep growing turn attention one-hot and "
            "destabilize training (Dehghani et al. 2023).",
            list(_ATTENTION_FIXES),
        )
    ]
