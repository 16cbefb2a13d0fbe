"""Figures for flow reports: activation std and gradient norm per layer, several reports overlaid."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

__all__ = ["figure_png", "plot_flow"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless: files and notebooks, never a window
    import matplotlib.pyplot as plt

    return plt


def figure_png(figure) -> bytes:
    """The figure as PNG bytes (and closed, so figures do not pile up in memory)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(figure)
    return buffer.getvalue()


def _positive(values):
    return [v if (v is not None and math.isfinite(v) and v > 0) else math.nan for v in values]


def plot_flow(reports: Sequence, path: str | Path | None = None):
    """Two panels, layer index on x: activation std (left) and ||dL/dy|| (right), log scale; the
    mean-field prediction dashed where a report carries one. Written to ``path`` (PNG) when given."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for report in reports:
        x = [r.index + 1 for r in report.records]
        label = report.label or None
        (line,) = left.plot(x, _positive([r.act_std for r in report.records]), marker=".", label=label)
        right.plot(
            x,
            _positive([r.grad_norm for r in report.records]),
            marker=".",
            color=line.get_color(),
            label=label,
        )
        rms = _positive(
            [
                math.sqrt(r.predicted_second_moment) if r.predicted_second_moment >= 0 else math.nan
                for r in report.records
            ]
        )
        if any(math.isfinite(v) for v in rms):
            left.plot(x, rms, linestyle="--", color=line.get_color(), label="mean-field RMS")
        predicted = _positive([r.predicted_grad_norm for r in report.records])
        if any(math.isfinite(p) for p in predicted):
            right.plot(x, predicted, linestyle="--", color=line.get_color(), label="mean-field prediction")
    from matplotlib.ticker import MaxNLocator

    for axis, title in ((left, "activation std (dashed: predicted RMS)"), (right, "gradient norm ||dL/dy||")):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_yscale("log")
        axis.set_xlabel("layer (execution order)")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    if any(r.label for r in reports) or any(
        math.isfinite(rec.predicted_grad_norm) for r in reports for rec in r.records
    ):
        right.legend(fontsize=8)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure
