"""A small trainer with guard rails: clipping, a monitor, atomic checkpoints that resume exactly,
a non-finite guard that names the first layer to blow up, progress, and a diagnosis at the end."""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from steadygrad._checks import check_choice, check_positive
from steadygrad.clip import CLIP_MODES, clip_grads_
from steadygrad.clip import grad_norm as total_grad_norm
from steadygrad.data import Dataset
from steadygrad.diagnose import Finding, diagnose
from steadygrad.distributed import setup as setup_distributed
from steadygrad.measure import JsonlSink, Monitor, TensorBoardSink, probe
from steadygrad.nets import DeepNet
from steadygrad.norm.convert import convert_sync_batchnorm

__all__ = ["CheckpointError", "ClipSpec", "TrainConfig", "TrainResult", "Trainer", "load_checkpoint", "save_checkpoint"]

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
NONFINITE_POLICIES = ("stop", "rollback")
CHECKPOINT_FORMAT = "steadygrad-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupted, foreign, or for another model."""


@dataclass(frozen=True)
class ClipSpec:
    """Gradient clipping as ``MODE:THRESHOLD``, e.g. ``norm:1.0`` (modes of ``steadygrad.clip``)."""

    mode: str
    threshold: float

    @classmethod
    def parse(cls, text: str | ClipSpec | None) -> ClipSpec | None:
        if text is None or isinstance(text, ClipSpec):
            return text
        mode, sep, value = str(text).partition(":")
        try:
            threshold = float(value) if sep else math.nan
        except ValueError:
            threshold = math.nan
        if mode.strip().lower() not in CLIP_MODES or not (threshold > 0 and math.isfinite(threshold)):
            raise ValueError(
                f"Clipping is MODE:THRESHOLD with MODE one of {', '.join(CLIP_MODES)} and THRESHOLD > 0 "
                f"(e.g. norm:1.0, agc:0.01); got {text!r}."
            )
        return cls(mode.strip().lower(), threshold)

    def __str__(self) -> str:
        return f"{self.mode}:{self.threshold:g}"


@dataclass
class TrainConfig:
    """How to train. Checked on creation."""

    epochs: int = 10
    lr: float = 1e-3
    optimizer: str = "adam"  # sgd, momentum (SGD with 0.9 momentum), adam, adamw
    batch_size: int = 64
    weight_decay: float = 0.0
    clip: ClipSpec | str | None = None  # e.g. "norm:1.0"
    seed: int = 0  # the data order (and dropout) follow it
    monitor_every: int = 10  # log per-layer records every k optimizer steps (steps 1, 1 + k, ...)
    on_nonfinite: str = "stop"  # stop, or rollback: restore the last good state, halve the lr, go on
    checkpoint_every: int = 50  # optimizer steps between checkpoints (and one at every epoch's end)
    max_rollbacks: int = 5  # then stop anyway
    logdir: str | Path | None = None  # history, checkpoint, monitor records, summary; None keeps all in memory
    tensorboard: bool = False  # also write TensorBoard events under logdir/tensorboard
    progress: bool = True  # a progress bar on the terminal

    def __post_init__(self) -> None:
        self.optimizer = check_choice("optimizer", self.optimizer, OPTIMIZERS)
        self.on_nonfinite = check_choice("on_nonfinite policy", self.on_nonfinite, NONFINITE_POLICIES)
        self.clip = ClipSpec.parse(self.clip)
        self.lr = check_positive("lr", self.lr)
        self.weight_decay = check_positive("weight_decay", self.weight_decay, allow_zero=True)
        for name in ("epochs", "batch_size", "monitor_every", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        if self.tensorboard and self.logdir is None:
            raise ValueError("tensorboard=True needs a logdir to write the event files into.")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["clip"] = None if self.clip is None else str(self.clip)
        out["logdir"] = None if self.logdir is None else str(self.logdir)
        return out


@dataclass
class TrainResult:
    """What a run did: per-epoch metrics, findings, and how it ended."""

    status: str  # "completed" or "stopped_nonfinite"
    message: str
    epochs: list[dict]
    findings: list[Finding]
    steps: int
    rollbacks: int = 0
    seconds: float = 0.0
    history: list = field(default_factory=list, repr=False)  # the monitor's FlowReports

    @property
    def final(self) -> dict:
        return self.epochs[-1] if self.epochs else {}

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "message": self.message,
            "steps": self.steps,
            "rollbacks": self.rollbacks,
            "seconds": self.seconds,
            "final": self.final,
            "epochs": self.epochs,
            "findings": [f.to_dict() for f in self.findings],
        }


# -- checkpoints --------------------------------------------------------------------------------------


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


# -- the trainer --------------------------------------------------------------------------------------


class Trainer:
    """Train ``model`` on ``data`` as ``config`` says.

    Example:
        >>> data = steadygrad.data.digits()
        >>> net = steadygrad.build(NetSpec(depth=10, width=64, in_features=64, norm="batch"))
        >>> result = Trainer(net, data, TrainConfig(epochs=5, lr=1e-3)).fit()
        >>> result.final["test_accuracy"]  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, data: Dataset, config: TrainConfig | None = None) -> None:
        self.model = model
        self.data = data
        self.config = config or TrainConfig()
        self.kind = model.spec.kind if isinstance(model, DeepNet) else "mlp"
        self.logdir = None if self.config.logdir is None else Path(self.config.logdir)
        # Data parallelism (under torchrun): every rank trains a replica on its share of each global batch;
        # BatchNorm statistics are synchronized, so N processes compute what one would on the whole batch.
        self.rank, self.world = setup_distributed()
        self.writes = self.rank == 0  # only rank 0 writes logs, checkpoints and summaries
        self.forward_model = model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            convert_sync_batchnorm(model)
            self.forward_model = DistributedDataParallel(model)
        self.optimizer = self._make_optimizer()

    # -- pieces ----------------------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        c, params = self.config, [p for p in self.model.parameters() if p.requires_grad]
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=c.lr, weight_decay=c.weight_decay)
        if c.optimizer == "momentum":
            return torch.optim.SGD(params, lr=c.lr, momentum=0.9, weight_decay=c.weight_decay)
        if c.optimizer == "adam":
            return torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
        return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        return self.data.inputs_for(self.kind, x)

    def _loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.data.task == "classification":
            return F.cross_entropy(output, y)
        return F.mse_loss(output.reshape(y.shape), y)

    def _batches(self, epoch: int) -> list[torch.Tensor]:
        # the order of an epoch depends on (seed, epoch) alone: a resumed run replays it exactly
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return list(torch.randperm(len(self.data.x_train), generator=generator).split(self.config.batch_size))

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss (and accuracy) on the held-out split."""
        was_training = self.model.training
        self.model.eval()
        total, correct, count = 0.0, 0, 0
        for x, y in zip(self.data.x_test.split(1024), self.data.y_test.split(1024), strict=True):
            output = self.model(self._inputs(x))
            total += float(self._loss(output, y)) * len(y)
            if self.data.task == "classification":
                correct += int((output.argmax(1) == y).sum())
            count += len(y)
        self.model.train(was_training)
        metrics = {"test_loss": total / count}
        if self.data.task == "classification":
            metrics["test_accuracy"] = correct / count
        return metrics

    def _state(self, epoch: int, batch: int, step: int, epochs: list[dict], rollbacks: int) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": epoch,
            "batch": batch,
            "step": step,
            "epochs": epochs,
            "rollbacks": rollbacks,
            "torch_rng": torch.get_rng_state(),
            "config": self.config.to_dict(),
        }

    def _restore(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(
                "The checkpoint was written for a different model or optimizer: "
                f"{str(error).splitlines()[0][:300]}. Resume with the same network and optimizer options as the "
                "run that wrote it."
            ) from None
        torch.set_rng_state(state["torch_rng"])

    def _first_nonfinite_layer(self, x: torch.Tensor, y: torch.Tensor) -> str:
        report = probe(self.model, x, y, loss=lambda out, t: self._loss(out, t), theory_prediction=False)
        for record in report.records:  # the forward pass runs first to last
            if record.nonfinite_act:
                return f"the output of {record.label}"
        for record in reversed(report.records):  # the backward pass runs last to first
            if record.nonfinite_grad:
                return f"the gradient of {record.label}"
        largest = max(
            (max(abs(r.act_min), abs(r.act_max)) for r in report.records if math.isfinite(r.act_max)), default=math.nan
        )
        return f"the loss itself: every layer's output was finite, the largest |value| {largest:.3g}"

    # -- the loop --------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> TrainResult:
        """Train; with ``resume``, continue from ``logdir/checkpoint.pt`` exactly where it was written."""
        c, start = self.config, time.perf_counter()
        source = self.logdir / "checkpoint.pt" if self.logdir else None  # every rank reads it on resume
        checkpoint = source if self.writes else None  # rank 0 writes it
        epochs_done: list[dict] = []
        epoch, batch, step, rollbacks = 0, 0, 0, 0
        torch.manual_seed(c.seed)
        if resume:
            if source is None:
                raise ValueError("resume=True needs the logdir of the run to resume.")
            state = load_checkpoint(source)
            self._restore(state)
            epoch, batch, step, rollbacks = state["epoch"], state["batch"], state["step"], state["rollbacks"]
            epochs_done = list(state["epochs"])
            if self.writes:
                _truncate_jsonl(self.logdir / "monitor.jsonl", lambda row: row["step"] <= step)
                _truncate_jsonl(self.logdir / "history.jsonl", lambda row: row["epoch"] <= len(epochs_done))
        elif self.logdir is not None and self.writes:
            self.logdir.mkdir(parents=True, exist_ok=True)
            for name in ("monitor.jsonl", "history.jsonl", "summary.json"):
                (self.logdir / name).unlink(missing_ok=True)
        if resume:
            last_good = (epoch, batch, step, _snapshot(self.model, self.optimizer), torch.get_rng_state())
        else:  # a good state on disk from the start: a run that dies at step 1 can still be resumed
            last_good = self._checkpoint(checkpoint, epoch, batch, step, epochs_done, rollbacks)

        sinks = []
        if self.logdir is not None and self.writes:
            sinks.append(JsonlSink(self.logdir / "monitor.jsonl"))
            if c.tensorboard:
                sinks.append(TensorBoardSink(self.logdir / "tensorboard"))
        monitor = Monitor(self.model, every=c.monitor_every, optimizer=self.optimizer, sinks=sinks)
        monitor.step_count = step
        status, message = "completed", ""
        progress = _progress(c.progress and self.writes)
        steps_per_epoch = len(self._batches(0))
        task = progress.add_task(
            "training",
            total=c.epochs * steps_per_epoch,
            completed=step,
            loss=math.nan,
            grad=math.nan,
            acc=epochs_done[-1].get("test_accuracy", math.nan) if epochs_done else math.nan,
        )
        self.model.train()
        with monitor, progress:
            while epoch < c.epochs:
                batches = self._batches(epoch)
                restart = False
                while batch < len(batches):
                    index = batches[batch][self.rank :: self.world]  # this rank's share of the global batch
                    x, y = self._inputs(self.data.x_train[index]), self.data.y_train[index]
                    self.optimizer.zero_grad(set_to_none=True)
                    loss = self._loss(self.forward_model(x), y)
                    grad_norm = math.nan
                    if self.world > 1:  # decide on the global loss, so that every rank takes the same branch
                        import torch.distributed as dist

                        shared = loss.detach().clone()
                        dist.all_reduce(shared)
                        loss_value = shared / self.world
                    else:
                        loss_value = loss.detach()
                    if torch.isfinite(loss_value):
                        loss.backward()
                        monitor.observe_loss(loss)
                        if c.clip is not None:
                            clipped = clip_grads_(self.model, c.clip.mode, c.clip.threshold)
                            grad_norm = (
                                float(clipped)
                                if c.clip.mode == "norm"
                                else float(total_grad_norm(self.model.parameters()))
                            )
                        else:
                            grad_norm = float(total_grad_norm(self.model.parameters()))
                    if not (torch.isfinite(loss_value) and math.isfinite(grad_norm)):
                        where = self._first_nonfinite_layer(x, y)
                        what = (
                            f"loss {float(loss_value):g}"
                            if not torch.isfinite(loss_value)
                            else f"gradient norm {grad_norm:g}"
                        )
                        message = (
                            f"Training diverged at step {step + 1} (epoch {epoch + 1}): {what}; non-finite "
                            f"values first appear in {where}."
                        )
                        if c.on_nonfinite == "stop" or rollbacks >= c.max_rollbacks:
                            if c.on_nonfinite == "rollback":
                                message += f" Stopped after {rollbacks} rollbacks."
                            status = "stopped_nonfinite"
                            break
                        failed_lrs = [group["lr"] for group in self.optimizer.param_groups]
                        epoch, batch, step, (model_state, opt_state), rng = last_good
                        self.model.load_state_dict(model_state)
                        self.optimizer.load_state_dict(opt_state)  # this brings back the old learning rate
                        torch.set_rng_state(rng)
                        for group, failed in zip(self.optimizer.param_groups, failed_lrs, strict=True):
                            group["lr"] = failed / 2
                        rollbacks += 1
                        monitor.step_count = step
                        lr = self.optimizer.param_groups[0]["lr"]
                        progress.console.print(f"{message} Rolled back to step {step}; learning rate halved to {lr:g}.")
                        message = ""
                        progress.update(task, completed=step)
                        restart = True
                        break
                    self.optimizer.step()
                    step += 1
                    batch += 1
                    progress.update(task, advance=1, loss=float(loss_value), grad=grad_norm)
                    if step % c.checkpoint_every == 0:
                        last_good = self._checkpoint(checkpoint, epoch, batch, step, epochs_done, rollbacks)
                if status != "completed":
                    break
                if restart:
                    continue
                metrics = {
                    "epoch": epoch + 1,
                    "step": step,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    **self.evaluate(),
                    "seconds": time.perf_counter() - start,
                }
                epochs_done.append(metrics)
                progress.update(task, acc=metrics.get("test_accuracy", math.nan))
                if self.logdir is not None and self.writes:
                    with (self.logdir / "history.jsonl").open("a") as handle:
                        handle.write(json.dumps(metrics) + "\n")
                epoch, batch = epoch + 1, 0
                last_good = self._checkpoint(checkpoint, epoch, batch, step, epochs_done, rollbacks)
        inputs = self._inputs(self.data.x_train[:256])
        findings = diagnose(monitor.history.reports, model=self.model, inputs=inputs) if monitor.history.reports else []
        result = TrainResult(
            status,
            message or "Training completed.",
            epochs_done,
            findings,
            step,
            rollbacks,
            time.perf_counter() - start,
            monitor.history.reports,
        )
        if self.logdir is not None and self.writes:
            summary = {
                **result.to_dict(),
                "config": c.to_dict(),
                "data": {
                    "name": self.data.name,
                    "task": self.data.task,
                    "train": len(self.data.x_train),
                    "test": len(self.data.x_test),
                },
            }
            if isinstance(self.model, DeepNet):
                summary["spec"] = self.model.spec.to_dict()
            (self.logdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return result

    def _checkpoint(self, path, epoch, batch, step, epochs_done, rollbacks):
        if path is not None:
            save_checkpoint(self._state(epoch, batch, step, epochs_done, rollbacks), path)
        return epoch, batch, step, _snapshot(self.model, self.optimizer), torch.get_rng_state()


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4g}"),
        TextColumn("grad {task.fields[grad]:.3g}"),
        TextColumn("test acc {task.fields[acc]:.3f}"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )
