"""``SteadygradCallback`` for the Hugging Face ``Trainer`` (``pip install "steadygrad[transformers]"``).

    trainer = transformers.Trainer(model, args, train_dataset=..., callbacks=[SteadygradCallback(every=10)])
    trainer.train()

Per-layer records every ``every`` optimizer steps, with the loss the model computed for the Trainer and the update
ratios, go to the Trainer's log history (``trainer.state.log_history``, one entry per logged step) and to its
``report_to`` loggers that steadygrad can reach: TensorBoard (event files in the Trainer's logging directory, or
``output_dir/runs/steadygrad`` where transformers keeps it to itself) and MLflow (the run the Trainer's MLflow
callback opened). At the end of training the findings
are printed, appended to the log history (``{"steadygrad_findings": [...]}``, saved in ``trainer_state.json``), kept
on ``callback.findings`` and written to ``steadygrad_findings.json`` in ``args.output_dir``.

The Trainer hands its callbacks accelerate's ``AcceleratedOptimizer``: the Monitor follows the torch optimizer
inside it. A plain accelerate loop needs no callback::

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    with steadygrad.Monitor(accelerator.unwrap_model(model), every=10, optimizer=optimizer) as monitor:
        for batch in loader:
            loss = model(**batch).loss; accelerator.backward(loss); monitor.observe_loss(loss)
            optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from steadygrad.integrations._core import FINDINGS_FILE, Watch, report_scalars, require

transformers = require("transformers", "transformers", "steadygrad.integrations.transformers")

__all__ = ["SteadygradCallback"]


def _model_loss(output):
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def _tensorboard_dir(args) -> str:
    """Where the Trainer's TensorBoard events go: $TENSORBOARD_LOGGING_DIR, else ``args.logging_dir`` (transformers
    4.x), else a run of its own beside the Trainer's (``output_dir/runs/steadygrad``: TensorBoard on
    ``output_dir/runs`` shows both)."""
    return (
        os.environ.get("TENSORBOARD_LOGGING_DIR")
        or getattr(args, "logging_dir", None)
        or os.path.join(args.output_dir, "runs", "steadygrad")
    )


class SteadygradCallback(transformers.TrainerCallback):
    """Watch a Hugging Face ``Trainer`` run with a ``steadygrad.Monitor``.

    Args:
        every: log every k-th optimizer step (steps 1, 1 + k, ..., as ``state.global_step`` counts them).
        layers: which layers to record, as for ``steadygrad.probe``.
        prefix: the logged scalars' names start with it: ``steadygrad/<layer>/grad_norm``, ``steadygrad/loss``.
        nonfinite: None, or ``"stop"``: a step whose loss or gradients are NaN/Inf is not applied, the layer where
            non-finite values first appear is named (the step's last micro-batch runs once more, unrecorded) and
            training stops (``control.should_training_stop``); the message is ``callback.stopped``.
        findings_file: the JSON file, in ``args.output_dir``, that gets the findings (None: no file).
        print_findings: print the findings at the end (on the main process).
        update_every: measure the update ratio on every k-th logged step (``Monitor``'s ``update_every``; None: its
            default, logged steps at least 10 optimizer steps apart).

    The step's loss is the one the model returns (``outputs.loss``), as the Trainer backpropagates it: the mean of
    the micro-batches' under gradient accumulation, or their sum where the Trainer passes ``num_items_in_batch``
    (each is then already divided by the step's item count). A ``compute_loss`` override that computes the loss
    outside the model: call ``callback.monitor.observe_loss(loss)`` in it.
    """

    def __init__(
        self,
        every: int = 10,
        layers=None,
        prefix: str = "steadygrad",
        nonfinite: str | None = None,
        findings_file: str | None = FINDINGS_FILE,
        print_findings: bool = True,
        update_every: int | None = None,
    ) -> None:
        self.watch = Watch(every, layers, prefix, nonfinite, findings_file, print_findings, update_every)
        self._state = None
        self._handle = None
        self._losses: list[torch.Tensor] = []
        self._summed = False
        self._last_call = None
        self._tensorboard = None
        self._mlflow = None

    @property
    def monitor(self):
        return self.watch.monitor

    @property
    def reports(self):
        return self.watch.reports

    @property
    def findings(self):
        return self.watch.findings

    @property
    def stopped(self) -> str | None:
        return self.watch.stopped

    # -- the Trainer's events --------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._close()  # a run that raised left its hook (the Trainer has no exception event): gone now
        self._state, self._losses, self._last_call = state, [], None
        monitor = self.watch.start(model, optimizer=optimizer, write=self._log)
        monitor.step_count = state.global_step  # resumed from a checkpoint: the Trainer's step numbers
        self._handle = model.register_forward_hook(self._on_model_output, with_kwargs=True)
        self._open_loggers(args, state)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        loss = self._step_loss()
        inputs = self._last_call
        if not self.watch.check_step(loss, state.global_step + 1, self._run_again(), inputs=inputs):
            control.should_training_stop = True
            if state.is_world_process_zero:
                print(self.watch.stopped)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._losses = []

    def on_train_end(self, args, state, control, **kwargs):
        self._close()
        zero = state.is_world_process_zero
        findings = self.watch.finish(
            args.output_dir if zero else None, write=print if zero else None, extra={"global_step": state.global_step}
        )
        state.log_history.append(
            {
                "steadygrad_findings": [f.to_dict() for f in findings],
                "steadygrad_stopped": self.watch.stopped,
                "step": state.global_step,
            }
        )

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _on_model_output(self, module, args, kwargs, output) -> None:
        if not torch.is_grad_enabled() or not module.training:  # evaluation
            return
        self._last_call = (args, kwargs)
        loss = _model_loss(output)
        if loss is not None and self.monitor is not None and (self.monitor.logging or self.watch.nonfinite):
            self._losses.append(loss.detach())
            self._summed = "num_items_in_batch" in kwargs
            self.watch.observe_loss(self._step_loss())

    def _step_loss(self):
        if not self._losses:
            return None
        stacked = torch.stack([loss.float().reshape(()) for loss in self._losses])
        return stacked.sum() if self._summed else stacked.mean()

    def _run_again(self):
        if self._last_call is None or self.watch.model is None:
            return None
        args, kwargs = self._last_call
        model = self.watch.model
        return lambda: _model_loss(model(*args, **kwargs))

    def _open_loggers(self, args, state) -> None:
        if not state.is_world_process_zero:
            return
        report_to = args.report_to if isinstance(args.report_to, list | tuple) else [args.report_to]
        if "tensorboard" in report_to or "all" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass  # the Trainer's own TensorBoard callback would have failed first
            else:
                self._tensorboard = SummaryWriter(log_dir=_tensorboard_dir(args))
        if "mlflow" in report_to or "all" in report_to:
            try:
                import mlflow
            except ImportError:
                pass
            else:
                self._mlflow = mlflow if mlflow.active_run() is not None else None

    def _log(self, report, layers) -> None:
        scalars = report_scalars(report, self.watch.prefix)
        if self._state is not None:
            self._state.log_history.append({**scalars, "step": report.step})
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, report.step)
            self._tensorboard.flush()
        if self._mlflow is not None:
            self._mlflow.log_metrics(scalars, step=report.step)

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        self._mlflow = None
