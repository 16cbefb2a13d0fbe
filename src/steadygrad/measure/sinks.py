"""Where a Monitor's reports go: memory, a JSON Lines file, TensorBoard, MLflow. A sink has write and close."""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from steadygrad.kinds import parameter_role
from steadygrad.measure.records import FlowReport
from steadygrad.measure.stats import layer_parameters, primary_layer

__all__ = [
    "SCALARS",
    "HistorySink",
    "JsonlSink",
    "MLflowSink",
    "Sink",
    "TensorBoardSink",
    "mlflow_key",
    "sqlite_uri",
    "write_histograms",
]


class Sink(Protocol):
    def write(self, report: FlowReport, layers: list[tuple[str, nn.Module]]) -> None: ...

    def close(self) -> None: ...


class HistorySink:
    """Keeps every report in memory: ``reports``, ``to_dicts()`` (one dict per layer and step) and
    ``to_dataframe()`` (needs pandas: ``pip install steadygrad[pandas]``)."""

    def __init__(self) -> None:
        self.reports: list[FlowReport] = []

    def write(self, report: FlowReport, layers) -> None:
        self.reports.append(report)

    def close(self) -> None:
        pass

    def to_dicts(self) -> list[dict]:
        return [
            {"step": r.step, "loss": None if math.isnan(r.loss) else r.loss, **rec.to_dict()}
            for r in self.reports
            for rec in r.records
        ]

    def to_dataframe(self):
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(
                "to_dataframe() needs pandas: pip install 'steadygrad[pandas]', or use to_dicts()."
            ) from None
        return pd.DataFrame(self.to_dicts())


class JsonlSink:
    """Appends one JSON object per layer and logged step to ``path`` (NaN written as null), flushed each
    step, so a crash loses nothing already logged. Read it with ``pandas.read_json(path, lines=True)``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, report: FlowReport, layers) -> None:
        loss = None if math.isnan(report.loss) else report.loss
        for record in report.records:
            self._file.write(json.dumps({"step": report.step, "loss": loss, **record.to_dict()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


SCALARS = (
    "grad_norm",
    "act_std",
    "act_mean",
    "saturated",
    "dead",
    "weight_grad_norm",
    "update_ratio",
    "nonfinite_act",
    "nonfinite_grad",
)


def write_histograms(writer, layers: list[tuple[str, nn.Module]], step: int, prefix: str = "") -> None:
    """Histograms of each layer's weight and weight gradient (``{prefix}{layer}/weight``, ``.../weight_grad``) through
    a TensorBoard ``SummaryWriter``'s ``add_histogram``; NaN and Inf left out (TensorBoard cannot draw them)."""
    for name, module in layers:
        layer = primary_layer(module)
        named = layer_parameters(layer) if layer is not None else []
        weight = next((p for n, p in named if parameter_role(n) == "weight"), None)  # Keras' kernel too
        if not isinstance(weight, torch.Tensor):
            continue
        for tag, values in ((f"{prefix}{name}/weight", weight), (f"{prefix}{name}/weight_grad", weight.grad)):
            if values is None:
                continue
            values = values.detach().flatten()
            finite = values[torch.isfinite(values)]
            if finite.numel():
                writer.add_histogram(tag, finite.cpu(), step)


class TensorBoardSink:
    """Scalars per layer (``layer/grad_norm``, ``layer/act_std``, ...) and histograms of each layer's
    weight and weight gradient, through ``torch.utils.tensorboard`` (``pip install steadygrad[tensorboard]``).

    Non-finite values are counted (the ``nonfinite_*`` scalars) and left out of the histograms, which
    TensorBoard cannot draw with NaN or Inf in them; a scalar that is NaN is skipped."""

    def __init__(self, logdir: str | Path, histograms: bool = True) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(
                "TensorBoard logging needs the tensorboard package: pip install 'steadygrad[tensorboard]'."
            ) from None
        self.writer = SummaryWriter(log_dir=str(logdir))
        self.histograms = histograms

    def write(self, report: FlowReport, layers: list[tuple[str, nn.Module]]) -> None:
        step = report.step or 0
        if math.isfinite(report.loss):
            self.writer.add_scalar("loss", report.loss, step)
        for record in report.records:
            for name in SCALARS:
                value = getattr(record, name)
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(f"{record.label}/{name}", value, step)
        if self.histograms:
            write_histograms(self.writer, layers, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# -- MLflow ---------------------------------------------------------------------------------------------

_NOT_IN_KEYS = re.compile(r"[^A-Za-z0-9_\-. /]")  # MLflow's key characters, less ':' (refused on Windows)
_KEY_LENGTH = 200  # of a layer's part: with "/weight_grad_norm" and a suffix, under MLflow's 250
_BATCH = 1000  # MLflow's most metrics in one log_batch call


def mlflow_key(text: str) -> str:
    """``text`` as an MLflow metric key, the same on every platform: each character other than an ASCII letter,
    digit, ``_``, ``-``, ``.``, space or ``/`` becomes ``_`` (``3 (Tanh)`` -> ``3 _Tanh_``, ``h[0]*`` ->
    ``h_0__``); empty path segments are dropped (``a//b`` -> ``a/b``, no leading or trailing ``/``) and a
    segment ``.`` or ``..`` becomes ``_`` or ``__`` (MLflow refuses keys that a path would normalize); an empty
    result is ``_``. MLflow itself also accepts ``:`` and non-ASCII letters, except on Windows."""
    parts = [part for part in _NOT_IN_KEYS.sub("_", text).split("/") if part]
    return "/".join("_" * len(part) if part in (".", "..") else part for part in parts) or "_"


def sqlite_uri(path: str | Path) -> str:
    """The MLflow tracking URI of a SQLite store at ``path`` (made absolute): ``sqlite:////abs/path/mlflow.db``."""
    return f"sqlite:///{Path(path).resolve().as_posix()}"


def _import_mlflow():
    try:
        import mlflow
        import mlflow.entities
        import mlflow.exceptions
        import mlflow.tracking
    except ImportError:
        raise ImportError("MLflow logging needs the mlflow package: pip install 'steadygrad[mlflow]'.") from None
    return mlflow


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__


def _user_tag() -> dict[str, str]:
    """Who started the run, as MLflow's own ``mlflow.start_run`` records it (an ``MlflowClient`` run is 'unknown')."""
    import getpass

    try:
        return {"mlflow.user": getpass.getuser()}
    except (OSError, KeyError, ImportError):  # no login name in this environment
        return {}


def _finite_json(value):
    """``value`` with every NaN or infinity as None, so that ``json.dumps`` writes valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_json(v) for v in value]
    return value


class MLflowSink:
    """The scalars of ``TensorBoardSink`` (``layer/grad_norm``, ``layer/act_std``, ... and ``loss``) as MLflow
    metrics at each report's step, one ``log_batch`` call per logged step (``pip install steadygrad[mlflow]``).

    The run is this sink's own, created through an ``MlflowClient`` in ``experiment`` (created if missing), so
    it never touches ``mlflow.active_run()``: a run of yours stays active and untouched. ``close()`` ends it
    (FINISHED, or the ``status`` given). With ``run_id`` the sink logs into that existing run instead and
    leaves it open.

    ``tracking_uri``: a server (``http://host:5000``), a database (``sqlite:///mlflow.db``) or any URI MLflow
    takes; None means the URI you gave MLflow (``mlflow.set_tracking_uri``, ``$MLFLOW_TRACKING_URI``), else a
    SQLite store ``mlflow.db`` in the current directory, with the artifacts in MLflow's default ``./mlruns``
    (``mlflow ui`` run there shows both; MLflow 3 refuses the old ``./mlruns`` file store unless
    ``MLFLOW_ALLOW_FILE_STORE=true``). ``artifact_location``
    is where a new experiment keeps its artifacts; ``tags`` are set on the run.

    Layer labels become keys through ``mlflow_key`` (MLflow refuses ``(``, ``[``, ``*``...); two labels that
    would share a key get ``_2``, ``_3``... in the order they are first seen. NaN and Inf are never sent: such a
    value is skipped, and the ``nonfinite_act`` / ``nonfinite_grad`` counts say how many there were. A failing
    call to MLflow (server down, disk full) never stops training: it is warned about once, counted in
    ``failures``, and the next step is tried again. Importing steadygrad never imports mlflow; this does."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "steadygrad",
        run_name: str | None = None,
        run_id: str | None = None,
        *,
        artifact_location: str | Path | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        mlflow = _import_mlflow()
        self._metric, self._param, self._tag = mlflow.entities.Metric, mlflow.entities.Param, mlflow.entities.RunTag
        if tracking_uri is None:
            set_by_user = mlflow.tracking.is_tracking_uri_set()  # mlflow.set_tracking_uri or $MLFLOW_TRACKING_URI
            tracking_uri = mlflow.get_tracking_uri() if set_by_user else sqlite_uri("mlflow.db")
        self.tracking_uri = str(tracking_uri)
        if isinstance(artifact_location, Path):
            artifact_location = artifact_location.resolve().as_uri()
        try:
            self.client = mlflow.MlflowClient(self.tracking_uri)
            if run_id is None:
                experiment_id = self._experiment_id(experiment, artifact_location)
                run = self.client.create_run(experiment_id, run_name=run_name, tags={**_user_tag(), **(tags or {})})
            else:
                run = self.client.get_run(run_id)
                if tags:
                    self.client.log_batch(run_id, tags=[self._tag(k, str(v)) for k, v in tags.items()])
        except (mlflow.exceptions.MlflowException, OSError) as error:
            what = f"the run {run_id!r}" if run_id is not None else f"a run in experiment {experiment!r}"
            raise ValueError(f"MLflow could not start {what} at {self.tracking_uri}: {_first_line(error)}") from error
        self.run_id: str = run.info.run_id
        self.owns_run = run_id is None  # only a run it created is ended by close()
        self.failures = 0  # calls to MLflow that failed (the first one warned about)
        self._keys: dict[str, str] = {}  # layer label -> its key prefix
        self._closed = False

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client.create_experiment(name, artifact_location=artifact_location)
            except MlflowException:  # another process created it first
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage != "active":
            raise ValueError(
                f"The MLflow experiment {name!r} at {self.tracking_uri} is deleted: restore it "
                f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or log to another one."
            )
        return experiment.experiment_id

    def _prefix(self, label: str) -> str:
        prefix = self._keys.get(label)
        if prefix is None:
            base = mlflow_key(label)[:_KEY_LENGTH]
            taken = set(self._keys.values())
            prefix, n = base, 2
            while prefix in taken:
                prefix, n = f"{base}_{n}", n + 1
            self._keys[label] = prefix
        return prefix

    def _send(self, what: str, call, *args, **kwargs) -> bool:
        """Call MLflow; a failure of any kind is warned about (the first time) and training goes on."""
        try:
            call(*args, **kwargs)
        except Exception as error:  # the client's own errors, the network's, the database's: none may stop training
            self.failures += 1
            if self.failures == 1:
                warnings.warn(
                    f"MLflow logging failed ({what} in run {self.run_id} at {self.tracking_uri}): "
                    f"{type(error).__name__}: {_first_line(error)}. "
                    "Training goes on; later failures are counted in MLflowSink.failures, not warned about.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return False
        return True

    def metrics(self, report: FlowReport) -> list:
        """The ``mlflow.entities.Metric``s that ``write`` sends for ``report``: only finite values."""
        step, stamp = report.step or 0, int(time.time() * 1000)
        metrics = []
        if math.isfinite(report.loss):
            metrics.append(self._metric("loss", float(report.loss), stamp, step))
        for record in report.records:
            prefix = self._prefix(record.label)
            for name in SCALARS:
                value = getattr(record, name)
                if value is not None and math.isfinite(value):
                    metrics.append(self._metric(f"{prefix}/{name}", float(value), stamp, step))
        return metrics

    def write(self, report: FlowReport, layers=None) -> None:
        metrics = self.metrics(report)
        for start in range(0, len(metrics), _BATCH):  # one call unless a model has over 110 layers
            self._send(
                f"metrics of step {report.step}", self.client.log_batch, self.run_id, metrics[start : start + _BATCH]
            )

    def log_params(self, params: dict) -> None:
        """Log ``params`` (values as text; MLflow keeps a param's first value) as the run's params."""
        entries = [self._param(mlflow_key(str(k)), str(v)) for k, v in params.items()]
        for start in range(0, len(entries), 100):  # MLflow's most params in one call
            self._send("params", self.client.log_batch, self.run_id, params=entries[start : start + 100])

    def log_findings(self, findings) -> None:
        """Record ``findings`` (objects with ``to_dict()``, such as ``steadygrad.diagnose.Finding``) as the run's
        artifact ``findings.json`` (a JSON list, NaN as null) and their count as the tag ``steadygrad.findings``.
        Also after ``close()`` (MLflow takes artifacts and tags in an ended run), so after leaving a Monitor."""
        payload = json.dumps([_finite_json(f.to_dict()) for f in findings], indent=2, default=str)
        self._send("findings.json", self.client.log_text, self.run_id, payload, "findings.json")
        self._send("the findings tag", self.client.set_tag, self.run_id, "steadygrad.findings", str(len(findings)))

    def close(self, status: str = "FINISHED") -> None:
        """End the run this sink created with ``status`` (FINISHED, FAILED or KILLED); a run given by ``run_id``
        is left as it is. Once only: later calls do nothing."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"An MLflow run ends FINISHED, FAILED or KILLED; got status={status!r}.")
        if self._closed:
            return
        self._closed = True
        if self.owns_run:
            self._send("ending the run", self.client.set_terminated, self.run_id, status)
