"""``doctor()``: diagnose the user's model on the user's data, try every candidate fix over several seeds, and
rank them on held-out loss against the unchanged model (the control)."""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from steadygrad import _keras
from steadygrad.diagnose import SEVERITIES, Finding, Fix, architecture_findings, diagnose, recurrent_findings
from steadygrad.doctor._candidates import Candidate, Context, candidates_for
from steadygrad.doctor._data import Batch, split_data, teacher_targets
from steadygrad.doctor._report import MARGIN, DoctorReport, Trial
from steadygrad.doctor._trial import PRECISIONS, Changes, Repeat, Settings, autocast, run_repeat
from steadygrad.doctor._workers import available_workers, run_all
from steadygrad.losses import own_loss, resolve_loss_named
from steadygrad.measure import probe
from steadygrad.measure.probe import call_model
from steadygrad.optimizers import OPTIMIZERS

__all__ = ["UserCodeError", "doctor"]

DEFAULT_LR = {"sgd": 1e-2, "momentum": 1e-2, "adam": 1e-3, "adamw": 1e-3}
NOT_LEARNING = 0.02  # the control's held-out loss is less than 2% below the prior's (``prior_loss``)


def _factory(model_factory, seed_offset: int = 0) -> Callable[[int], nn.Module]:
    if isinstance(model_factory, nn.Module):
        template = model_factory

        def fresh(seed: int) -> nn.Module:
            return copy.deepcopy(template)

        return fresh
    if not callable(model_factory):
        raise TypeError(
            f"doctor needs a model factory (a callable returning an nn.Module) or a module; got "
            f"{type(model_factory).__name__}."
        )

    def fresh(seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]), _keras.seeded(seed):  # Keras' initializers: Python's random
            torch.manual_seed(seed)
            model = model_factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"The model factory returned {type(model).__name__}, not an nn.Module.")
        return model

    return fresh


class UserCodeError(ValueError):
    """The user's model or loss raised on the first batch; ``__cause__`` is their exception (the CLI shows its
    traceback lines from the user's files) and ``what`` says where, without the exception's text."""

    def __init__(self, what: str, error: BaseException):
        super().__init__(f"{what}: {type(error).__name__}: {error}")
        self.what = what


def _describe(inputs) -> str:
    if isinstance(inputs, torch.Tensor):
        return f"a {str(inputs.dtype).removeprefix('torch.')} tensor of shape {tuple(inputs.shape)}"
    if isinstance(inputs, dict):
        return "keywords " + ", ".join(
            f"{k}={tuple(v.shape)}" if isinstance(v, torch.Tensor) else k for k, v in inputs.items()
        )
    return type(inputs).__name__


def _check_loss(model: nn.Module, batch: Batch, settings: Settings) -> tuple[object, str]:
    """The model's output on the first batch and the loss's name; a loss that cannot train is a ValueError."""
    with torch.no_grad(), autocast(settings.precision):
        try:
            output = call_model(model, batch.inputs, **_keras.call_kwargs(model, "train"))
        except Exception as error:
            raise UserCodeError(f"The model rejects the first batch ({_describe(batch.inputs)})", error) from error
        if batch.targets is None and settings.loss is None and own_loss(output) is None:
            return output, ""  # synthetic targets are needed
        try:
            value, name = resolve_loss_named(output, batch.targets, loss=settings.loss, task=settings.task)
        except Exception as error:
            if settings.loss is None and isinstance(error, ValueError):
                raise  # steadygrad's own loss said what does not match, and how to fix it
            raise UserCodeError("loss= raised on the first batch", error) from error
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        if isinstance(value, torch.Tensor):
            raise ValueError(f"The loss ({name}) returned {shape}, not a scalar: reduce it (mean) in loss=.")
        raise ValueError(
            f"The loss ({name}) returned a {shape}, not a tensor: return a 0-d tensor built from the output."
        )
    if not torch.isfinite(value):
        from steadygrad.losses import tensors

        if all(torch.isfinite(t).all() for t in tensors(output) if t.is_floating_point()):
            raise ValueError(
                f"The loss ({name}) is {float(value)} on the first batch while the model's outputs are finite: "
                "check loss= and the targets."
            )
    return output, name


def prior_loss(split, loss_name: str) -> float:
    """The held-out loss of predicting without the inputs: the training labels' frequencies under cross-entropy,
    the training targets' mean under MSE; NaN for another loss. A model no better than this learned nothing from
    its inputs (it may still have learned the label prior, which is why the drop from the initial loss is not
    the test)."""
    train = [b.targets for b in split.train if b.targets is not None]
    held = [b.targets for b in split.held_out if b.targets is not None]
    if not train or not held or len(held) != len(split.held_out):
        return math.nan
    if loss_name.startswith("cross-entropy") and not train[0].is_floating_point():
        y, h = torch.cat([t.reshape(-1) for t in train]), torch.cat([t.reshape(-1) for t in held])
        y, h = y[y >= 0], h[h >= 0]
        if not len(y) or not len(h) or int(h.max()) >= 1 << 20:
            return math.nan
        counts = torch.bincount(y, minlength=int(max(y.max(), h.max())) + 1).double() + 0.5  # add-half smoothing
        return float(-(counts / counts.sum()).log()[h].mean())
    if loss_name.startswith("mean squared") and train[0].is_floating_point():
        mean = torch.cat([t.reshape(len(t), -1) for t in train]).mean(0)
        return float(torch.cat([(t.reshape(len(t), -1) - mean) ** 2 for t in held]).mean())
    return math.nan


def _control_findings(control: Trial, prior: float) -> list[Finding]:
    """What the control's own training shows: a divergence, or a held-out loss no better than the prior's
    (``prior_loss``; without one, a held-out loss that did not fall)."""
    bad = [r for r in control.repeats if r.nonfinite_step is not None]
    if bad:
        return [
            Finding(
                "training_diverged",
                "critical",
                [],
                {"repeats": len(bad), "first_step": min(r.nonfinite_step for r in bad)},
                f"The unchanged model's training hit NaN/Inf (at step {min(r.nonfinite_step for r in bad)}, in "
                f"{len(bad)} of {len(control.repeats)} seeds) at these settings.",
                [Fix("warmup"), Fix("lower_lr"), Fix("clip"), Fix("agc")],
            )
        ]
    reference = prior if math.isfinite(prior) else control.initial_loss
    if control.ok and reference > 0:
        drop = 1 - control.held_out_loss / reference
        if drop < NOT_LEARNING:
            against = "the loss of predicting without the inputs" if math.isfinite(prior) else "its initial loss"
            return [
                Finding(
                    "not_learning",
                    "warning",
                    [],
                    {
                        "initial_held_out_loss": control.initial_loss,
                        "held_out_loss": control.held_out_loss,
                        "prior_loss": None if math.isnan(prior) else prior,
                    },
                    f"The unchanged model learned little from its inputs in {control.steps} steps at these settings: "
                    f"its held-out loss after them, "
                    f"steps, {control.held_out_loss:.4g}, is not {NOT_LEARNING:.0%} below {against} "
                    f"({reference:.4g}).",
                    [Fix("warmup"), Fix("lower_lr"), Fix("raise_lr"), Fix("change_optimizer")],
                )
            ]
    return []


def _findings(model: nn.Module, batch: Batch, settings: Settings) -> list[Finding]:
    preflight = probe(
        model, batch.inputs, batch.targets, loss=settings.loss, task=settings.task, theory_prediction=False
    )
    inputs = batch.inputs
    findings = diagnose(preflight, model=model, inputs=inputs) + architecture_findings(model)
    # diagnose measured the gradient along time on 3-d float inputs itself (the projection loss); otherwise the
    # doctor's batch and training loss do, for an nn.RNN/LSTM/GRU
    if isinstance(inputs, torch.Tensor) and not (inputs.is_floating_point() and inputs.dim() == 3):
        findings += recurrent_findings(
            model,
            inputs,
            lambda out: resolve_loss_named(out, batch.targets, loss=settings.loss, task=settings.task)[0],
        )
    return findings


# What only shows once a model has trained: a post-LN stack's bottom cut off from the gradient, a stream that
# compounds, attention collapsed onto single keys (the preflight probe sees the model at initialization)
AFTER_TRAINING = ("post_ln_vanishing_gradient", "residual_stream_growth", "attention_entropy_collapse")


def _after_training(
    model: nn.Module, batch: Batch, settings: Settings, steps: int, before: list[Finding]
) -> list[Finding]:
    """The ``AFTER_TRAINING`` findings of a probe of the control's model after its training steps, that the
    preflight probe did not already make; their messages say when they were measured. (Non-finite trained weights
    are recorded as such, never raised; the preflight probe has already run this model and batch.)"""
    report = probe(model, batch.inputs, batch.targets, loss=settings.loss, task=settings.task, theory_prediction=False)
    seen = {f.kind for f in before}
    return [
        dataclasses.replace(finding, message=f"After the control's {steps} training steps: {finding.message}")
        for finding in diagnose(report, model=model)
        if finding.kind in AFTER_TRAINING and finding.kind not in seen
    ]


def _sort(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: -SEVERITIES.index(f.severity))


def doctor(
    model_factory: Callable[[], nn.Module] | nn.Module,
    inputs=None,
    targets: torch.Tensor | None = None,
    task: str | None = None,
    classes: int | None = None,
    steps: int = 60,
    batch_size: int = 32,
    lr: float | None = None,
    optimizer: str | Callable = "momentum",
    budget: float = 60.0,
    seed: int = 0,
    *,
    data=None,
    loss: Callable | None = None,
    schedule: Callable | None = None,
    precision: str = "float32",
    repeats: int = 3,
    workers: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> DoctorReport:
    """Diagnose the model ``model_factory()`` builds, try the candidate fixes, rank them on held-out loss.

    Every trial (the control and each candidate) builds a fresh model under the repeat's seed, applies its fix,
    trains ``steps`` steps on the training batches and is scored on held-out batches it never trained on; each is
    repeated over ``repeats`` seeds. The recommendation rule is in ``steadygrad.doctor._report`` (and the README):
    better by ``MARGIN`` on held-out loss in every seed, on a model that needs a fix.

    Args:
        model_factory: a callable returning a fresh ``nn.Module`` (called under each repeat's seed), or a module
            (deep-copied for each trial; never modified).
        inputs, targets: the data as two tensors (or give ``data``).
        task: ``classification`` or ``regression`` for the targets' loss; inferred when None.
        classes: for synthetic targets, classification (the classes are the model's outputs).
        steps: optimizer steps per trial.
        batch_size: examples per batch when the data are in-memory rows or a Dataset.
        lr: the learning rate of a named optimizer (default: 1e-2 for sgd/momentum, 1e-3 for adam/adamw).
        optimizer: ``momentum`` (SGD, 0.9), ``sgd``, ``adam``, ``adamw``, or a callable ``params -> Optimizer``
            with the user's own settings (lr, weight decay, betas).
        budget: seconds for everything; repeats, then candidates, are cut to fit, and the report says so.
        seed: the first repeat's seed (the others follow it); also the data split and the synthetic targets.
        data: a tensor, ``(inputs, targets)``, a dict of tensors, a ``Dataset``, a ``DataLoader`` or any iterable
            of batches (a tensor, a pair, or a dict: Hugging Face batches with ``labels`` train the model's own
            loss). The last ~20% (at least one batch) is held out.
        loss: ``loss(output, targets)`` (``loss(output)`` without targets); else the model's own ``output.loss``,
            else cross-entropy or MSE on the targets (``steadygrad.losses``).
        schedule: ``schedule(optimizer) -> LRScheduler``, stepped after each optimizer step.
        precision: ``float32`` or ``bf16`` (CPU autocast of the forward and the loss).
        repeats: seeds per trial (3): a fix must win in every one.
        workers: processes running trials in parallel (default: the cores available; 1 runs in this process).
        progress: ``progress(done, total, trial_name)`` after each trial repeat.
    """
    start = time.time()
    deadline = start + budget
    if isinstance(optimizer, str) and optimizer not in OPTIMIZERS:
        raise ValueError(
            f"Unknown optimizer {optimizer!r}. Accepted: {', '.join(OPTIMIZERS)}, or a callable params -> Optimizer."
        )
    if not isinstance(optimizer, str) and not callable(optimizer):
        raise TypeError(f"optimizer must be a name ({', '.join(OPTIMIZERS)}) or a callable; got {optimizer!r}.")
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}. Accepted: {', '.join(PRECISIONS)}.")
    if task not in (None, "classification", "regression"):
        raise ValueError(f"Unknown task {task!r}. Accepted: classification, regression.")
    if repeats < 1 or steps < 1:
        raise ValueError(f"repeats and steps must be at least 1; got repeats={repeats}, steps={steps}.")
    if data is None:
        if inputs is None:
            raise ValueError("Give the data: data=(inputs, targets), a Dataset, a DataLoader, or inputs=.")
        data = inputs if targets is None else (inputs, targets)
    elif inputs is not None:
        raise ValueError("Give either data= or inputs=/targets=, not both.")
    if task is None and classes:
        task = "classification"
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], torch.Tensor) and task is None:
        task = "regression" if data[1].is_floating_point() else "classification"
    if isinstance(optimizer, str) and lr is None:
        lr = DEFAULT_LR[optimizer]
    settings = Settings(optimizer, lr, schedule, steps, precision, loss, task)
    fresh = _factory(model_factory)
    split = split_data(data, batch_size, seed)
    notes = [f"data: {split.description}."]
    if precision != "float32":
        notes.append(f"precision: {precision} autocast in every trial's forward and loss (the probe runs in float32).")

    model = fresh(seed)
    output, loss_name = _check_loss(model, split.train[0], settings)
    if not loss_name:
        split, words = teacher_targets(split, output, task, seed)
        notes.append(words + ".")
        if task is None:
            task = "classification" if split.train[0].targets.dtype == torch.long else "regression"
            settings = Settings(optimizer, lr, schedule, steps, precision, loss, task)
        _, loss_name = _check_loss(model, split.train[0], settings)
    findings = _findings(model, split.train[0], settings)

    contexts: list[Context] = []  # the builders' context, once made: a fix draws from the repeat's seed

    trained: list[nn.Module] = []  # the control's first model, after its training: what training made of it

    def repeat_of(candidate: Candidate | None, seed_r: int) -> tuple[Repeat, float]:
        fixed = fresh(seed_r)
        changes = Changes()
        if candidate is not None:
            contexts[0].seed = seed_r  # this process's copy (workers are forked): its builders' generators
            fixed = candidate.make(fixed)
            changes = candidate.changes
        ratio = math.nan
        if seed_r == seed:
            try:
                ratio = probe(
                    fixed, split.train[0].inputs, split.train[0].targets, loss=loss, task=task, theory_prediction=False
                ).gradient_ratio
            except Exception:  # the trial reports its own error
                ratio = math.nan
        result = run_repeat(fixed, split.train, split.held_out, settings, changes, seed_r, deadline)
        if candidate is None and seed_r == seed:
            trained.append(fixed)
        return result, ratio

    control = Trial("unchanged model (control)")
    first, control.grad_ratio = repeat_of(None, seed)
    control.repeats.append(first)
    if first.error:
        raise ValueError(f"The unchanged model could not be trained on this data: {first.error}")
    if first.ok:
        findings += _after_training(trained[0], split.train[0], settings, first.steps, findings)
    norms = [n for n in first.grad_norms if math.isfinite(n) and n > 0]
    ctx = Context(model, split.train[0].inputs, statistics.median(norms) if norms else 1.0, settings, seed, steps)
    contexts.append(ctx)
    candidates, skipped = candidates_for(_sort(findings), ctx)
    if _keras.is_keras_layer(model):
        candidates = _keras_applicable(candidates, skipped)
    candidates = _applicable(candidates, fresh, seed, split.train[0], settings, skipped)

    workers = available_workers() if workers is None else max(1, workers)
    if _keras.is_keras_layer(model):
        workers = 1  # Keras' global state is not forked safely
    per_run = max(first.seconds, 1e-3)
    left = deadline - time.time()
    slots = left * workers / per_run  # repeats that fit
    n = len(candidates)
    fit = max(1, min(repeats, int((slots + 1) // (n + 1)))) if n else repeats
    if fit < repeats:
        notes.append(f"{fit} seed(s) per trial, not {repeats}: the budget of {budget:g} s allowed no more.")
    keep = max(0, min(n, int((slots - (fit - 1)) // fit)))  # the control's other seeds run too
    for c in candidates[keep:]:
        skipped.append(f"{c.name}: the budget of {budget:g} s ran out before it could run.")
    candidates = candidates[:keep]
    trials = [Trial(c.name, c.fix.action, c.patch, c.prompted) for c in candidates]
    jobs = [(None, control, seed + r) for r in range(1, fit)] + [
        (c, t, seed + r) for r in range(fit) for c, t in zip(candidates, trials, strict=True)
    ]
    total = len(jobs) + 1
    if progress is not None:
        progress(1, total, control.fix)
    finished = [1]

    def done(index: int, result) -> None:
        finished[0] += 1
        if progress is not None:
            progress(finished[0], total, jobs[index][1].fix)

    results = run_all(lambda i: repeat_of(jobs[i][0], jobs[i][2]), len(jobs), workers, done)
    for (_, trial, _), (rep, ratio) in zip(jobs, results, strict=True):
        trial.repeats.append(rep)
        if math.isfinite(ratio):
            trial.grad_ratio = ratio
    for trial in [control, *trials]:
        trial.repeats.sort(key=lambda r: r.seed)
    prior = prior_loss(split, loss_name)
    findings = _sort(findings + _control_findings(control, prior))
    trials.sort(key=lambda t: (not t.ok, t.held_out_loss if t.ok else math.inf))
    return DoctorReport(
        findings,
        control,
        trials,
        skipped,
        time.time() - start,
        loss_name,
        repeats=fit,
        notes=notes,
        margin=MARGIN,
        prior_loss=prior,
    )


def _applicable(
    candidates: list[Candidate], fresh, seed: int, batch: Batch, settings: Settings, skipped: list[str]
) -> list[Candidate]:
    """The candidates whose fix can be applied and whose fixed model takes the batch; the others go to
    ``skipped`` with the error (a BatchNorm1d inserted into a model whose layers see (N, T, C) activations)."""
    kept = []
    for c in candidates:
        try:
            fixed = c.make(fresh(seed))
            with torch.no_grad(), autocast(settings.precision):
                call_model(fixed, batch.inputs, **_keras.call_kwargs(fixed, "eval"))
        except Exception as error:
            text = str(error).strip().splitlines()
            skipped.append(
                f"{c.name}: does not apply to this model ({type(error).__name__}: {text[0][:200] if text else ''})."
            )
            continue
        kept.append(c)
    return kept


# the fixes that change how a model is trained, not the model: the only ones the doctor can try on a Keras model,
# whose layers steadygrad.fixes (torch module surgery) cannot rewrite
_TRAINING_SETTINGS = frozenset({"clip", "lower_lr", "raise_lr", "warmup", "agc", "change_optimizer"})


def _keras_applicable(candidates: list[Candidate], skipped: list[str]) -> list[Candidate]:
    for c in candidates:
        if c.fix.action not in _TRAINING_SETTINGS:
            advice = _keras.FIX_ADVICE.get(c.fix.action, "apply it in the Keras model's definition")
            skipped.append(
                f"{c.name}: not tried, steadygrad's fixes rewrite torch modules, not Keras layers; {advice}."
            )
    return [c for c in candidates if c.fix.action in _TRAINING_SETTINGS]
