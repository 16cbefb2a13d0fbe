"""The sweep's page: every run in a table, and each metric drawn against the grid's axes."""

from __future__ import annotations

import itertools
import math
import statistics
from pathlib import Path

from steadygrad.display import Table
from steadygrad.measure.plot import _pyplot, figure_png
from steadygrad.report.html import Page, Section, figure, fmt, write_page

__all__ = ["write_sweep_report"]

LOG_METRICS = {"gradient_ratio", "gradient_ratio_at_init", "input_grad_norm", "last_act_std"}
PREFERRED = (
    "gradient_ratio",
    "gradient_ratio_at_init",
    "test_accuracy",
    "test_loss",
    "input_grad_norm",
    "max_saturated",
    "max_dead",
)


def _axes(rows: list[dict]) -> list[str]:
    fields = list(rows[0]["spec"]) if rows else []
    return [f for f in fields if len({json_key(r["spec"][f]) for r in rows}) > 1]


def json_key(value):
    return repr(value)


def _mean(values, geometric: bool = False):
    """Arithmetic mean of the finite values; geometric for ratios spanning orders of magnitude."""
    finite = [v for v in values if isinstance(v, (int, float)) and v is not None and math.isfinite(v)]
    if geometric:
        finite = [v for v in finite if v > 0]
        return statistics.geometric_mean(finite) if finite else math.nan
    return statistics.mean(finite) if finite else math.nan


def _heatmap(rows, metric, x_axis, y_axis):
    plt = _pyplot()
    xs = sorted({r["spec"][x_axis] for r in rows}, key=json_key)
    ys = sorted({r["spec"][y_axis] for r in rows}, key=json_key)
    grid = [
        [
            _mean(
                [
                    r["metrics"].get(metric)
                    for r in rows
                    if r["spec"][x_axis] == x and r["spec"][y_axis] == y and r["status"] == "ok"
                ],
                geometric=metric in LOG_METRICS,
            )
            for x in xs
        ]
        for y in ys
    ]
    log = metric in LOG_METRICS
    shown = [[math.log10(v) if log and v > 0 else (v if not log else math.nan) for v in row] for row in grid]
    fig, ax = plt.subplots(figsize=(1.3 * len(xs) + 3, 0.7 * len(ys) + 2))
    image = ax.imshow(shown, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_yticks(range(len(ys)), [str(y) for y in ys])
    ax.set_xlabel(x_axis)
    ax.set_ylabel(y_axis)
    for i, j in itertools.product(range(len(ys)), range(len(xs))):
        ax.text(j, i, fmt(grid[i][j]), ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(image, ax=ax, label=f"log10 {metric}" if log else metric)
    ax.set_title(f"{metric} ({'geometric ' if log else ''}mean over the other axes and seeds)")
    return figure_png(fig)


def _lines(rows, metric, x_axis, series_axis):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = sorted({r["spec"][x_axis] for r in rows}, key=json_key)
    for value in sorted({r["spec"][series_axis] for r in rows}, key=json_key) if series_axis else [None]:
        points = [
            _mean(
                [
                    r["metrics"].get(metric)
                    for r in rows
                    if r["spec"][x_axis] == x
                    and r["status"] == "ok"
                    and (series_axis is None or r["spec"][series_axis] == value)
                ],
                geometric=metric in LOG_METRICS,
            )
            for x in xs
        ]
        ax.plot([str(x) for x in xs], points, marker="o", label=f"{series_axis}={value}" if series_axis else metric)
    if metric in LOG_METRICS:
        ax.set_yscale("log")
    ax.set_xlabel(x_axis)
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    return figure_png(fig)


def write_sweep_report(db_path: str | Path, out_dir: str | Path | None = None) -> Path:
    from steadygrad.sweep import SweepDB

    db = SweepDB(db_path)
    try:
        rows = db.rows()
    finally:
        db.close()
    if not rows:
        raise ValueError(f"{db_path} holds no runs yet. Run `steadygrad sweep ... --db {db_path}` first.")
    axes = _axes(rows)
    metrics = [m for m in PREFERRED if any(m in r["metrics"] for r in rows)]
    sections = []
    for metric in metrics:
        figures = []
        if len(axes) >= 2:
            figures.append(figure(f"{metric}: {axes[0]} x {axes[1]}", _heatmap(rows, metric, axes[0], axes[1])))
        if axes:
            series = axes[1] if len(axes) >= 2 else None
            figures.append(figure(f"{metric} against {axes[0]}", _lines(rows, metric, axes[0], series)))
        sections.append(Section(metric, metric, figures=figures))
    statuses = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    table_metrics = metrics[:4]
    table = Table(
        "Every run",
        [*axes, "seed", "status", *table_metrics, "seconds"],
        [
            [
                *(str(r["spec"][a]) for a in axes),
                r["seed"],
                r["status"],
                *(fmt(r["metrics"].get(m)) for m in table_metrics),
                fmt(r["seconds"]),
            ]
            for r in rows
        ],
    )
    failures = [
        f"{r['status']}: {json_key({a: r['spec'][a] for a in axes})}: {(r['error'] or '').strip().splitlines()[-1:]}"
        for r in rows
        if r["status"] != "ok"
    ]
    sections.append(Section("runs", "Runs", tables=[table], paragraphs=failures))
    page = Page(
        title="steadygrad sweep",
        subtitle=f"{len(rows)} runs over {', '.join(axes) or 'one configuration'}.",
        meta=[("Database", str(db_path)), *((k, str(v)) for k, v in statuses.items())],
        sections=sections,
    )
    target = out_dir or Path(db_path).with_suffix("")
    return write_page(page, target, {"runs": rows})
