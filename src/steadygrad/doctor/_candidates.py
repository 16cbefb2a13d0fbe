"""From findings to candidates: one builder per ``Fix`` action, each returning the candidates it can make.

A builder is registered with ``@candidate(action)``; adding a fix is its name in ``steadygrad.diagnose.ACTIONS``
plus one builder here (a test checks that the two agree). ``unprompted`` builders run on every model whatever
the findings say (the training settings, re-initialization, residual scaling): a model that needs a fix has
every remedy measured, not only the one its finding names. A builder that cannot apply raises ``NotApplicable``
with what to do by hand; the report lists it as skipped.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from steadygrad import kinds
from steadygrad.diagnose import ACTIONS, Finding, Fix
from steadygrad.doctor._trial import SWAPPED_LR, Changes, Settings
from steadygrad.fixes import insert_norm, standardize_inputs, swap_activation
from steadygrad.init import fixup_, init_model, lsuv_
from steadygrad.nets import NetSpec, build
from steadygrad.structure import describe

__all__ = ["Candidate", "NotApplicable", "candidate", "candidates_for"]

WARMUP_FRACTION = 0.25  # of the trial's steps: linear warmup (Goyal et al. 2017; Xiong et al. 2020)


@dataclass
class Candidate:
    """A fix to try: how to make the fixed model from a fresh one, what it changes in training, its patch."""

    name: str
    fix: Fix
    make: Callable[[nn.Module], nn.Module]  # fresh model -> fixed model (may modify it in place)
    patch: str  # Python a user can paste
    changes: Changes = field(default_factory=Changes)
    prompted: bool = False


class NotApplicable(Exception):
    """Raised by a builder when its fix cannot be applied to this model automatically; the message (what to do
    by hand) goes to the report's ``skipped``."""


@dataclass
class Context:
    """What a builder may read: the freshly built model (to decide, not to modify), the first training batch's
    inputs, the clipping threshold measured on the control, the training settings and the seed."""

    model: nn.Module
    inputs: object
    clip_threshold: float
    settings: Settings
    seed: int
    steps: int

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def tensor_inputs(self, why: str) -> torch.Tensor:
        if isinstance(self.inputs, torch.Tensor) and self.inputs.is_floating_point():
            return self.inputs
        raise NotApplicable(f"{why}: it needs one float input tensor; this model takes {type(self.inputs).__name__}.")


Builder = Callable[[Fix, Context], list[Candidate]]
_BUILDERS: dict[str, Builder] = {}
_UNPROMPTED: list[tuple[str, Builder]] = []


def candidate(action: str, *, unprompted: bool = False) -> Callable[[Builder], Builder]:
    """Register ``builder(fix, context) -> [Candidate, ...]`` for the ``Fix`` action ``action``."""
    if action not in ACTIONS:
        raise ValueError(
            f"Cannot register a candidate for the unknown fix action {action!r}. Accepted: {', '.join(ACTIONS)}; "
            "add a new action to steadygrad.diagnose.ACTIONS first."
        )

    def register(builder: Builder) -> Builder:
        if unprompted:
            _UNPROMPTED.append((action, builder))
        elif action in _BUILDERS:
            raise ValueError(f"A candidate builder for {action!r} is already registered: {_BUILDERS[action]}.")
        else:
            _BUILDERS[action] = builder
        return builder

    return register


def _has_norms(model: nn.Module) -> bool:
    """Registered norms, and other libraries' by their class name (T5's ``T5LayerNorm``, ``LlamaRMSNorm``)."""
    return any(kinds.norm_family(m) is not None or "norm" in type(m).__name__.lower() for m in model.modules())


# -- re-initialization ------------------------------------------------------------------------------------------


def embedding_std(model: nn.Module) -> float:
    """1/sqrt(d) for embeddings of width d: a tied output head then gives logits of unit variance from a
    normalized hidden state (sum over d of unit x N(0, 1/d)), and an untied input embedding's scale is the
    norm's business; 1 (torch's default) for a model without embeddings."""
    dims = [m.weight.shape[-1] for m in model.modules() if kinds.weight_family(m) == "embedding"]
    return max(dims) ** -0.5 if dims else 1.0


def _reinit(scheme: str, ctx: Context) -> Callable[[nn.Module], nn.Module]:
    std = embedding_std(ctx.model)

    def make(model: nn.Module) -> nn.Module:
        with torch.no_grad():
            init_model(model, scheme, nonlinearity="auto", embedding=std, generator=ctx.generator())
        return model

    return make


@candidate("reinit")
def _reinit_matched(fix: Fix, ctx: Context) -> list[Candidate]:
    """Every weight layer ``steadygrad.init_model`` discovers (Linear, Conv, RNN, HF Conv1D with its true fans,
    embeddings, attention projections), a tied parameter once as its first owner; the scheme the finding asks
    for with the gain of the activation after each layer."""
    scheme = fix.params.get("scheme", "he_normal")
    return [
        Candidate(
            f"re-initialize every weight layer ({scheme}, matched to each activation)",
            fix,
            _reinit(scheme, ctx),
            f'steadygrad.init.init_model(model, "{scheme}", nonlinearity="auto", '
            f"embedding={embedding_std(ctx.model):.3g})",
        ),
        *_lsuv(fix, ctx),
    ]


def _lsuv(fix: Fix, ctx: Context) -> list[Candidate]:
    try:
        inputs = ctx.tensor_inputs("LSUV")
    except NotApplicable:
        return []
    return [
        Candidate(
            "LSUV initialization",
            fix,
            lambda m: (lsuv_(m, inputs[:256], generator=ctx.generator()), m)[1],
            "steadygrad.init.lsuv_(model, x_batch)  # x_batch: a few hundred training inputs",
        )
    ]


@candidate("reinit", unprompted=True)
def _reinit_any(fix: Fix, ctx: Context) -> list[Candidate]:
    """Re-initialization is measured on every model: a model's own scheme is kept unless this beats it."""
    return _reinit_matched(Fix("reinit", {"scheme": "he_normal"}, "measured on every model"), ctx)


@candidate("reinit", unprompted=True)
def _fixup(fix: Fix, ctx: Context) -> list[Candidate]:
    """Fixup (Zhang et al. 2019) for a residual net without normalization."""
    structure = describe(ctx.model)
    if structure is None or structure.skip != "residual" or structure.normalized:
        return []
    return [
        Candidate(
            "Fixup initialization",
            Fix("reinit", {"scheme": "fixup"}),
            lambda m: fixup_(m, generator=ctx.generator()),
            "steadygrad.init.fixup_(model)",
        )
    ]


# -- residual-branch output scaling -------------------------------------------------------------------------------

_DEPTH = re.compile(r"\.(\d+)(?=\.|$)")


def residual_projections(model: nn.Module) -> list[str]:
    """The layers that write into a residual stream, found by structure: in each block of a repeated stack
    (``transformer.h.3``, ``encoder.layer.3``), the last weight layer of each sub-module with at least two weight
    layers (attention: Q/K/V then the output projection; the MLP: up then down). GPT-2's ``attn.c_proj`` and
    ``mlp.c_proj``, Llama's ``o_proj`` and ``down_proj``, T5's ``o`` and ``wo``."""
    weights = [
        n for n, m in model.named_modules() if kinds.is_weight_layer(m) and kinds.weight_family(m) != "embedding"
    ]
    groups: dict[str, list[str]] = {}
    for name in weights:
        match = list(_DEPTH.finditer(name))
        if not match:
            continue
        block_end = match[-1].end()
        rest = name[block_end + 1 :]
        if not rest:
            continue
        sub = rest.split(".")[0]
        groups.setdefault(name[:block_end] + "." + sub, []).append(name)
    return [names[-1] for names in groups.values() if len(names) >= 2]


@candidate("scale_residual", unprompted=True)
def _scale_residual(fix: Fix, ctx: Context) -> list[Candidate]:
    """Each of the N projections into the residual stream scaled by 1/sqrt(N), so the sum of N branches keeps the
    stream's variance O(1) with depth: GPT-2's 1/sqrt(2 L) for L blocks of two branches (Radford et al. 2019;
    Hanin & Rolnick 2018); an encoder-decoder's cross-attention branches count too."""
    names = residual_projections(ctx.model)
    if not names:
        return []
    factor = len(names) ** -0.5

    def make(model: nn.Module) -> nn.Module:
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name in names:
                modules[name].weight.mul_(factor)
        return model

    return [
        Candidate(
            f"scale the {len(names)} residual projections by 1/sqrt({len(names)})",
            Fix("scale_residual", {"factor": factor, "layers": names}),
            make,
            f"for name in {names[:2]!r} + ...:  # every projection into the residual stream\n"
            f"    model.get_submodule(name).weight.data.mul_({factor:.4g})",
        )
    ]


# -- training settings --------------------------------------------------------------------------------------------


def _same(model: nn.Module) -> nn.Module:
    return model


@candidate("clip", unprompted=True)
def _clip(fix: Fix, ctx: Context) -> list[Candidate]:
    t = ctx.clip_threshold
    return [
        Candidate(
            f"clip gradient norm at {t:.3g} (the control's median)",
            Fix("clip", {"mode": "norm", "threshold": t}),
            _same,
            f"steadygrad.clip.clip_grad_norm_(model.parameters(), {t:.3g})  # after loss.backward()",
            Changes(clip_norm=t),
        )
    ]


@candidate("agc", unprompted=True)
def _agc(fix: Fix, ctx: Context) -> list[Candidate]:
    return [
        Candidate(
            "adaptive gradient clipping (AGC, 0.01)",
            Fix("agc", {"clipping": 0.01}),
            _same,
            "steadygrad.clip.adaptive_clip_grad_(model.parameters(), 0.01)  # after loss.backward()",
            Changes(agc=0.01),
        )
    ]


@candidate("warmup", unprompted=True)
def _warmup(fix: Fix, ctx: Context) -> list[Candidate]:
    steps = max(2, round(ctx.steps * WARMUP_FRACTION))
    return [
        Candidate(
            f"learning-rate warmup over {steps} steps",
            Fix("warmup", {"steps": steps}),
            _same,
            f"scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / {steps}))"
            "  # scale the warmup to your run: a few % of its steps",
            Changes(warmup=steps),
        )
    ]


@candidate("lower_lr", unprompted=True)
def _lower_lr(fix: Fix, ctx: Context) -> list[Candidate]:
    return [
        Candidate("learning rate x 0.1", Fix("lower_lr"), _same, "lr = lr * 0.1  # in your optimizer", Changes(0.1))
    ]


@candidate("raise_lr", unprompted=True)
def _raise_lr(fix: Fix, ctx: Context) -> list[Candidate]:
    return [Candidate("learning rate x 10", Fix("raise_lr"), _same, "lr = lr * 10  # in your optimizer", Changes(10.0))]


def _is_adaptive(settings: Settings, model: nn.Module) -> bool:
    if isinstance(settings.optimizer, str):
        return settings.optimizer in ("adam", "adamw")
    try:  # the user's callable, on a stand-in parameter: its class is what tells
        made = settings.optimizer([nn.Parameter(torch.zeros(1))])
    except Exception:
        made = settings.optimizer(list(model.parameters()))
    return isinstance(made, torch.optim.Adam | torch.optim.AdamW)


@candidate("change_optimizer", unprompted=True)
def _change_optimizer(fix: Fix, ctx: Context) -> list[Candidate]:
    """Momentum SGD to AdamW, and AdamW (or Adam) to momentum SGD, at the other optimizer's conventional rate."""
    to = "momentum" if _is_adaptive(ctx.settings, ctx.model) else "adamw"
    lr = SWAPPED_LR[to]
    words = "SGD with momentum 0.9" if to == "momentum" else "AdamW"
    code = (
        f"torch.optim.SGD(model.parameters(), lr={lr:g}, momentum=0.9)"
        if to == "momentum"
        else f"torch.optim.AdamW(model.parameters(), lr={lr:g})"
    )
    return [
        Candidate(
            f"switch to {words} (lr {lr:g})",
            Fix("change_optimizer", {"to": to, "lr": lr}),
            _same,
            f"optimizer = {code}",
            Changes(optimizer=to),
        )
    ]


# -- structure-changing fixes, only where they apply --------------------------------------------------------------


@candidate("add_norm")
def _add_norm(fix: Fix, ctx: Context) -> list[Candidate]:
    if _has_norms(ctx.model):
        raise NotApplicable(
            "a norm after each layer: the model already has normalization layers; look at where they sit instead"
        )
    batch = Candidate(
        "insert BatchNorm after each layer",
        fix,
        lambda m: insert_norm(m, "batch"),
        'model = steadygrad.fixes.insert_norm(model, "batch")',
    )
    if sum(isinstance(m, nn.Linear) for m in ctx.model.modules()) < 2:
        return [batch]  # convolutions only (and a head): insert_norm's "layer" would put the same BatchNorms in
    return [
        batch,
        Candidate(
            "insert LayerNorm after each layer",
            fix,
            lambda m: insert_norm(m, "layer"),
            'model = steadygrad.fixes.insert_norm(model, "layer")',
        ),
    ]


@candidate("add_skips")
def _add_skips(fix: Fix, ctx: Context) -> list[Candidate]:
    structure = describe(ctx.model)
    spec = structure.spec if structure is not None else None
    if not isinstance(spec, NetSpec):
        raise NotApplicable(
            "residual skips: the model is not a steadygrad.build network, so they cannot be added "
            "automatically; add x + f(x) connections in its forward"
        )
    spec = spec.replace(skip="residual", residual_scale=spec.depth**-0.5)  # Hanin & Rolnick 2018
    return [
        Candidate(
            "residual skips (branches scaled by 1/sqrt(depth))",
            fix,
            lambda m: build(spec, ctx.generator()),
            f"model = steadygrad.build(spec.replace(skip='residual', residual_scale={spec.residual_scale:.3g}))",
        )
    ]


@candidate("rebuild")
def _rebuild(fix: Fix, ctx: Context) -> list[Candidate]:
    """A built network rebuilt with some spec fields changed (``Fix("rebuild", {"qk_norm": True})``): the
    transformer recipes (pre-LN, DeepNorm, a residual gate, QK norm) are spec fields, so trying one is a rebuild."""
    if not fix.params:
        raise NotApplicable("a rebuild names the NetSpec fields to change (Fix('rebuild', {'qk_norm': True}))")
    structure = describe(ctx.model)
    spec = structure.spec if structure is not None else None
    if not isinstance(spec, NetSpec):
        raise NotApplicable(
            f"rebuilding with {fix.params}: the model is not a steadygrad.build network; make the same change in "
            "its code"
        )
    try:
        changed = spec.replace(**fix.params)
    except ValueError as error:
        raise NotApplicable(f"rebuilding with {fix.params}: {error}") from None
    changes = ", ".join(f"{k}={v!r}" for k, v in fix.params.items())
    return [
        Candidate(
            f"rebuilt with {changes}",
            fix,
            lambda m: build(changed, ctx.generator()),
            f"model = steadygrad.build(spec.replace({changes}))",
        )
    ]


@candidate("standardize_inputs")
def _standardize_inputs(fix: Fix, ctx: Context) -> list[Candidate]:
    inputs = ctx.tensor_inputs("standardizing the inputs")
    return [
        Candidate(
            "standardize the inputs",
            fix,
            lambda m: standardize_inputs(m, inputs),
            "x = (x - x_train.mean(0)) / x_train.std(0)  "
            "# or: model = steadygrad.fixes.standardize_inputs(model, x_train)",
        )
    ]


@candidate("swap_activation")
def _swap_activation(fix: Fix, ctx: Context) -> list[Candidate]:
    to = fix.params.get("to", "relu")

    def make(model: nn.Module) -> nn.Module:
        model = swap_activation(model, to)
        with torch.no_grad():
            init_model(model, "he_normal", nonlinearity="auto", generator=ctx.generator())
        return model

    return [
        Candidate(
            f"swap sigmoid/tanh for {to} (and re-initialize)",
            fix,
            make,
            f'model = steadygrad.fixes.swap_activation(model, "{to}")\n'
            'steadygrad.init.init_model(model, "he_normal", nonlinearity="auto")',
        )
    ]


def _remove_bias_before_norm(model: nn.Module, layers: list[str]) -> nn.Module:
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    for name in layers:
        if name in modules and getattr(modules[name], "bias", None) is not None:
            modules[name].register_parameter("bias", None)
    return model


@candidate("remove_bias")
def _remove_bias(fix: Fix, ctx: Context) -> list[Candidate]:
    layers = list(fix.params.get("layers", []))
    return [
        Candidate(
            "drop the bias before each BatchNorm",
            fix,
            lambda m: _remove_bias_before_norm(m, layers),
            f"# construct {', '.join(layers)} with bias=False",
        )
    ]


def candidates_for(findings: list[Finding], ctx: Context) -> tuple[list[Candidate], list[str]]:
    """The candidates the findings ask for, in the order of the first finding that asks for each action (most
    severe first), then the unprompted ones; a name is tried once, and a candidate a finding asked for is marked
    ``prompted``."""
    wanted: dict[str, Fix] = {}
    for finding in findings:
        for fix in finding.fixes:
            wanted.setdefault(fix.action, fix)
    proposals = [(_BUILDERS[action], fix, True) for action, fix in wanted.items() if action in _BUILDERS]
    proposals += [(builder, Fix(action), action in wanted) for action, builder in _UNPROMPTED]
    out: list[Candidate] = []
    skipped: list[str] = []
    for builder, fix, prompted in proposals:
        try:
            built = builder(fix, ctx)
        except NotApplicable as why:
            skipped.append(str(why))
            continue
        for c in built:
            if c.name not in {known.name for known in out}:
                c.prompted = prompted
                out.append(c)
    return out, skipped


def check_registry() -> list[str]:
    """The actions with no builder (a test keeps this empty)."""
    have = set(_BUILDERS) | {a for a, _ in _UNPROMPTED}
    return [a for a in ACTIONS if a not in have]
