"""``steadygrad report PATH``: pages for a probe's JSON and a training run's log directory."""

from __future__ import annotations

import json
from pathlib import Path

from steadygrad.display import Table
from steadygrad.measure.plot import _pyplot, figure_png, plot_flow
from steadygrad.measure.records import FlowReport
from steadygrad.report.html import Page, Section, figure, fmt, slug, write_page

__all__ = ["write_report"]


def _probe_page(payload: dict, source: Path) -> Page:
    entries = payload.get("reports")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{source} has no 'reports' list: it is not the output of `steadygrad probe --json`.")
    reports = [FlowReport.from_dict(entry) for entry in entries]
    rows = [[r.label, fmt(r.input_grad_norm), fmt(r.gradient_ratio), fmt(r.gradient_factor_per_layer)] for r in reports]
    sections = [
        Section(
            "all",
            "All networks",
            figures=[figure("Activation std and gradient norm per layer", figure_png(plot_flow(reports)))],
        )
    ]
    for report in reports:
        table = Table(
            "Per layer",
            ["#", "layer", "kind", "act std", "saturated", "dead", "grad norm", "ratio"],
            [
                [
                    r.index + 1,
                    r.label,
                    r.kind,
                    fmt(r.act_std),
                    fmt(r.saturated),
                    fmt(r.dead),
                    fmt(r.grad_norm),
                    fmt(r.grad_ratio),
                ]
                for r in report.records
            ],
        )
        sections.append(
            Section(
                slug(report.label),
                report.label,
                paragraphs=report.summary().splitlines(),
                tables=[table],
                note=report.theory,
            )
        )
    return Page(
        title="steadygrad probe",
        subtitle=f"How signal and gradient travel through {len(reports)} network(s) at initialization.",
        meta=[
            ("Source", str(source)),
            ("Batch", str(payload.get("batch", "?"))),
            ("Seed", str(payload.get("seed", "?"))),
        ],
        summary={
            "title": "Side by side",
            "columns": ["network", "||dL/dx||", "gradient first/last", "per layer"],
            "rows": rows,
        },
        sections=sections,
    )


def _doctor_page(payload: dict, source: Path) -> Page:
    """The doctor's JSON (``DoctorReport.to_dict``) as a page: findings, the candidates, the recommendation."""
    trials = [payload["control"], *payload["candidates"]]
    rows = [
        [
            t.get("fix", ""),
            fmt(t.get("held_out_loss")),
            " to ".join(fmt(v) for v in t.get("held_out_spread") or []),
            ", ".join(f"{g:+.0%}" for g in t.get("improvement") or [] if g is not None),
            t.get("error", ""),
        ]
        for t in trials
    ]
    verdict = payload.get("recommended") or payload.get("uncertain")
    sections = [
        Section("findings", "Findings", paragraphs=[f.get("message", "") for f in payload["findings"]] or ["None."]),
        Section(
            "candidates",
            "Candidates, measured on held-out batches",
            tables=[Table("", ["fix", "held-out loss", "spread", "vs control, per seed", "status"], rows)],
        ),
        Section(
            "patch",
            "Recommendation",
            paragraphs=[
                f"{'Recommended' if payload.get('recommended') else 'Uncertain'}: {verdict}"
                if verdict
                else "No change recommended."
            ],
            pre=payload.get("patch", ""),
        ),
    ]
    return Page(title="steadygrad doctor", subtitle=str(source), sections=sections)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}, line {number}, is not valid JSON: the file is damaged.") from None
    return rows


def _run_page(folder: Path) -> Page:
    summary = json.loads((folder / "summary.json").read_text())
    epochs = summary.get("epochs", [])
    monitor = _read_jsonl(folder / "monitor.jsonl")
    sections = []
    plt = _pyplot()
    if epochs:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        axes[0].plot([e["epoch"] for e in epochs], [e["test_loss"] for e in epochs], marker="o")
        axes[0].set_title("held-out loss")
        if "test_accuracy" in epochs[0]:
            axes[1].plot([e["epoch"] for e in epochs], [e["test_accuracy"] for e in epochs], marker="o")
            axes[1].set_title("held-out accuracy")
        for ax in axes:
            ax.set_xlabel("epoch")
        columns = [c for c in ("epoch", "step", "lr", "test_loss", "test_accuracy", "seconds") if c in epochs[0]]
        sections.append(
            Section(
                "metrics",
                "Held-out metrics",
                tables=[Table("Per epoch", columns, [[fmt(e[c]) for c in columns] for e in epochs])],
                figures=[figure("Learning curves", figure_png(fig))],
            )
        )
    if monitor:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        layers = list(dict.fromkeys(row["name"] for row in monitor))
        for name in layers:
            rows = [r for r in monitor if r["name"] == name and r.get("grad_norm")]
            axes[0].plot([r["step"] for r in rows], [r["grad_norm"] for r in rows], label=name)
            rows = [r for r in monitor if r["name"] == name and r.get("update_ratio")]
            axes[1].plot([r["step"] for r in rows], [r["update_ratio"] for r in rows], label=name)
        for ax, title in zip(axes, ("||dL/dy|| per layer", "update / weight ratio per layer"), strict=True):
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_title(title)
        if len(layers) <= 12:
            axes[0].legend(fontsize=7)
        sections.append(
            Section(
                "layers",
                "Layers during training",
                figures=[
                    figure("Per-layer gradient norm and relative update size at every logged step", figure_png(fig))
                ],
            )
        )
    findings = summary.get("findings", [])
    sections.append(
        Section(
            "findings",
            "Findings",
            badge=str(len(findings)),
            badge_kind="not" if findings else "reproduced",
            paragraphs=[
                f"[{f['severity']}] {f['message']} Try: " + ", ".join(x["action"] for x in f.get("fixes", []))
                for f in findings
            ]
            or ["No findings: gradients and activations looked healthy at every logged step."],
        )
    )
    config = summary.get("config", {})
    spec = summary.get("spec", {})
    sections.append(
        Section(
            "configuration",
            "Configuration",
            tables=[
                Table(
                    "Network and training settings",
                    ["setting", "value"],
                    [[k, fmt(v)] for k, v in {**spec, **config}.items()],
                )
            ],
        )
    )
    return Page(
        title="steadygrad training run",
        subtitle=summary.get("message", ""),
        meta=[
            ("Run", str(folder)),
            ("Status", summary.get("status", "?")),
            ("Steps", str(summary.get("steps", "?"))),
            ("Data", str(summary.get("data", {}).get("name", "?"))),
            ("Seconds", fmt(summary.get("seconds"))),
        ],
        sections=sections,
    )


def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Render the page for ``path`` and return where it was written."""
    path = Path(path)
    if not path.exists():
        raise ValueError(
            f"Nothing at {path}. Give a training log directory (steadygrad train --logdir) or a probe "
            "JSON file (steadygrad probe --json)."
        )
    if path.suffix in (".sqlite", ".db"):
        from steadygrad.report.sweep_page import write_sweep_report

        return write_sweep_report(path, out)
    if path.is_dir() and (path / "summary.json").is_file():
        page, target = _run_page(path), out or path
    else:
        candidates = [path] if path.is_file() else sorted(path.glob("*.json"))
        probes = []
        for candidate in candidates:
            try:
                payload = json.loads(candidate.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                if path.is_file():
                    raise ValueError(f"{candidate} is not valid JSON.") from None
                continue
            if isinstance(payload, dict) and "reports" in payload:
                probes.append((candidate, payload))
            elif isinstance(payload, dict) and "layers" in payload and "label" in payload:  # FlowReport.to_json()
                probes.append((candidate, {"reports": [payload]}))
            elif isinstance(payload, dict) and {"control", "candidates"} <= set(payload):  # doctor --json
                probes.append((candidate, payload))
        if not probes:
            raise ValueError(
                f"{path} is neither a training log directory (no summary.json) nor a JSON file steadygrad wrote "
                "(probe --json, FlowReport.to_json(), doctor --json)."
            )
        source, payload = probes[0]
        page = _doctor_page(payload, source) if "control" in payload else _probe_page(payload, source)
        target = out or (source.parent if path.is_dir() else source.parent / "steadygrad-report")
    return write_page(page, target)
