"""The trainer's run state, its checkpoint files and the callbacks that make up its guard rails.

``steadygrad.train.Trainer`` runs one loop; everything around the loop is a callback with Lightning's hook
names (``on_train_start``, ``on_train_epoch_start``, ``on_train_batch_start``, ``on_before_optimizer_step``,
``on_train_batch_end``, ``on_train_epoch_end``, ``on_train_end``, ``on_exception``), each called as
``hook(trainer, state, ...)`` in the order the callbacks are listed:

- ``ProgressBar``: the terminal progress bar.
- ``RunFiles``: ``history.jsonl`` (one line per epoch) and ``summary.json`` (at the end) under the logdir.
- ``ModelCheckpoint``: the atomic ``checkpoint.pt`` and the last good state that a rollback returns to.
- ``NonFiniteGuard``: a non-finite loss or gradient norm stops the run or rolls it back with a halved lr.

A callback that must carry something across a kill and a resume returns it from ``state_dict()``; the
checkpoint stores it under ``"callbacks"`` and ``load_state_dict()`` gets it back on resume. The built-in
callbacks keep nothing beyond ``RunState``, which the checkpoint stores itself.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "Callback",
    "CheckpointError",
    "GoodState",
    "ModelCheckpoint",
    "NonFiniteGuard",
    "ProgressBar",
    "RunFiles",
    "RunState",
    "StepOutput",
    "load_checkpoint",
    "save_checkpoint",
]

# The hooks get a steadygrad.train.Trainer and a TrainResult. They are not imported, not even for type checking:
# steadygrad.train imports this module, and import-linter counts a TYPE_CHECKING import as an import too.
Trainer = Any
TrainResult = Any

CHECKPOINT_FORMAT = "steadygrad-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupted, foreign, or for another model."""


# -- checkpoint files -----------------------------------------------------------------------------------


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` atomically: a temporary file in the same folder, fsync, then rename over ``path``.
    A run killed at any moment leaves either the old checkpoint or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)`` (no code runs from the file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at {path} to resume from. Run without --resume first.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, garbage bytes, or pickled code that weights_only refuses
        first_line = (str(error).splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(error).__name__}: {first_line}). It may be truncated, "
            "corrupted or written by another program: delete it, or resume from another --logdir."
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a steadygrad checkpoint (no '{CHECKPOINT_FORMAT}' marker).")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} is checkpoint format version {state.get('version')}; this steadygrad reads "
            f"version {CHECKPOINT_VERSION}."
        )
    return state


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Deep copies of the model's and the optimizer's state (for rollback without a disk)."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    return state["model"], state["optimizer"]


def _truncate_jsonl(path: Path, keep) -> None:
    """Drop the lines of a JSON Lines file that a resumed run will write again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and keep(json.loads(line))]
    path.write_text("".join(line + "\n" for line in kept))


# -- the run's state --------------------------------------------------------------------------------------


@dataclass
class GoodState:
    """A point the run can go back to: where it was, and deep copies of the weights, optimizer and RNG."""

    epoch: int
    batch: int
    step: int
    model: dict
    optimizer: dict
    rng: torch.Tensor

    @classmethod
    def capture(cls, trainer: Trainer, state: RunState) -> GoodState:
        model, optimizer = _snapshot(trainer.model, trainer.optimizer)
        return cls(state.epoch, state.batch, state.step, model, optimizer, torch.get_rng_state())


@dataclass
class RunState:
    """Where a run is. ``epoch`` and ``batch`` point at the next batch to train (epoch and batch are 0-based,
    ``batch`` counts within the epoch); ``step`` counts the optimizer steps taken; ``epochs`` holds the metrics
    of each finished epoch. The checkpoint stores ``state_dict()``, so a resumed run continues from here."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    epochs: list[dict] = field(default_factory=list)
    rollbacks: int = 0
    status: str = "completed"  # or "stopped_nonfinite"
    message: str = ""
    resumed: bool = False  # this run continues from a checkpoint
    stop: bool = False  # set by a callback to end the run after the current hook
    last_good: GoodState | None = None  # the latest checkpointed state, where a rollback returns to
    started: float = 0.0  # time.perf_counter() when fit began

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "epochs": list(self.epochs),
            "rollbacks": self.rollbacks,
        }

    def load_state_dict(self, saved: dict) -> None:
        self.epoch, self.batch, self.step = saved["epoch"], saved["batch"], saved["step"]
        self.epochs, self.rollbacks = list(saved["epochs"]), saved["rollbacks"]


@dataclass
class StepOutput:
    """What one training step produced, before the optimizer takes it.

    ``grad_norm`` is the global norm of the gradients before clipping (``steadygrad.clip.clip_grads_``), NaN
    when the loss was non-finite and no backward pass ran. A callback sets ``skip`` to keep the optimizer from
    taking this step (the non-finite guard does)."""

    x: torch.Tensor
    y: torch.Tensor
    loss: torch.Tensor  # the loss this rank decides on (all-reduced across ranks), detached
    grad_norm: float
    skip: bool = False

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.loss)) and math.isfinite(self.grad_norm)


# -- callbacks ----------------------------------------------------------------------------------------------


class Callback:
    """Base class: every hook does nothing. Override the ones you need (names as in PyTorch Lightning)."""

    def on_train_start(self, trainer: Trainer, state: RunState) -> None: ...

    def on_train_epoch_start(self, trainer: Trainer, state: RunState) -> None: ...

    def on_train_batch_start(self, trainer: Trainer, state: RunState) -> None: ...

    def on_before_optimizer_step(self, trainer: Trainer, state: RunState, output: StepOutput) -> None:
        """After backward and clipping, before ``optimizer.step()``; set ``output.skip`` to skip the step."""

    def on_train_batch_end(self, trainer: Trainer, state: RunState, output: StepOutput) -> None:
        """After the optimizer step; ``state.step`` and ``state.batch`` count it already."""

    def on_train_epoch_end(self, trainer: Trainer, state: RunState, metrics: dict) -> None:
        """After an epoch's evaluation; ``state`` points at the start of the next epoch, ``metrics`` is
        ``state.epochs[-1]``."""

    def on_train_end(self, trainer: Trainer, state: RunState, result: TrainResult) -> None: ...

    def on_exception(self, trainer: Trainer, state: RunState, error: BaseException) -> None: ...

    def state_dict(self) -> dict:
        """What this callback needs after a resume (saved in the checkpoint); empty if nothing."""
        return {}

    def load_state_dict(self, saved: dict) -> None:
        """Take back what ``state_dict`` returned when the checkpoint was written."""

    @property
    def state_key(self) -> str:
        """The key of this callback's entry in the checkpoint's ``"callbacks"``."""
        return type(self).__qualname__


class ProgressBar(Callback):
    """A rich progress bar: optimizer steps, the last loss and gradient norm, the last test accuracy."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.progress = None
        self.task = None

    @property
    def console(self):
        return None if self.progress is None else self.progress.console

    def on_train_start(self, trainer: Trainer, state: RunState) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4g}"),
            TextColumn("grad {task.fields[grad]:.3g}"),
            TextColumn("test acc {task.fields[acc]:.3f}"),
            TimeRemainingColumn(),
            disable=not self.enabled,
            transient=False,
        )
        self.task = self.progress.add_task(
            "training",
            total=trainer.config.epochs * trainer.steps_per_epoch,
            completed=state.step,
            loss=math.nan,
            grad=math.nan,
            acc=state.epochs[-1].get("test_accuracy", math.nan) if state.epochs else math.nan,
        )
        self.progress.start()

    def on_train_batch_start(self, trainer: Trainer, state: RunState) -> None:
        self.progress.update(self.task, completed=state.step)  # after a rollback, the step it went back to

    def on_train_batch_end(self, trainer: Trainer, state: RunState, output: StepOutput) -> None:
        self.progress.update(self.task, completed=state.step, loss=float(output.loss), grad=output.grad_norm)

    def on_train_epoch_end(self, trainer: Trainer, state: RunState, metrics: dict) -> None:
        self.progress.update(self.task, acc=metrics.get("test_accuracy", math.nan))

    def _stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def on_train_end(self, trainer: Trainer, state: RunState, result: TrainResult) -> None:
        self._stop()

    def on_exception(self, trainer: Trainer, state: RunState, error: BaseException) -> None:
        self._stop()


class RunFiles(Callback):
    """``history.jsonl`` (each epoch's metrics, appended as it ends) and ``summary.json`` (the result, config,
    data and network spec) in ``logdir``; the Monitor's ``monitor.jsonl`` is started fresh or truncated here
    too. On resume, the lines past the checkpoint are dropped, since the resumed run writes them again."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = Path(logdir)

    def on_train_start(self, trainer: Trainer, state: RunState) -> None:
        if state.resumed:
            _truncate_jsonl(self.logdir / "monitor.jsonl", lambda row: row["step"] <= state.step)
            _truncate_jsonl(self.logdir / "history.jsonl", lambda row: row["epoch"] <= len(state.epochs))
        else:
            self.logdir.mkdir(parents=True, exist_ok=True)
            for name in ("monitor.jsonl", "history.jsonl", "summary.json"):
                (self.logdir / name).unlink(missing_ok=True)

    def on_train_epoch_end(self, trainer: Trainer, state: RunState, metrics: dict) -> None:
        with (self.logdir / "history.jsonl").open("a") as handle:
            handle.write(json.dumps(metrics) + "\n")

    def on_train_end(self, trainer: Trainer, state: RunState, result: TrainResult) -> None:
        (self.logdir / "summary.json").write_text(json.dumps(trainer.summary(result), indent=2, default=str))


class ModelCheckpoint(Callback):
    """Checkpoints to ``path`` (atomic, see ``save_checkpoint``) at the start of a fresh run, every ``every``
    optimizer steps and at every epoch's end; each one is also kept in memory as ``state.last_good``, the
    point a rollback returns to. With ``path=None`` (no logdir, or not rank 0) only the memory copy is kept."""

    def __init__(self, path: Path | None, every: int) -> None:
        self.path = path
        self.every = every

    def save(self, trainer: Trainer, state: RunState) -> None:
        if self.path is not None:
            save_checkpoint(trainer.checkpoint_state(state), self.path)
        state.last_good = GoodState.capture(trainer, state)

    def on_train_start(self, trainer: Trainer, state: RunState) -> None:
        if state.resumed:  # the checkpoint just read is the good state
            state.last_good = GoodState.capture(trainer, state)
        else:  # a good state on disk from the start: a run that dies at step 1 can still be resumed
            self.save(trainer, state)

    def on_train_batch_end(self, trainer: Trainer, state: RunState, output: StepOutput) -> None:
        if state.step % self.every == 0:
            self.save(trainer, state)

    def on_train_epoch_end(self, trainer: Trainer, state: RunState, metrics: dict) -> None:
        self.save(trainer, state)


class NonFiniteGuard(Callback):
    """A non-finite loss or gradient norm: name where non-finite values first appear (one probe of the batch),
    then either stop the run (``policy="stop"``) or go back to ``state.last_good`` with every learning rate
    halved (``policy="rollback"``), at most ``max_rollbacks`` times before stopping anyway."""

    def __init__(self, policy: str = "stop", max_rollbacks: int = 5) -> None:
        self.policy = policy
        self.max_rollbacks = max_rollbacks

    def on_before_optimizer_step(self, trainer: Trainer, state: RunState, output: StepOutput) -> None:
        if output.finite:
            return
        output.skip = True
        where = trainer.first_nonfinite_layer(output.x, output.y)
        finite_loss = bool(torch.isfinite(output.loss))
        what = f"gradient norm {output.grad_norm:g}" if finite_loss else f"loss {float(output.loss):g}"
        message = (
            f"Training diverged at step {state.step + 1} (epoch {state.epoch + 1}): {what}; non-finite "
            f"values first appear in {where}."
        )
        if self.policy == "stop" or state.rollbacks >= self.max_rollbacks:
            if self.policy == "rollback":
                message += f" Stopped after {state.rollbacks} rollbacks."
            state.status, state.message, state.stop = "stopped_nonfinite", message, True
            return
        failed_lrs = [group["lr"] for group in trainer.optimizer.param_groups]
        trainer.rewind(state, state.last_good)  # this brings back the old learning rate too
        for group, failed in zip(trainer.optimizer.param_groups, failed_lrs, strict=True):
            group["lr"] = failed / 2
        state.rollbacks += 1
        lr = trainer.optimizer.param_groups[0]["lr"]
        trainer.print(f"{message} Rolled back to step {state.step}; learning rate halved to {lr:g}.")
