"""Rules on the residual stream of a stack of blocks: growth that compounds with depth, and a gradient that the
norms on the stream (post-LN) divide on its way to the bottom blocks.

They read the records of the blocks themselves (``kinds.is_block``): a built
transformer's blocks, and by the default selection any stack's repeated ``*Block``/``*Layer`` modules (GPT-2's,
BERT's, Llama's, a ResNet's); given the model, only blocks that hold an attention layer. A model whose blocks are
not recorded (a ``layers=`` selection without them) gets no stream finding, never a false one.
"""

from __future__ import annotations

import math

from torch import nn

from steadygrad import kinds
from steadygrad.diagnose._core import (
    STREAM_GRADIENT_RATIO,
    STREAM_GROWTH_PER_BLOCK,
    STREAM_GROWTH_TOTAL,
    STREAM_MIN_BLOCKS,
    Finding,
    Fix,
    has_gradient,
)
from steadygrad.measure.records import FlowReport, LayerRecord
from steadygrad.measure.series import series
from steadygrad.structure import describe


def _attends(block: nn.Module) -> bool:
    """Whether a block holds an attention layer (``nn.MultiheadAttention``, or a class named *Attention*: steadygrad's,
    GPT-2's, BERT's, Llama's): a transformer block, whose stream these rules are about."""
    return any(isinstance(m, nn.MultiheadAttention) or "attention" in type(m).__name__.lower() for m in block.modules())


def _streams(report: FlowReport, model: nn.Module | None) -> list[list[LayerRecord]]:
    """The block series of the records; given the model, only those of transformer blocks (``_attends``), so that a
    plain stack of modules that happen to be named ``*Layer`` or ``*Block`` (a ResNet's, a user's ``ConvLayer``)
    keeps the generic depth rules and their fixes."""
    modules = None
    if isinstance(model, nn.Module):  # under the names the records carry (a torch.compile wrapper's step dropped)
        modules = {".".join(p for p in n.split(".") if p != "_orig_mod"): m for n, m in model.named_modules()}
    out = []
    for s in series(report):
        if s.call != 1 or not kinds.is_block(s.kind):
            continue
        if modules is not None:
            block = modules.get(s.records[0].name)
            if block is None or not _attends(block):
                continue
        out.append(s.records)
    return out


def _spec(model: nn.Module | None):
    structure = describe(model) if model is not None else None
    return getattr(structure, "spec", None)


def _rebuilds(model: nn.Module | None, *fixes: Fix) -> list[Fix]:
    """``rebuild`` fixes apply to a ``steadygrad.build`` network (or to an unknown model, where they are the
    recipe to look for); another library's model gets none: its code is not a spec to change."""
    return list(fixes) if model is None or _spec(model) is not None else []


_WARMUP = Fix("warmup", {"steps": 100}, "linear warmup (HF: get_linear_schedule_with_warmup)")
_LOWER_LR = Fix("lower_lr", {"factor": 0.3}, "a smaller learning rate")


def stream_growth(report: FlowReport, model: nn.Module | None = None) -> list[Finding]:
    """The stream's second moment compounds with depth: over ``STREAM_MIN_BLOCKS`` or more blocks it more than
    doubles per block on average (``STREAM_GROWTH_PER_BLOCK``) and grows over ``STREAM_GROWTH_TOTAL``-fold.

    In a pre-LN stack every branch sees a normalized input, so each block adds about the same c and the stream grows
    linearly, q_l = q_0 + l c (Xiong et al. 2020; ``theory.pre_ln_stream``), never more than 2x per block; a post-LN
    stream is renormalized at every block. Compounding means the branches scale with the stream itself: a stack
    without norms (x + F(x) multiplies the second moment by 1 + Var F / Var x per block), or weights that grew in
    training until the deep blocks' outputs dominate everything before them (Sun et al. 2025, "The Curse of Depth in
    Large Language Models"). The logits then depend on the last blocks alone and training is prone to diverge.
    """
    findings = []
    for records in _streams(report, model):
        moments = [r.act_second_moment for r in records]
        if len(records) < STREAM_MIN_BLOCKS or not all(math.isfinite(q) and q > 0 for q in moments):
            continue
        total = moments[-1] / moments[0]
        per_block = total ** (1 / (len(records) - 1))
        if total < STREAM_GROWTH_TOTAL or per_block <= STREAM_GROWTH_PER_BLOCK:
            continue
        spec = _spec(model)
        fixes = _rebuilds(
            model, Fix("rebuild", {"residual": "rezero"}, "zero-initialized residual gates (Bachlechner et al. 2020)")
        )
        if spec is None or spec.norm == "none":
            fixes += _rebuilds(
                model, Fix("rebuild", {"norm": "layer", "norm_position": "pre"}, "pre-LN (Xiong et al. 2020)")
            )
        fixes += [_LOWER_LR, _WARMUP]
        findings.append(
            Finding(
                "residual_stream_growth",
                "warning",
                [r.label for r in records],
                {"second_moments": moments, "growth": total, "per_block": per_block},
                f"The residual stream's second moment grows {total:.3g}x over {len(records)} blocks "
                f"({records[0].label} to {records[-1].label}), {per_block:.2f}x per block: each block outweighs the "
                "whole stream it adds to, so the stack compounds instead of adding up (a normalized pre-LN stream "
                "grows linearly, under 2x per block).",
                fixes,
            )
        )
    return findings


def stream_gradient_vanishing(report: FlowReport, model: nn.Module | None = None) -> list[Finding]:
    """The gradient into a residual stack's bottom block is below ``STREAM_GRADIENT_RATIO`` of its top block's.

    Down a residual stream the gradient passes u + J^T u per sublayer, no shorter than u on average, so a pre-LN,
    gated or norm-free stack hands its bottom block at least about the top's gradient. Only a norm on the stream
    (post-LN, x <- LN(x + F(x))) divides it, by sqrt(1 + Var F / Var x) per sublayer, which compounds once the
    branches outgrow the stream in the first steps at a full learning rate (``theory.post_ln_gradient``; Xiong et
    al. 2020; Liu et al. 2020): the bottom blocks stop learning, and the model stalls near the unigram loss.
    """
    findings = []
    for records in _streams(report, model):
        flowing = [r for r in records if has_gradient(r)]
        if len(flowing) < 2:
            continue
        ratio = flowing[0].grad_norm / flowing[-1].grad_norm
        if ratio >= STREAM_GRADIENT_RATIO:
            continue
        spec = _spec(model)
        fixes = []
        if spec is None or spec.norm_position == "post":
            fixes = _rebuilds(
                model,
                Fix("rebuild", {"norm_position": "pre"}, "pre-LN: the identity path skips the norms (Xiong 2020)"),
                Fix("rebuild", {"residual": "deepnorm"}, "DeepNorm's up-weighted skip (Wang et al. 2022)"),
            )
        fixes += [_WARMUP, _LOWER_LR]
        per_block = ratio ** (1 / (len(flowing) - 1))
        findings.append(
            Finding(
                "post_ln_vanishing_gradient",
                "warning",
                [r.label for r in flowing if r.grad_norm / flowing[-1].grad_norm < STREAM_GRADIENT_RATIO],
                {
                    "bottom_over_top": ratio,
                    "per_block": per_block,
                    "grad_norms": [r.grad_norm for r in flowing],
                    "blocks": [r.name for r in records],
                },
                f"The gradient into the residual stream shrinks {per_block:.2f}x per block on its way down: "
                f"{flowing[0].label} gets {ratio:.2g} of {flowing[-1].label}'s. A residual path alone would keep it; "
                "the norms on the stream (post-LN) divide it once the branches outgrow the stream, and the bottom "
                "blocks stop learning.",
                fixes,
            )
        )
    return findings


def explained_by_stream(findings: list[Finding]) -> list[Finding]:
    """``findings`` without a ``vanishing_gradients`` finding whose layers all lie inside blocks whose stream is
    already found cut off (``post_ln_vanishing_gradient``): the layers in a block get the stream's gradient, so
    the generic finding would repeat the stream's with fixes (batch norm, skips, He init) that do not apply."""
    blocks = [name for f in findings if f.kind == "post_ln_vanishing_gradient" for name in f.evidence["blocks"]]
    if not blocks:
        return findings

    def inside(label: str) -> bool:
        return any(label.startswith(block + ".") or label.split(" (")[0] == block for block in blocks)

    return [
        f for f in findings if not (f.kind == "vanishing_gradients" and f.layers and all(inside(n) for n in f.layers))
    ]
