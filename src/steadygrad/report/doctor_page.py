"""The doctor's page: findings, the candidates' measured effect, the loss curves, and the patch."""

from __future__ import annotations

from pathlib import Path

from steadygrad.display import Table
from steadygrad.measure.plot import _pyplot, figure_png
from steadygrad.report.html import Page, Section, figure, fmt, write_page

__all__ = ["write_doctor_report"]


def write_doctor_report(report, out_dir: str | Path, target: str = "") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    for trial in [report.control, *report.candidates]:
        if trial.losses:
            ax.plot(
                range(1, len(trial.losses) + 1),
                trial.losses,
                label=trial.fix,
                lw=2.5 if trial is report.control else 1.2,
            )
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step (first seed: same batches, same initial weights)")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    rows = []
    for t in [report.control, *report.candidates]:
        low, high = t.spread()
        gains = t.improvements(report.control) if t is not report.control else []
        rows.append(
            [
                t.fix,
                fmt(t.held_out_loss),
                f"{fmt(low)} to {fmt(high)}",
                ", ".join(f"{g:+.0%}" if g > -10 else "< -999%" for g in gains),
                fmt(t.grad_ratio),
                f"{t.seconds:.2f}",
                t.status(),
            ]
        )
    best = report.recommended or report.uncertain
    sections = [
        Section(
            "findings",
            "Findings",
            badge=str(len(report.findings)),
            badge_kind="not" if report.findings else "reproduced",
            paragraphs=[
                str(f) + (" Try: " + ", ".join(str(x) for x in f.fixes) if f.fixes else "") for f in report.findings
            ]
            or ["No findings."],
        ),
        Section(
            "candidates",
            "Candidates, measured",
            tables=[
                Table(
                    f"Each fix on fresh models over {report.repeats} seed(s), scored on held-out batches",
                    [
                        "fix",
                        "held-out loss",
                        "spread",
                        "vs control, per seed",
                        "gradient first/last",
                        "seconds",
                        "status",
                    ],
                    rows,
                )
            ],
            figures=[figure("Training loss of every candidate", figure_png(fig))],
        ),
        Section(
            "patch",
            "Recommendation",
            badge="change" if best else "none",
            badge_kind="reproduced" if best else "info",
            paragraphs=[report.summary().splitlines()[-1]],
            pre=report.patch(),
        ),
    ]
    if report.skipped:
        sections.append(Section("skipped", "Skipped", paragraphs=report.skipped))
    if report.notes:
        sections.append(Section("notes", "How it was measured", paragraphs=[*report.notes, report.loss_name]))
    page = Page(
        title="steadygrad doctor", subtitle=target, meta=[("Time", f"{report.seconds:.1f} s")], sections=sections
    )
    return write_page(page, out_dir, report.to_dict())
