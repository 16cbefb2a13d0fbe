"""A small trainer with guard rails: clipping, a monitor, atomic checkpoints that resume exactly,
a non-finite guard that names the first layer to blow up, progress, and a diagnosis at the end.

``Trainer.fit`` is one loop over the positions of a ``RunState``; one batch is ``Trainer.training_step``.
The guard rails are callbacks in ``steadygrad.train_callbacks`` (Lightning's hook names); pass your own
with ``Trainer(..., callbacks=[...])``."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from steadygrad._checks import check_choice, check_positive
from steadygrad.clip import CLIP_MODES, clip_grads_
from steadygrad.clip import grad_norm as total_grad_norm
from steadygrad.data import Dataset
from steadygrad.diagnose import Finding, diagnose
from steadygrad.distributed import setup as setup_distributed
from steadygrad.losses import IGNORE_INDEX, resolve_loss_named
from steadygrad.measure import JsonlSink, MLflowSink, Monitor, TensorBoardSink, probe
from steadygrad.measure.sinks import sqlite_uri
from steadygrad.norm.convert import convert_sync_batchnorm
from steadygrad.optimizers import OPTIMIZERS, make_optimizer, param_groups
from steadygrad.structure import describe
from steadygrad.train_callbacks import (
    Callback,
    CheckpointError,
    GoodState,
    ModelCheckpoint,
    NonFiniteGuard,
    ProgressBar,
    RunFiles,
    RunState,
    StepOutput,
    load_checkpoint,
    save_checkpoint,
)

__all__ = [
    "Callback",
    "CheckpointError",
    "ClipSpec",
    "RunState",
    "StepOutput",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "load_checkpoint",
    "save_checkpoint",
]

NONFINITE_POLICIES = ("stop", "rollback")


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
    # also log to MLflow (MLflowSink): scalars, the config as params, findings.json; into mlflow_uri, or by default
    # a SQLite store logdir/mlflow.db with the artifacts in logdir/mlartifacts (a run's files stay together)
    mlflow: bool = False
    mlflow_uri: str | None = None  # an MLflow tracking URI (http://host:5000, sqlite:///mlflow.db); needs mlflow=True
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
        if self.mlflow_uri is not None and (not isinstance(self.mlflow_uri, str) or not self.mlflow_uri.strip()):
            raise ValueError(f"mlflow_uri must be an MLflow tracking URI (text); got {self.mlflow_uri!r}.")
        if self.mlflow_uri is not None and not self.mlflow:
            raise ValueError("mlflow_uri is set but mlflow=False: pass mlflow=True to log to it.")
        if self.mlflow and self.logdir is None and self.mlflow_uri is None:
            raise ValueError("mlflow=True needs a logdir (for its store, logdir/mlflow.db) or an mlflow_uri.")

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


# -- the trainer --------------------------------------------------------------------------------------


class _LeftOpen:
    """A sink the Monitor writes to but does not close: the trainer ends the MLflow run itself, after the
    findings and with the run's status (the Monitor's exit would end it FINISHED, a crash included)."""

    def __init__(self, sink) -> None:
        self.sink = sink

    def write(self, report, layers) -> None:
        self.sink.write(report, layers)

    def close(self) -> None:
        pass


class Trainer:
    """Train ``model`` on ``data`` as ``config`` says.

    Example:
        >>> data = steadygrad.data.digits()
        >>> net = steadygrad.build(NetSpec(depth=10, width=64, in_features=64, norm="batch"))
        >>> result = Trainer(net, data, TrainConfig(epochs=5, lr=1e-3)).fit()
        >>> result.final["test_accuracy"]  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        data: Dataset,
        config: TrainConfig | None = None,
        callbacks: list[Callback] | tuple[Callback, ...] = (),
    ) -> None:
        self.model = model
        self.data = data
        self.config = config or TrainConfig()
        structure = describe(model)
        self.kind = (
            structure.kind if structure is not None and structure.kind in ("cnn", "rnn", "transformer") else "mlp"
        )
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
        self.monitor: Monitor | None = None  # the run's Monitor, while fit runs and after
        self.mlflow: MLflowSink | None = None  # with config.mlflow on rank 0: its run_id and tracking_uri
        self.loss_name = ""  # which loss the steps take, in words, once one has run
        for callback in callbacks:
            if not isinstance(callback, Callback):
                raise TypeError(
                    f"callbacks must be steadygrad.train.Callback instances (subclass it and override the hooks "
                    f"you need); got {type(callback).__name__}."
                )
        self.callbacks: list[Callback] = [*self._builtin_callbacks(), *callbacks]

    # -- pieces ----------------------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        return make_optimizer(c.optimizer, param_groups(self.model, c.lr), c.lr, c.weight_decay)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        return self.data.inputs_for(self.kind, x)

    def _loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The probe's loss resolution (steadygrad.losses) for the data's task; its name kept for the reports."""
        loss, self.loss_name = resolve_loss_named(output, y, task=self.data.task)
        return loss

    def _batches(self, epoch: int) -> list[torch.Tensor]:
        # the order of an epoch depends on (seed, epoch) alone: a resumed run replays it exactly
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return list(torch.randperm(len(self.data.x_train), generator=generator).split(self.config.batch_size))

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss (and accuracy) on the held-out split; for token rows per scored position (targets not -100)."""
        was_training = self.model.training
        self.model.eval()
        total, correct, count = 0.0, 0, 0
        for x, y in zip(self.data.x_test.split(1024), self.data.y_test.split(1024), strict=True):
            output = self.model(self._inputs(x))
            scored = y != IGNORE_INDEX if self.data.tokens else torch.ones_like(y, dtype=torch.bool)
            weight = int(scored.sum())
            total += float(self._loss(output, y)) * weight
            if self.data.task == "classification":
                predicted = output.argmax(-1) if self.data.tokens else output.argmax(1)
                correct += int((predicted == y)[scored].sum())
            count += weight
        self.model.train(was_training)
        metrics = {"test_loss": total / count}
        if self.data.task == "classification":
            metrics["test_accuracy"] = correct / count
        return metrics

    # -- the run's files, state and callbacks ------------------------------------------------------------
    def _builtin_callbacks(self) -> list[Callback]:
        """Progress bar, run files (rank 0 with a logdir), checkpoints and the non-finite guard, in this order:
        at an epoch's end the history line is written before the checkpoint (a resume drops lines past it)."""
        c, files = self.config, self.logdir is not None and self.writes
        checkpoint = self.logdir / "checkpoint.pt" if files else None  # rank 0 writes it
        return [
            ProgressBar(enabled=c.progress and self.writes),
            *([RunFiles(self.logdir)] if files else []),
            ModelCheckpoint(checkpoint, every=c.checkpoint_every),
            NonFiniteGuard(c.on_nonfinite, c.max_rollbacks),
        ]

    def _call(self, hook: str, state: RunState, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, state, *args)

    @property
    def steps_per_epoch(self) -> int:
        return len(self._batches(0))

    def checkpoint_state(self, state: RunState) -> dict:
        """What a checkpoint holds: weights, optimizer, the run's position, the RNG, the config, and the state
        of every callback that has one (format version 1; files without ``"callbacks"`` resume too)."""
        saved = {key: sd for key, sd in ((cb.state_key, cb.state_dict()) for cb in self.callbacks) if sd}
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **state.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "config": self.config.to_dict(),
            "callbacks": saved,
        }

    def _resume(self, state: RunState) -> None:
        """Load ``logdir/checkpoint.pt`` (every rank reads it) into the model, optimizer, RNG, run state and
        callbacks."""
        if self.logdir is None:
            raise ValueError("resume=True needs the logdir of the run to resume.")
        saved = load_checkpoint(self.logdir / "checkpoint.pt")
        try:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(
                "The checkpoint was written for a different model or optimizer: "
                f"{str(error).splitlines()[0][:300]}. Resume with the same network and optimizer options as the "
                "run that wrote it."
            ) from None
        torch.set_rng_state(saved["torch_rng"])
        state.load_state_dict(saved)
        state.resumed = True
        callbacks = saved.get("callbacks", {})
        for callback in self.callbacks:
            if callback.state_key in callbacks:
                callback.load_state_dict(callbacks[callback.state_key])

    def rewind(self, state: RunState, good: GoodState) -> None:
        """Go back to ``good``: its weights, optimizer state (learning rates included), RNG and position."""
        self.model.load_state_dict(good.model)
        self.optimizer.load_state_dict(good.optimizer)
        torch.set_rng_state(good.rng)
        state.epoch, state.batch, state.step = good.epoch, good.batch, good.step
        if self.monitor is not None:
            self.monitor.step_count = good.step

    def print(self, text: str) -> None:
        """Print above the progress bar (or plainly when there is none)."""
        bar = next((cb for cb in self.callbacks if isinstance(cb, ProgressBar) and cb.console is not None), None)
        if bar is not None:
            bar.console.print(text)
        else:
            from rich.console import Console

            Console().print(text)

    def first_nonfinite_layer(self, x: torch.Tensor, y: torch.Tensor) -> str:
        """Where non-finite values first appear on this batch: a layer's output (forward order), a layer's
        gradient (backward order), or else the loss itself."""
        report = probe(self.model, x, y, task=self.data.task, theory_prediction=False)
        where = report.first_nonfinite()
        if where is not None:
            return where
        largest = max(
            (max(abs(r.act_min), abs(r.act_max)) for r in report.records if math.isfinite(r.act_max)), default=math.nan
        )
        return f"the loss itself: every layer's output was finite, the largest |value| {largest:.3g}"

    def summary(self, result: TrainResult) -> dict:
        """The content of ``summary.json``: the result, the config, the data and (for built nets) the spec."""
        summary = {
            **result.to_dict(),
            "loss_name": self.loss_name,
            "config": self.config.to_dict(),
            "data": {
                "name": self.data.name,
                "task": self.data.task,
                "train": len(self.data.x_train),
                "test": len(self.data.x_test),
            },
        }
        structure = describe(self.model)
        if structure is not None and hasattr(structure.spec, "to_dict"):
            summary["spec"] = structure.spec.to_dict()
        if self.mlflow is not None:
            summary["mlflow"] = {"tracking_uri": self.mlflow.tracking_uri, "run_id": self.mlflow.run_id}
        return summary

    # -- the loop --------------------------------------------------------------------------------------
    def _global_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The mean of the ranks' losses under data parallelism (so that every rank takes the same branch),
        else this loss; detached."""
        if self.world == 1:
            return loss.detach()
        import torch.distributed as dist

        shared = loss.detach().clone()
        dist.all_reduce(shared)
        return shared / self.world

    def training_step(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        """Forward, loss, backward and clipping on one batch; the optimizer step is the loop's.

        With a non-finite loss no backward runs (the gradients stay None) and ``grad_norm`` is NaN; the
        gradient norm is the global L2 norm before clipping (what ``clip_grads_`` returns)."""
        c = self.config
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(self.forward_model(x), y)
        loss_value, grad_norm = self._global_loss(loss), math.nan
        if torch.isfinite(loss_value):
            loss.backward()
            if self.monitor is not None:
                self.monitor.observe_loss(loss, self.loss_name)
            if c.clip is not None:
                grad_norm = float(clip_grads_(self.model, c.clip.mode, c.clip.threshold))
            else:
                grad_norm = float(total_grad_norm(self.model.parameters()))
        return StepOutput(x, y, loss_value, grad_norm)

    def fit(self, resume: bool = False) -> TrainResult:
        """Train; with ``resume``, continue from ``logdir/checkpoint.pt`` exactly where it was written.

        One loop over (epoch, batch) positions in ``RunState``: each turn trains one batch or, past the last
        batch, ends the epoch. A rollback moves the position back, and the loop simply goes on from there."""
        c = self.config
        state = RunState(started=time.perf_counter())
        self.mlflow = None  # this fit's own run, when it logs to MLflow
        torch.manual_seed(c.seed)
        if resume:
            self._resume(state)
        try:
            self._call("on_train_start", state)  # the run files are ready before the Monitor's sink opens them
            self.monitor = Monitor(
                self.model, every=c.monitor_every, optimizer=self.optimizer, sinks=self._sinks(state)
            )
            self.monitor.step_count = state.step
            self.model.train()
            with self.monitor:
                self._loop(state)
        except BaseException as error:
            self._end_mlflow("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            self._call("on_exception", state, error)
            raise
        try:
            reports = self.monitor.history.reports
            inputs = self._inputs(self.data.x_train[:256])
            findings = diagnose(reports, model=self.model, inputs=inputs) if reports else []
            result = TrainResult(
                state.status,
                state.message or "Training completed.",
                state.epochs,
                findings,
                state.step,
                state.rollbacks,
                time.perf_counter() - state.started,
                reports,
            )
            self._call("on_train_end", state, result)  # a callback may still log into self.mlflow's run here
        except BaseException:
            self._end_mlflow("FAILED")
            raise
        self._end_mlflow("FINISHED" if result.status == "completed" else "FAILED", findings)
        return result

    def _sinks(self, state: RunState) -> list:
        """The Monitor's sinks, on rank 0 only: monitor.jsonl and TensorBoard under the logdir, and MLflow."""
        c, sinks = self.config, []
        if c.mlflow and self.writes:  # first: a store MLflow cannot open leaves no file of the others open
            tags = {"steadygrad.resumed": str(state.resumed).lower()}
            if self.logdir is not None:
                tags["steadygrad.logdir"] = str(self.logdir.resolve())
            if c.mlflow_uri is not None:
                self.mlflow = MLflowSink(c.mlflow_uri, tags=tags)
            else:  # the run's own store, beside its other files
                store, artifacts = self.logdir / "mlflow.db", self.logdir / "mlartifacts"
                self.mlflow = MLflowSink(sqlite_uri(store), artifact_location=artifacts, tags=tags)
            structure = describe(self.model)
            model = structure.label if structure is not None else type(self.model).__name__
            self.mlflow.log_params({**c.to_dict(), "data": self.data.name, "model": model})
            sinks.append(_LeftOpen(self.mlflow))
        if self.logdir is not None and self.writes:
            sinks.append(JsonlSink(self.logdir / "monitor.jsonl"))
            if c.tensorboard:
                sinks.append(TensorBoardSink(self.logdir / "tensorboard"))
        return sinks

    def _end_mlflow(self, status: str, findings: list[Finding] | None = None) -> None:
        """Give the MLflow run the findings and end it (FAILED for a run the non-finite guard stopped)."""
        if self.mlflow is None:
            return
        if findings is not None:
            self.mlflow.log_findings(findings)
        self.mlflow.close(status)

    def _loop(self, state: RunState) -> None:
        epoch, batches = None, []
        while state.epoch < self.config.epochs and not state.stop:
            if epoch != state.epoch:
                epoch, batches = state.epoch, self._batches(state.epoch)
                if state.batch == 0:
                    self._call("on_train_epoch_start", state)
            if state.batch < len(batches):
                self._call("on_train_batch_start", state)
                index = batches[state.batch][self.rank :: self.world]  # this rank's share of the global batch
                output = self.training_step(self._inputs(self.data.x_train[index]), self.data.y_train[index])
                self._call("on_before_optimizer_step", state, output)
                if output.skip:  # a callback stopped the run or moved it back
                    continue
                self.optimizer.step()
                state.step += 1
                state.batch += 1
                self._call("on_train_batch_end", state, output)
                continue
            metrics = {
                "epoch": state.epoch + 1,
                "step": state.step,
                "lr": self.optimizer.param_groups[0]["lr"],
                **self.evaluate(),
                "seconds": time.perf_counter() - state.started,
            }
            state.epochs.append(metrics)
            state.epoch, state.batch = state.epoch + 1, 0
            self._call("on_train_epoch_end", state, metrics)
