"""``SteadygradCallback`` for Lightning 2.x (``pip install "steadygrad[lightning]"``).

    trainer = lightning.Trainer(callbacks=[SteadygradCallback(every=10)])
    trainer.fit(model, data)

Per-layer records every ``every`` optimizer steps go to the trainer's loggers (scalars under ``steadygrad/``;
histograms of each layer's weight and weight gradient where the logger is TensorBoard's), with the real loss
and the update ratios. Lightning's automatic optimization calls ``optimizer.step(closure)``: the Monitor measures
the forward and backward inside that closure (``steadygrad.Monitor``). At the end of ``fit`` the findings are
printed as ``steadygrad train`` prints them, kept on ``callback.findings`` and written to
``steadygrad_findings.json`` in the trainer's log directory.
"""

from __future__ import annotations

from collections.abc import Mapping

from steadygrad.integrations._core import FINDINGS_FILE, Watch, report_scalars, require
from steadygrad.measure.sinks import write_histograms

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package, or neither: then the error names the extra
    pl = require("pytorch_lightning", "lightning", "steadygrad.integrations.lightning")

__all__ = ["SteadygradCallback"]


class SteadygradCallback(pl.Callback):
    """Watch a Lightning fit with a ``steadygrad.Monitor``.

    Args:
        every: log every k-th optimizer step (steps 1, 1 + k, ...), counted as Lightning counts them (gradient
            accumulation: one step per ``accumulate_grad_batches`` batches).
        layers: which layers to record, as for ``steadygrad.probe``.
        prefix: the logged scalars' names start with it: ``steadygrad/<layer>/grad_norm``, ``steadygrad/loss``.
        histograms: also log weight and weight-gradient histograms to loggers that take them (TensorBoard).
        nonfinite: None, or ``"stop"``: a step whose loss or gradients are NaN/Inf is not applied, the layer where
            non-finite values first appear is named (the step's ``training_step`` is run once more, unrecorded),
            and the fit stops through ``trainer.should_stop``; the message is ``callback.stopped``.
        findings_file: the JSON file, in ``trainer.log_dir``, that gets the findings (None: no file).
        print_findings: print the findings at the end of fit (on global rank 0).
        update_every: measure the update ratio on every k-th logged step (``Monitor``'s ``update_every``; None: its
            default, logged steps at least 10 optimizer steps apart).

    The loss recorded for a step is the one Lightning backpropagates, undone of its division by
    ``accumulate_grad_batches``: the mean of the step's micro-batch losses. Under DDP the records are those of
    the global batch, as the Monitor's are; only global rank 0 prints and writes the file.
    """

    def __init__(
        self,
        every: int = 10,
        layers=None,
        prefix: str = "steadygrad",
        histograms: bool = True,
        nonfinite: str | None = None,
        findings_file: str | None = FINDINGS_FILE,
        print_findings: bool = True,
        update_every: int | None = None,
    ) -> None:
        self.watch = Watch(every, layers, prefix, nonfinite, findings_file, print_findings, update_every)
        self.histograms = histograms
        self._trainer = None
        self._step_loss = None  # the sum of the step's normalized micro-batch losses: their mean
        self._batch = None
        self._scaler = None

    @property
    def monitor(self):
        return self.watch.monitor

    @property
    def reports(self):
        """The logged steps' ``FlowReport``s."""
        return self.watch.reports

    @property
    def findings(self):
        """The findings of the last fit (``steadygrad.diagnose.Finding``)."""
        return self.watch.findings

    @property
    def stopped(self) -> str | None:
        """Why the non-finite policy stopped the fit, or None."""
        return self.watch.stopped

    # -- Lightning's hooks ------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        optimizers = list(trainer.optimizers)
        # one optimizer: its steps; several (a GAN's): any torch optimizer's step that updates the module
        optimizer = optimizers[0] if len(optimizers) == 1 else None
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # "16-mixed": its scale is divided out
        self._trainer, self._step_loss, self._batch, self._scaler = trainer, None, None, scaler
        monitor = self.watch.start(pl_module, optimizer=optimizer, scaler=scaler, write=self._log)
        monitor.step_count = trainer.global_step  # a second fit goes on counting as Lightning does

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch = (batch, batch_idx)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        loss = loss.detach()
        if self._scaled():  # "16-mixed": Lightning hands over the loss its GradScaler multiplied
            loss = loss / self._scaler.get_scale()
        if not pl_module.automatic_optimization:  # manual optimization: the loss as the user backpropagates it
            self._step_loss = loss
        else:
            self._step_loss = loss if self._step_loss is None else self._step_loss + loss

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        loss, self._step_loss = self._step_loss, None
        if loss is not None:
            self.watch.observe_loss(loss)
        step = (self.monitor.step_count if self.monitor is not None else trainer.global_step) + 1
        batch = self._batch[0] if self._batch is not None else None
        if not self.watch.check_step(
            loss, step, self._run_again(trainer, pl_module), inputs=batch, scaled=self._scaled()
        ):
            trainer.should_stop = True
            if trainer.is_global_zero:
                print(self.watch.stopped)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._finish(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.watch.stop()

    def teardown(self, trainer, pl_module, stage) -> None:
        self.watch.stop()  # whatever happened, nothing stays attached

    # -- helpers ----------------------------------------------------------------------------------------------
    def _scaled(self) -> bool:
        return self._scaler is not None and self._scaler.is_enabled()

    def _finish(self, trainer) -> None:
        zero = trainer.is_global_zero
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask
        directory = (log_dir or trainer.default_root_dir) if zero else None
        self.watch.finish(directory, write=print if zero else None, extra={"global_step": trainer.global_step})

    def _log(self, report, layers) -> None:
        trainer = self._trainer
        if trainer is None:
            return
        scalars = report_scalars(report, self.watch.prefix)
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            writer = getattr(logger, "experiment", None) if self.histograms and trainer.is_global_zero else None
            if writer is not None and hasattr(writer, "add_histogram"):
                write_histograms(writer, layers, step, prefix=f"{self.watch.prefix}/")

    def _run_again(self, trainer, pl_module):
        """The last batch's ``training_step`` with its backward, for naming a non-finite layer."""
        if self._batch is None:
            return None
        batch, batch_idx = self._batch

        def run():
            with trainer.precision_plugin.forward_context():
                out = pl_module.training_step(batch, batch_idx)
            return out.get("loss") if isinstance(out, Mapping) else out

        return run
