"""One trial repeat: a freshly built (and possibly fixed) model trained for a few steps under the user's
optimizer, schedule and precision, then scored on the held-out batches it never trained on."""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from steadygrad import _keras
from steadygrad.clip import adaptive_clip_grad_, clip_grad_norm_, grad_norm
from steadygrad.doctor._data import Batch
from steadygrad.losses import resolve_loss
from steadygrad.measure.probe import call_model
from steadygrad.optimizers import OPTIMIZERS, make_optimizer

__all__ = ["Changes", "Repeat", "Settings", "run_repeat"]

PRECISIONS = ("float32", "bf16")
# an optimizer swapped in by the optimizer-change candidate takes its conventional learning rate, not the user's
# (which was chosen for the other optimizer): AdamW 1e-3 (Kingma & Ba 2015's default), SGD with momentum 1e-2
SWAPPED_LR = {"adamw": 1e-3, "momentum": 1e-2}


@dataclass(frozen=True)
class Settings:
    """How every trial trains: the user's optimizer (a name of ``steadygrad.optimizers`` with ``lr``, or a
    callable ``params -> Optimizer`` with its own settings), an optional ``schedule(optimizer) -> LRScheduler``
    stepped after every optimizer step, the precision, the step count and the loss."""

    optimizer: str | Callable = "adamw"
    lr: float | None = 1e-3
    schedule: Callable | None = None
    steps: int = 60
    precision: str = "float32"
    loss: Callable | None = None
    task: str | None = None


@dataclass(frozen=True)
class Changes:
    """What a candidate changes in training (the model itself is changed by the candidate's ``make``)."""

    lr_factor: float = 1.0
    clip_norm: float | None = None
    agc: float | None = None  # adaptive gradient clipping's lambda (Brock et al. 2021)
    warmup: int = 0  # steps of linear learning-rate warmup
    optimizer: str | None = None  # swap the user's optimizer for this name, at SWAPPED_LR


@dataclass
class Repeat:
    """One seed of one trial."""

    seed: int
    held_out_loss: float = math.nan  # mean over the held-out batches after training
    initial_held_out_loss: float = math.nan  # the same before the first step
    losses: list[float] = field(default_factory=list)  # training loss per step
    grad_norms: list[float] = field(default_factory=list)  # before clipping
    nonfinite_step: int | None = None  # the first step whose loss or gradient was NaN/Inf (training stops)
    steps: int = 0
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.nonfinite_step is None and math.isfinite(self.held_out_loss)

    @property
    def final_loss(self) -> float:
        return statistics.mean(self.losses[-5:]) if self.losses else math.nan

    def to_dict(self) -> dict:
        def clean(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return {
            "seed": self.seed,
            "held_out_loss": clean(self.held_out_loss),
            "initial_held_out_loss": clean(self.initial_held_out_loss),
            "final_train_loss": clean(self.final_loss),
            "nonfinite_step": self.nonfinite_step,
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "error": self.error,
        }


def make_training_optimizer(settings: Settings, changes: Changes, params: list[nn.Parameter]):
    if changes.optimizer is not None:
        return make_optimizer(changes.optimizer, params, SWAPPED_LR[changes.optimizer] * changes.lr_factor)
    if callable(settings.optimizer):
        optimizer = settings.optimizer(params)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer= returned {type(optimizer).__name__}, not a torch.optim.Optimizer: give a callable "
                "params -> Optimizer, e.g. lambda p: torch.optim.AdamW(p, lr=3e-4)."
            )
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * changes.lr_factor
        return optimizer
    if settings.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"Unknown optimizer {settings.optimizer!r}. Accepted: {', '.join(OPTIMIZERS)}, or a callable "
            "params -> torch.optim.Optimizer."
        )
    return make_optimizer(settings.optimizer, params, settings.lr * changes.lr_factor)


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def batch_loss(model: nn.Module, batch: Batch, settings: Settings, mode: str) -> torch.Tensor:
    with autocast(settings.precision):
        output = call_model(model, batch.inputs, **_keras.call_kwargs(model, mode))
        loss = resolve_loss(output, batch.targets, loss=settings.loss, task=settings.task)
    return loss.float()


@torch.no_grad()
def held_out_loss(model: nn.Module, batches: list[Batch], settings: Settings) -> float:
    """The mean loss over the held-out batches, in eval mode (dropout off, batch norm on its running
    statistics); the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        values = [float(batch_loss(model, b, settings, "eval")) for b in batches]
    finally:
        model.train(was_training)
    return statistics.mean(values) if values else math.nan


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def run_repeat(
    model: nn.Module,
    train: list[Batch],
    held_out: list[Batch],
    settings: Settings,
    changes: Changes,
    seed: int,
    deadline: float = math.inf,
) -> Repeat:
    """Train ``model`` (already built under ``seed`` and fixed) for ``settings.steps`` steps over ``train`` in
    an order drawn from ``seed``, then score it on ``held_out``. An exception inside is the repeat's ``error``
    (a fix that does not fit this model is reported, not fatal)."""
    repeat = Repeat(seed)
    start = time.perf_counter()
    try:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        repeat.initial_held_out_loss = held_out_loss(model, held_out, settings)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_training_optimizer(settings, changes, params)
        scheduler = settings.schedule(optimizer) if settings.schedule is not None else None
        model.train()
        torch.manual_seed(seed)  # dropout's draws
        for step, index in zip(range(settings.steps), itertools.cycle(order), strict=False):
            optimizer.zero_grad(set_to_none=True)
            loss = batch_loss(model, train[index], settings, "train")
            if not torch.isfinite(loss):
                repeat.nonfinite_step = step
                break
            loss.backward()
            norm = float(grad_norm(params))
            repeat.grad_norms.append(norm)
            if not math.isfinite(norm):
                repeat.nonfinite_step = step
                break
            if changes.clip_norm is not None:
                clip_grad_norm_(params, changes.clip_norm)
            if changes.agc is not None:
                adaptive_clip_grad_(params, changes.agc)
            warm = min(1.0, (step + 1) / changes.warmup) if changes.warmup else 1.0
            saved = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:  # around the step only: the user's schedule owns group["lr"]
                group["lr"] = group["lr"] * warm
            optimizer.step()
            for group, lr in zip(optimizer.param_groups, saved, strict=True):
                group["lr"] = lr
            if scheduler is not None:
                scheduler.step()
            repeat.losses.append(float(loss.detach()))
            repeat.steps = step + 1
            if time.time() > deadline:
                break
        if repeat.nonfinite_step is None:
            repeat.held_out_loss = held_out_loss(model, held_out, settings)
            if not math.isfinite(repeat.held_out_loss):  # the weights blew up on the last step
                repeat.nonfinite_step = repeat.steps
    except Exception as error:
        repeat.error = _first_line(error)
    repeat.seconds = time.perf_counter() - start
    return repeat
