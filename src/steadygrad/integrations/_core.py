"""What every framework callback shares: one ``Watch`` over a training run (its Monitor, the scalars it logs, the
non-finite policy, the findings at the end) and the check that names a missing framework's extra."""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from steadygrad.diagnose import Finding, diagnose, findings_text
from steadygrad.measure import Monitor
from steadygrad.measure.monitor import resolve_update_every
from steadygrad.measure.records import FlowReport
from steadygrad.measure.sinks import SCALARS

__all__ = ["FINDINGS_FILE", "NONFINITE_POLICIES", "Watch", "nonfinite_inputs", "report_scalars", "require"]

FINDINGS_FILE = "steadygrad_findings.json"
NONFINITE_POLICIES = (None, "stop")


def require(module: str, extra: str, what: str):
    """Import ``module``, or say which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{what} needs {module.split('.')[0]} ({error}): pip install 'steadygrad[{extra}]'."
        ) from error


def report_scalars(report: FlowReport, prefix: str = "steadygrad") -> dict[str, float]:
    """A logged step's per-layer figures as ``{prefix}/{layer}/{figure}`` scalars (the TensorBoard sink's figures;
    the layer by its module name, ``.call2`` for a module's second call),
    plus ``{prefix}/loss``; NaN and Inf are left out (the ``nonfinite_*`` counts say where they were)."""
    scalars = {}
    if math.isfinite(report.loss):
        scalars[f"{prefix}/loss"] = report.loss
    for record in report.records:
        layer = record.name if record.call == 1 else f"{record.name}.call{record.call}"
        for name in SCALARS:
            value = getattr(record, name)
            if value is not None and math.isfinite(value):
                scalars[f"{prefix}/{layer}/{name}"] = float(value)
    return scalars


class _CallSink:
    """A Monitor sink that hands each report to a function (the framework's loggers)."""

    def __init__(self, write: Callable[[FlowReport, list], None]) -> None:
        self._write = write

    def write(self, report: FlowReport, layers) -> None:
        self._write(report, layers)

    def close(self) -> None:
        pass


def _gradients_finite(parameters: Sequence[nn.Parameter]) -> bool:
    """Whether every gradient value is finite: the largest |g| of each (``_foreach_norm`` with ord=inf, one pass), not
    a 2-norm, which overflows in the gradients' own dtype (float16's 65504) while every value is finite."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack([m.float() for m in torch._foreach_norm(grads, math.inf)])).all())


def _first_nonfinite_gradient(model: nn.Module) -> str | None:
    for name, p in model.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return name
    return None


def nonfinite_inputs(inputs) -> bool:
    """Whether any floating-point tensor in a batch (tensors, sequences and mappings of them) holds NaN/Inf."""
    if isinstance(inputs, torch.Tensor):
        return inputs.is_floating_point() and not bool(torch.isfinite(inputs).all())
    if isinstance(inputs, dict):
        return any(nonfinite_inputs(v) for v in inputs.values())
    if isinstance(inputs, list | tuple):
        return any(nonfinite_inputs(v) for v in inputs)
    return False


class Watch:
    """One training run watched by a Monitor, the same for every framework: each callback translates its
    framework's hooks into ``start``, ``observe_loss``, ``check_step``, ``finish`` and ``stop``.

    Args:
        every: log every k-th optimizer step (steps 1, 1 + k, ...), or a callable ``step -> bool``.
        layers: which layers to record, as for ``probe``.
        prefix: the scalars' names start with it.
        nonfinite: None, or ``"stop"``: a step whose loss or gradient is NaN/Inf is not applied (its gradients are
            dropped before the update), the layer where non-finite values first appear is named, and training stops
            through the framework's own mechanism.
        findings_file: the JSON file the findings are written to, in the framework's log directory (None: none).
        print_findings: print the findings at the end, as ``steadygrad train`` does.
        update_every: measure the update ratio on every k-th logged step (``Monitor``'s ``update_every``; None: its
            default, logged steps at least 10 optimizer steps apart).
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
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}; got {nonfinite!r}.")
        if not callable(every) and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be a positive integer (log every k-th optimizer step); got {every!r}.")
        self.every = every
        self.layers = layers
        self.prefix = prefix
        self.nonfinite = nonfinite
        self.findings_file = findings_file
        self.print_findings = print_findings
        self.update_every = resolve_update_every(update_every, every)  # checked here: a bad value fails before the fit
        self.monitor: Monitor | None = None
        self.model: nn.Module | None = None
        self.findings: list[Finding] = []
        self.stopped: str | None = None  # the non-finite policy's message, when it stopped the run
        self.findings_path: Path | None = None

    @property
    def reports(self) -> list[FlowReport]:
        return self.monitor.history.reports if self.monitor is not None else []

    def start(self, model: nn.Module, optimizer=None, scaler=None, write=None) -> Monitor:
        """Attach a Monitor to ``model`` (its steps: ``optimizer``'s, or any torch optimizer's that updates the model);
        ``write(report, layers)`` gets each logged step's report."""
        self.stop()
        self.model = model
        self.findings, self.stopped, self.findings_path = [], None, None
        sinks = [_CallSink(write)] if write is not None else []
        self.monitor = Monitor(
            model,
            every=self.every,
            layers=self.layers,
            optimizer=optimizer,
            scaler=scaler,
            sinks=sinks,
            update_every=self.update_every,
        )
        return self.monitor.attach()

    def observe_loss(self, loss: torch.Tensor) -> None:
        if self.monitor is not None and isinstance(loss, torch.Tensor):
            self.monitor.observe_loss(loss)

    def check_step(
        self,
        loss: torch.Tensor | None,
        step: int,
        run_pass: Callable[[], torch.Tensor] | None,
        *,
        inputs=None,
        scaled: bool = False,
    ) -> bool:
        """Under the ``stop`` policy, before the update: whether the step's loss and gradients are finite. When they
        are not, the gradients are dropped (the optimizer skips parameters without one, so the weights stay those
        of the last good step), ``run_pass`` (the step's forward and backward again, unrecorded by the run's
        Monitor) names where non-finite values first appear, and ``stopped`` holds the message.
        Returns True to go on.

        With ``scaled`` (a GradScaler at work) Inf gradients are the scaler's to handle (it skips that step and
        lowers its scale): only a non-finite loss stops. ``inputs``, the batch, is checked first: a NaN in the data
        is named as such, not as the first layer's output."""
        if self.nonfinite is None or self.model is None:
            return True
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        loss_finite = loss is None or bool(torch.isfinite(loss.detach()).all())
        if loss_finite and (scaled or _gradients_finite(parameters)):
            return True
        bad_data = nonfinite_inputs(inputs)
        where = "the batch's inputs (the data holds NaN or Inf)" if bad_data else self.locate(run_pass)
        if where is None:  # every output and output gradient finite: the parameters' gradients hold them
            name = _first_nonfinite_gradient(self.model)
            where = f"the gradient of the parameter {name}" if name else "the loss itself"
        self.stopped = self.stop_message(step, "loss" if not loss_finite else "gradient", where)

        for p in parameters:
            p.grad = None
        return False

    @staticmethod
    def stop_message(step: int, what: str, where: str) -> str:
        return f"Training stopped at step {step}: the {what} is not finite; non-finite values first appear in {where}."

    def locate(self, run_pass) -> str | None:
        """Where non-finite values first appear when ``run_pass`` (a forward returning the loss; its backward is run
        here) runs under a one-step Monitor of its own, the run's Monitor paused and the gradients kept; None when
        every layer's output and output gradient was finite."""
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        if run_pass is None:
            return "a layer this callback could not run again"
        saved = [p.grad for p in parameters]
        probe = Monitor(self.model, every=1, layers=self.layers, global_batch=False)
        try:
            with self.monitor.paused():
                for p in parameters:
                    p.grad = None
                probe.attach()
                loss = run_pass()
                if isinstance(loss, torch.Tensor) and loss.requires_grad:
                    loss.backward()
                report = probe.step()
        except Exception as error:  # the user's step failing again must not hide the non-finite stop
            return f"a layer not found: running the step again failed ({type(error).__name__}: {error})"
        finally:
            probe.detach()
            for p, grad in zip(parameters, saved, strict=True):
                p.grad = grad
        return report.first_nonfinite() if report is not None else None

    def finish(
        self,
        directory: str | Path | None = None,
        inputs=None,
        write: Callable[[str], None] | None = print,
        extra: dict | None = None,
    ) -> list[Finding]:
        """Detach, diagnose the logged steps, print the findings and write them to ``directory/findings_file``."""
        model, reports = self.model, list(self.reports)
        self.stop()
        self.findings = diagnose(reports, model=model, inputs=inputs) if reports else []
        if self.print_findings and write is not None:
            label = reports[0].label if reports else type(model).__name__
            write(f"steadygrad: {len(reports)} logged step(s) of {label}")
            if self.findings:
                for line in findings_text(self.findings):
                    write(line)
            elif not reports:
                write("No step was logged, so there is nothing to diagnose.")
            elif self.stopped:
                write("No findings on the logged steps before the non-finite stop.")
            else:
                write(findings_text([])[0])
        if directory is not None and self.findings_file:
            path = Path(directory) / self.findings_file
            path.parent.mkdir(parents=True, exist_ok=True)
            content = {
                "label": reports[0].label if reports else None,
                "logged_steps": [r.step for r in reports],
                "stopped": self.stopped,
                "findings": [f.to_dict() for f in self.findings],
                **(extra or {}),
            }
            path.write_text(json.dumps(content, indent=2, default=str) + "\n", encoding="utf-8")
            self.findings_path = path
        return self.findings

    def stop(self) -> None:
        """Remove every hook (idempotent)."""
        if self.monitor is not None:
            self.monitor.detach()
