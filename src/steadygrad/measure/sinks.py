"""Where a Monitor's reports go: memory, a JSON Lines file, TensorBoard. A sink has write and close."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from steadygrad.kinds import parameter_role
from steadygrad.measure.records import FlowReport
from steadygrad.measure.stats import layer_parameters, primary_layer

__all__ = ["SCALARS", "HistorySink", "JsonlSink", "Sink", "TensorBoardSink", "write_histograms"]


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
