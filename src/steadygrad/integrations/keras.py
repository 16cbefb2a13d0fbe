"""``SteadygradCallback`` for ``model.fit`` on Keras 3's torch backend (``pip install "steadygrad[keras]"``,
``KERAS_BACKEND=torch``).

    model.fit(x, y, callbacks=[SteadygradCallback(every=10)])      # or every="epoch"

A Keras optimizer is not a ``torch.optim`` one, so this callback closes the Monitor's steps itself: a step is one
``train_step`` (forward, backward, Keras' update), closed at the end of its batch. The gradients are still on the
weights then (Keras clears them at the next step); the update ratio is measured against a copy of the weights taken
at the batch's start; the weight variance is that after the update. The loss is the batch's own, as Keras' loss
function computed it (``logs["loss"]`` is the running mean of the epoch). Validation batches are not recorded.
"""

from __future__ import annotations

import inspect
import math

import torch

from steadygrad.integrations._core import FINDINGS_FILE, Watch, nonfinite_inputs, require

keras = require("keras", "keras", "steadygrad.integrations.keras")

__all__ = ["SteadygradCallback"]


class SteadygradCallback(keras.callbacks.Callback):
    """Watch a Keras ``fit`` with a ``steadygrad.Monitor``.

    Args:
        every: log every k-th batch (batches 1, 1 + k, ... over the whole fit), or ``"epoch"``: each epoch's first.
        layers: which layers to record, as for ``steadygrad.probe`` (Keras' layer names).
        log_dir: a directory for ``steadygrad_findings.json`` (None: no file).
        print_findings: print the findings at the end of fit.
        nonfinite: None, or ``"stop"``: a batch whose loss is NaN/Inf stops the fit (``model.stop_training``), with
            the layer where non-finite values first appear named (the batch runs once more, unrecorded) in
            ``callback.stopped``. Keras applies a batch's update before any callback runs, so the weights are
            copied at each batch's start under this policy and put back: the model keeps the last good weights
            (the optimizer's moments have taken the bad step).
        update_every: measure the update ratio on every k-th logged batch (``Monitor``'s ``update_every``; None: its
            default, logged batches at least 10 batches apart; each epoch with ``every="epoch"``).

    ``callback.reports`` holds the logged ``FlowReport``s, ``callback.findings`` the findings at the end.
    """

    def __init__(
        self,
        every: int | str = 10,
        layers=None,
        log_dir=None,
        print_findings: bool = True,
        nonfinite: str | None = None,
        update_every: int | None = None,
    ) -> None:
        super().__init__()
        if every != "epoch" and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f'every must be a positive integer (every k-th batch) or "epoch"; got {every!r}.')
        self.every = every
        self.watch = Watch(
            every if isinstance(every, int) else 1,
            layers,
            nonfinite=nonfinite,
            findings_file=FINDINGS_FILE,
            print_findings=print_findings,
            update_every=1 if update_every is None and every == "epoch" else update_every,  # epochs: each one
        )
        self._good: list[torch.Tensor] = []  # the weights at the batch's start, under the non-finite policy
        self._bad = None  # compute_loss's arguments of a batch whose loss was not finite
        self.log_dir = log_dir
        self._before: dict[str, torch.Tensor] = {}
        self._validation = None
        self._compute_loss = None
        self._loss_owner = None

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

    # -- Keras' hooks ----------------------------------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._unwrap_loss()  # a fit that raised left its loss hook (Keras has no exception event): gone now
        if self.every == "epoch":
            steps = (self.params or {}).get("steps") or 1
            self.watch.every = lambda step: (step - 1) % steps == 0
        self.watch.start(self.model)
        self._wrap_loss()

    def on_train_batch_begin(self, batch, logs=None):
        monitor = self.monitor
        if monitor is not None and monitor.logging and monitor.logged_count % monitor.update_every == 0:
            self._before = {name: w.detach().clone() for name, w in monitor.watched_weights() if w is not None}
        if self.watch.nonfinite is not None:
            self._good = [v.value.detach().clone() for v in self.model.trainable_weights]

    def on_train_batch_end(self, batch, logs=None):
        if self.monitor is None:
            return
        report = self.monitor.step()
        if report is not None:
            after = dict(self.monitor.watched_weights())
            for record in report.records:
                old, new = self._before.get(record.name), after.get(record.name)
                record.update_measured = bool(self._before)  # the weights were copied before this step
                if old is not None and new is not None:
                    norm = torch.linalg.vector_norm(old, dtype=torch.float64)
                    change = torch.linalg.vector_norm(new.detach() - old, dtype=torch.float64)
                    record.update_ratio = float(change / norm) if norm > 0 else math.nan
        self._before = {}
        if self._bad is not None:
            self._stop(batch)

    def _stop(self, batch) -> None:
        kwargs, self._bad = self._bad, None
        model = self.model

        def run_pass():
            return self._compute_loss(**{**kwargs, "y_pred": model(kwargs["x"], training=True)})

        data = nonfinite_inputs(kwargs.get("x"))
        where = "the batch's inputs (the data holds NaN or Inf)" if data else self.watch.locate(run_pass)
        where = where or "the loss itself: every layer's output and gradient was finite"
        with torch.no_grad():
            for variable, good in zip(model.trainable_weights, self._good, strict=True):
                variable.value.copy_(good)
        step = self.monitor.step_count if self.monitor is not None else batch + 1
        self.watch.stopped = self.watch.stop_message(step, "loss", where) + " The weights are those before that batch."
        model.stop_training = True
        print(self.watch.stopped)

    def on_test_begin(self, logs=None):
        if self.monitor is not None and self._validation is None:  # validation inside fit: not training
            self._validation = self.monitor.paused()
            self._validation.__enter__()

    def on_test_end(self, logs=None):
        if self._validation is not None:
            self._validation.__exit__(None, None, None)
            self._validation = None

    def on_train_end(self, logs=None):
        self._unwrap_loss()
        self.watch.finish(self.log_dir)

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _wrap_loss(self) -> None:
        """The batch's loss, as the model's ``compute_loss`` returns it to ``train_step``."""
        model, original = self.model, self.model.compute_loss
        watch = self.watch

        def compute_loss(*args, **kwargs):
            loss = original(*args, **kwargs)
            if isinstance(loss, torch.Tensor) and torch.is_grad_enabled():
                watch.observe_loss(loss)
                if watch.nonfinite is not None and not bool(torch.isfinite(loss.detach()).all()):
                    self._bad = dict(inspect.signature(original).bind(*args, **kwargs).arguments)
            return loss

        self._compute_loss, self._loss_owner = original, model
        object.__setattr__(model, "compute_loss", compute_loss)

    def _unwrap_loss(self) -> None:
        if self._compute_loss is not None:
            object.__delattr__(self._loss_owner, "compute_loss")
            self._compute_loss = self._loss_owner = None
