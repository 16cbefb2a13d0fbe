"""The doctor: diagnose a model, try each candidate fix on a copy, and recommend the one that measurably works.

    report = steadygrad.doctor(make_model, inputs=x, targets=y)   # the function; this module is steadygrad.doctor
    print(report.summary()); print(report.patch())

Every candidate is applied to a deep copy of a freshly built model and measured the same way as the
unchanged model (the control): a probe for the gradient flow, then the same optimizer steps on the same
batches from the same seed. The user's model object is never modified.

The findings come from ``steadygrad.diagnose`` (all the rules live there). Each ``Fix`` action a finding
names has one candidate builder here, registered with ``@candidate(action)``: adding a fix is its name in
``steadygrad.diagnose.ACTIONS`` plus one registered builder (a test checks that the two agree).
"""

from __future__ import annotations

import copy
import itertools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from steadygrad import _keras
from steadygrad.clip import clip_grad_norm_, grad_norm
from steadygrad.diagnose import (
    ACTIONS,
    SEVERITIES,
    Finding,
    Fix,
    architecture_findings,
    diagnose,
    recurrent_findings,
)
from steadygrad.fixes import init_matched, insert_norm, standardize_inputs, swap_activation
from steadygrad.init import fixup_, lsuv_
from steadygrad.losses import resolve_loss
from steadygrad.measure import probe
from steadygrad.nets import NetSpec, build
from steadygrad.optimizers import OPTIMIZERS, make_optimizer
from steadygrad.structure import describe

__all__ = ["Candidate", "DoctorReport", "Trial", "doctor"]

IMPROVEMENT = 0.1  # a fix is recommended only if its final loss is at least 10% below the control's


# -- candidates and trials ----------------------------------------------------------------------------


@dataclass
class Candidate:
    """A fix to try: how to make the model (and training settings) it describes, and its patch."""

    name: str
    fix: Fix
    make: Callable[[nn.Module], nn.Module]  # fresh model -> fixed model
    patch: str  # Python a user can paste
    lr_factor: float = 1.0
    clip_norm: float | None = None


@dataclass
class Trial:
    """One candidate (or the control) measured: gradient flow at start, then ``steps`` optimizer steps."""

    fix: str
    initial_loss: float = math.nan
    final_loss: float = math.nan
    loss_drop: float = math.nan  # 1 - final / initial
    grad_ratio: float = math.nan  # first-layer / last-layer gradient norm at the start
    nonfinite: int = 0  # steps whose loss or gradient was NaN/Inf (the trial stops at the first)
    seconds: float = 0.0
    steps: int = 0
    losses: list[float] = field(default_factory=list, repr=False)
    grad_norms: list[float] = field(default_factory=list, repr=False)
    patch: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.nonfinite == 0 and math.isfinite(self.final_loss)

    def to_dict(self) -> dict:
        def clean(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return {
            "fix": self.fix,
            "initial_loss": clean(self.initial_loss),
            "final_loss": clean(self.final_loss),
            "loss_drop": clean(self.loss_drop),
            "grad_ratio": clean(self.grad_ratio),
            "nonfinite": self.nonfinite,
            "seconds": self.seconds,
            "steps": self.steps,
            "patch": self.patch,
            "error": self.error,
        }


@dataclass
class DoctorReport:
    findings: list[Finding]
    control: Trial
    candidates: list[Trial]  # best first
    skipped: list[str] = field(default_factory=list)  # candidates not run (budget) or not applicable, with why
    seconds: float = 0.0
    loss_name: str = ""  # the loss every trial measured and trained, in words (steadygrad.losses)

    @property
    def recommended(self) -> Trial | None:
        """The best candidate, if it beats the control by the required margin (or the control diverged)."""
        for trial in self.candidates:
            if not trial.ok:
                return None
            if not self.control.ok or trial.final_loss < (1 - IMPROVEMENT) * self.control.final_loss:
                return trial
            return None
        return None

    def summary(self) -> str:
        lines = [str(f) for f in self.findings] or ["No findings: the gradient flow and the inputs look healthy."]
        best = self.recommended
        if best is not None:
            lines.append(
                f"Recommended: {best.fix} (final loss {best.final_loss:.4g} against the control's "
                f"{self.control.final_loss:.4g})."
            )
        elif self.candidates:
            lines.append("No candidate fix beat the unchanged model by 10%: no change recommended.")
        else:
            lines.append("No change recommended.")
        return "\n".join(lines)

    def patch(self) -> str:
        best = self.recommended
        return best.patch if best is not None else ""

    def to_dict(self) -> dict:
        return {
            "findings": [f.to_dict() for f in self.findings],
            "control": self.control.to_dict(),
            "candidates": [t.to_dict() for t in self.candidates],
            "recommended": None if self.recommended is None else self.recommended.fix,
            "patch": self.patch(),
            "skipped": self.skipped,
            "seconds": self.seconds,
            "loss_name": self.loss_name,
        }


def _run_trial(name, model, batches, task, steps, lr, optimizer, clip_norm, patch, deadline) -> Trial:
    trial = Trial(name, patch=patch)
    start = time.perf_counter()
    try:
        x0, y0 = batches[0]
        flow = probe(model, x0, y0, task=task, theory_prediction=False)
        trial.grad_ratio = flow.gradient_ratio
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(optimizer, params, lr)
        model.train()
        for step, (x, y) in zip(range(steps), itertools.cycle(batches), strict=False):
            opt.zero_grad(set_to_none=True)
            output = model(x, **_keras.call_kwargs(model, "train"))  # Keras: training=True (model.train() is torch's)
            loss = resolve_loss(output, y, task=task)  # the probe's loss, so the trial trains what it measured
            if not torch.isfinite(loss):
                trial.nonfinite += 1
                break
            loss.backward()
            norm = clip_grad_norm_(params, clip_norm) if clip_norm is not None else grad_norm(params)
            trial.grad_norms.append(float(norm))
            opt.step()
            trial.losses.append(float(loss.detach()))
            trial.steps = step + 1
            if time.perf_counter() > deadline:
                break
        if trial.losses and not trial.nonfinite:
            trial.initial_loss = trial.losses[0]
            trial.final_loss = statistics.mean(trial.losses[-5:])
            trial.loss_drop = 1 - trial.final_loss / trial.initial_loss if trial.initial_loss > 0 else math.nan
    except Exception as error:  # a fix that does not fit this model is reported, not fatal
        trial.error = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
    trial.seconds = time.perf_counter() - start
    return trial


# -- findings ------------------------------------------------------------------------------------------


def _findings(
    model: nn.Module, preflight, inputs: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, task: str
) -> list[Finding]:
    """Every rule of ``steadygrad.diagnose`` that applies: the records' rules, the structural ones and, for a
    recurrent model, the gradient along time; most severe first (stable, so rule order breaks ties)."""
    findings = diagnose(preflight, model=model, inputs=inputs) + architecture_findings(model)
    if not (isinstance(inputs, torch.Tensor) and inputs.is_floating_point() and inputs.dim() == 3):
        # diagnose measured the gradient along time on ``inputs`` with the projection loss; otherwise the
        # doctor's own batch and training loss do
        findings += recurrent_findings(model, x0, lambda out: resolve_loss(out, y0, task=task))
    findings.sort(key=lambda f: -SEVERITIES.index(f.severity))
    return findings


# -- from findings to candidates: one builder per Fix action ----------------------------------------------


class NotApplicable(Exception):
    """Raised by a candidate builder when its fix cannot be applied to this model automatically; the message
    (what to do by hand) goes to the report's ``skipped``."""


@dataclass
class _Context:
    """What a candidate builder may read: the freshly built model (to decide, not to modify), the inputs,
    the clipping threshold measured on the control, and the seed for the builders' generators."""

    model: nn.Module
    inputs: torch.Tensor
    clip_threshold: float
    seed: int

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


_Builder = Callable[[Fix, _Context], list[Candidate]]
_BUILDERS: dict[str, _Builder] = {}  # Fix action -> the builder of its candidates
_UNPROMPTED: list[tuple[str, _Builder]] = []  # (action, builder) tried whatever the findings ask; [] where unfit


def candidate(action: str, *, unprompted: bool = False) -> Callable[[_Builder], _Builder]:
    """Register ``builder(fix, context) -> [Candidate, ...]`` for the ``Fix`` action ``action``: adding a fix is
    this one registration (plus its name in ``steadygrad.diagnose.ACTIONS``). ``unprompted`` builders are not
    keyed by the action: they run after the prompted ones, on every model, with ``Fix(action)``."""
    if action not in ACTIONS:
        raise ValueError(
            f"Cannot register a candidate for the unknown fix action {action!r}. Accepted: {', '.join(ACTIONS)}; "
            "add a new action to steadygrad.diagnose.ACTIONS first."
        )

    def register(builder: _Builder) -> _Builder:
        if unprompted:
            _UNPROMPTED.append((action, builder))
        elif action in _BUILDERS:
            raise ValueError(f"A candidate builder for {action!r} is already registered: {_BUILDERS[action]}.")
        else:
            _BUILDERS[action] = builder
        return builder

    return register


@candidate("reinit")
def _reinit(fix: Fix, ctx: _Context) -> list[Candidate]:
    return [
        Candidate(
            "re-initialize matched to each activation",
            fix,
            lambda m: init_matched(m, ctx.generator()),
            "steadygrad.fixes.init_matched(model)  # He for ReLU-family, Glorot for tanh/sigmoid, LeCun for SELU",
        ),
        Candidate(
            "LSUV initialization",
            fix,
            lambda m: (lsuv_(m, ctx.inputs[:256], generator=ctx.generator()), m)[1],
            "steadygrad.init.lsuv_(model, x_batch)  # x_batch: a few hundred training inputs",
        ),
    ]


@candidate("add_norm")
def _add_norm(fix: Fix, ctx: _Context) -> list[Candidate]:
    return [
        Candidate(
            "insert BatchNorm after each layer",
            fix,
            lambda m: insert_norm(m, "batch"),
            'model = steadygrad.fixes.insert_norm(model, "batch")',
        ),
        Candidate(
            "insert LayerNorm after each layer",
            fix,
            lambda m: insert_norm(m, "layer"),
            'model = steadygrad.fixes.insert_norm(model, "layer")',
        ),
    ]


@candidate("add_skips")
def _add_skips(fix: Fix, ctx: _Context) -> list[Candidate]:
    structure = describe(ctx.model)
    spec = structure.spec if structure is not None else None
    if not isinstance(spec, NetSpec):
        raise NotApplicable(
            "residual skips: the model is not a steadygrad.build network, so they cannot be added "
            "automatically; add x + f(x) connections in its forward."
        )
    # branches scaled by 1/sqrt(depth) keep the sum's variance bounded with depth (Hanin & Rolnick 2018)
    spec = spec.replace(skip="residual", residual_scale=spec.depth**-0.5)
    return [
        Candidate(
            "residual skips (branches scaled by 1/sqrt(depth))",
            fix,
            lambda m: _rebuild(spec, ctx.generator()),
            f"model = steadygrad.build(spec.replace(skip='residual', residual_scale={spec.residual_scale:.3g}))",
        )
    ]


@candidate("clip")
def _clip(fix: Fix, ctx: _Context) -> list[Candidate]:
    t = ctx.clip_threshold
    return [
        Candidate(
            f"clip gradient norm at {t:.3g}",
            fix,
            lambda m: m,
            f"steadygrad.clip.clip_grad_norm_(model.parameters(), {t:.3g})  # after loss.backward()",
            clip_norm=t,
        )
    ]


@candidate("lower_lr")
def _lower_lr(fix: Fix, ctx: _Context) -> list[Candidate]:
    return [Candidate("learning rate / 10", fix, lambda m: m, "lr = lr / 10  # in your optimizer", lr_factor=0.1)]


@candidate("raise_lr")
def _raise_lr(fix: Fix, ctx: _Context) -> list[Candidate]:
    return [Candidate("learning rate x 10", fix, lambda m: m, "lr = lr * 10  # in your optimizer", lr_factor=10.0)]


@candidate("standardize_inputs")
def _standardize_inputs(fix: Fix, ctx: _Context) -> list[Candidate]:
    return [
        Candidate(
            "standardize the inputs",
            fix,
            lambda m: standardize_inputs(m, ctx.inputs),
            "x = (x - x_train.mean(0)) / x_train.std(0)  "
            "# or: model = steadygrad.fixes.standardize_inputs(model, x_train)",
        )
    ]


@candidate("swap_activation")
def _swap_activation(fix: Fix, ctx: _Context) -> list[Candidate]:
    to = fix.params.get("to", "relu")
    return [
        Candidate(
            f"swap sigmoid/tanh for {to} (and re-initialize)",
            fix,
            lambda m: init_matched(swap_activation(m, to), ctx.generator()),
            f'model = steadygrad.fixes.swap_activation(model, "{to}"); steadygrad.fixes.init_matched(model)',
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
def _remove_bias(fix: Fix, ctx: _Context) -> list[Candidate]:
    layers = list(fix.params.get("layers", []))
    return [
        Candidate(
            "drop the bias before each BatchNorm",
            fix,
            lambda m: _remove_bias_before_norm(m, layers),
            f"# construct {', '.join(layers)} with bias=False",
        )
    ]


@candidate("reinit", unprompted=True)
def _fixup(fix: Fix, ctx: _Context) -> list[Candidate]:
    """Fixup (Zhang et al. 2019) for a residual net without normalization, whatever the findings say."""
    model = ctx.model
    structure = describe(model)
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


def _candidates(
    findings: list[Finding], model: nn.Module, inputs: torch.Tensor, clip_threshold: float, generator_seed: int
) -> tuple[list[Candidate], list[str]]:
    """The candidates the findings ask for, in the order of the first finding that asks for each action (the
    findings come most severe first), then the unprompted ones; a name is tried once."""
    wanted: dict[str, Fix] = {}
    for finding in findings:
        for fix in finding.fixes:
            wanted.setdefault(fix.action, fix)
    ctx = _Context(model, inputs, clip_threshold, generator_seed)
    proposals = [(_BUILDERS[action], fix) for action, fix in wanted.items()]
    proposals += [(builder, Fix(action)) for action, builder in _UNPROMPTED]
    candidates: list[Candidate] = []
    skipped: list[str] = []
    for builder, fix in proposals:
        try:
            built = builder(fix, ctx)
        except NotApplicable as why:
            skipped.append(str(why))
            continue
        for c in built:
            if c.name not in {known.name for known in candidates}:
                candidates.append(c)
    return candidates, skipped


# the fixes that change how a model is trained, not the model: the only ones the doctor can try on a Keras model,
# whose layers steadygrad.fixes (torch module surgery) cannot rewrite
_TRAINING_SETTINGS = frozenset({"clip", "lower_lr", "raise_lr"})


def _keras_applicable(candidates: list[Candidate], skipped: list[str]) -> list[Candidate]:
    """The candidates a Keras model can take; the others go to ``skipped`` with what to do in Keras instead."""
    for c in candidates:
        if c.fix.action not in _TRAINING_SETTINGS:
            advice = _keras.FIX_ADVICE.get(c.fix.action, "apply it in the Keras model's definition")
            skipped.append(
                f"{c.name}: not tried, steadygrad's fixes rewrite torch modules, not Keras layers; {advice}."
            )
    return [c for c in candidates if c.fix.action in _TRAINING_SETTINGS]


def _rebuild(spec, generator):
    return build(spec, generator)


# -- the doctor ------------------------------------------------------------------------------------------


def _synthetic_targets(inputs: torch.Tensor, task: str, classes: int | None, seed: int) -> torch.Tensor:
    """Learnable targets for synthetic inputs: a fixed random teacher (linear for classes, tanh for regression)."""
    g = torch.Generator().manual_seed(seed + 1)
    flat = inputs.reshape(inputs.shape[0], -1)
    if task == "classification":
        return (flat @ torch.randn(flat.shape[1], classes or 10, generator=g)).argmax(1)
    return torch.tanh(flat @ torch.randn(flat.shape[1], generator=g) / math.sqrt(flat.shape[1]))


def doctor(
    model_factory: Callable[[], nn.Module] | nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor | None = None,
    task: str | None = None,
    classes: int | None = None,
    steps: int = 60,
    batch_size: int = 32,
    lr: float = 1e-2,
    optimizer: str = "momentum",
    budget: float = 60.0,
    seed: int = 0,
) -> DoctorReport:
    """Diagnose the model ``model_factory()`` builds, try the candidate fixes, rank them by measured effect.

    Args:
        model_factory: a callable returning a fresh ``nn.Module`` (called once per trial, under the same seed),
            or a module (deep-copied for each trial; never modified).
        inputs: a batch of training inputs, (N, *input_shape); at least ``batch_size``.
        targets: class labels (int) or regression targets; None makes learnable synthetic ones.
        task: ``classification`` or ``regression``; inferred from ``targets`` (or ``classes``) when None.
        classes: number of classes for synthetic classification targets.
        steps: optimizer steps per trial, over the same fixed batches.
        lr, optimizer: the training settings every trial uses: ``momentum`` (SGD with momentum 0.9, the default:
            the classic setting where bad scales bite), ``sgd``, ``adam`` or ``adamw`` (whose per-parameter step
            sizes hide some problems, clipping's effect among them); ``steadygrad.optimizers`` builds them.
        budget: seconds for all trials together; candidates left when it runs out are listed as skipped.
        seed: seeds the model factory, the batches and the synthetic targets.
    """
    start = time.perf_counter()
    deadline = start + budget
    if isinstance(model_factory, nn.Module):
        template = model_factory

        def fresh() -> nn.Module:
            return copy.deepcopy(template)

    elif callable(model_factory):

        def fresh() -> nn.Module:
            with torch.random.fork_rng(devices=[]), _keras.seeded(seed):  # Keras' initializers: Python's random
                torch.manual_seed(seed)
                model = model_factory()
            if not isinstance(model, nn.Module):
                raise TypeError(f"The model factory returned {type(model).__name__}, not an nn.Module.")
            return model

    else:
        raise TypeError(
            f"doctor needs a model factory (a callable returning an nn.Module) or a module; got "
            f"{type(model_factory).__name__}."
        )
    if task is None:
        task = (
            ("classification" if not targets.is_floating_point() else "regression")
            if targets is not None
            else ("classification" if classes else "regression")
        )
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}. Accepted: {', '.join(OPTIMIZERS)}.")
    if task not in ("classification", "regression"):
        raise ValueError(f"Unknown task {task!r}. Accepted: classification, regression.")
    if inputs.shape[0] < 2:
        raise ValueError(f"The doctor needs at least 2 input examples; got {inputs.shape[0]}.")
    if targets is None:
        targets = _synthetic_targets(inputs, task, classes, seed)
    elif len(targets) != len(inputs):
        raise ValueError(f"targets has {len(targets)} entries for {len(inputs)} inputs.")
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    batch_size = min(batch_size, len(inputs))
    batches = [(inputs[i], targets[i]) for i in order[: 8 * batch_size].split(batch_size) if len(i) >= 2]

    model = fresh()
    x0, y0 = batches[0]
    preflight = probe(model, x0, y0, task=task, theory_prediction=False)
    findings = _findings(model, preflight, inputs, x0, y0, task)
    control = _run_trial("unchanged model (control)", fresh(), batches, task, steps, lr, optimizer, None, "", math.inf)
    norms = [n for n in control.grad_norms if math.isfinite(n) and n > 0]
    threshold = statistics.median(norms) if norms else 1.0
    candidates, skipped = _candidates(findings, model, inputs, threshold, seed)
    if _keras.is_keras_layer(model):
        candidates = _keras_applicable(candidates, skipped)
    trials = []
    for candidate in candidates:
        if time.perf_counter() > deadline:
            skipped.append(f"{candidate.name}: the --budget of {budget:g} s ran out before it could run.")
            continue
        try:
            fixed = candidate.make(fresh())
        except Exception as error:
            skipped.append(
                f"{candidate.name}: does not apply to this model ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:200]})."
            )
            continue
        trials.append(
            _run_trial(
                candidate.name,
                fixed,
                batches,
                task,
                steps,
                lr * candidate.lr_factor,
                optimizer,
                candidate.clip_norm,
                candidate.patch,
                deadline,
            )
        )
    trials.sort(key=lambda t: (not t.ok, t.final_loss if t.ok else math.inf))
    return DoctorReport(findings, control, trials, skipped, time.perf_counter() - start, preflight.loss_name)
