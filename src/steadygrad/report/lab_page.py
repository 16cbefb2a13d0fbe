"""The lab's report: a summary table of claims with verdicts, then a section per claim."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from steadygrad.lab import ClaimResult
from steadygrad.report.html import Page, Section, figure, write_page

__all__ = ["write_lab_report"]

_KINDS = {"reproduced": "reproduced", "partly reproduced": "partly", "not reproduced": "not", "error": "error"}


def _section(result: ClaimResult) -> Section:
    claim = result.claim
    return Section(
        id=f"claim-{claim.number}",
        title=f"{claim.number}. {claim.title}",
        badge=result.verdict,
        badge_kind=_KINDS.get(result.verdict, "info"),
        fields=[
            ("Source", claim.source),
            ("Setup", claim.setup),
            ("Expected", claim.expected),
            ("Measured", result.summary),
            ("What it teaches", claim.teaches),
            ("Time", f"{result.seconds:.1f} s{' (quick run: reduced size)' if result.quick else ''}"),
        ],
        note=result.notes,
        tables=result.tables,
        figures=[figure(f.title, f.png, f.caption) for f in result.figures],
        pre=result.error,
    )


def write_lab_report(results: list[ClaimResult], out_dir: str | Path, seed: int = 0, seconds: float = 0.0) -> Path:
    """Write ``out_dir/index.html`` (self-contained) and ``out_dir/results.json`` for a lab run."""
    counts = {}
    for result in results:
        counts[result.verdict] = counts.get(result.verdict, 0) + 1
    quick = any(r.quick for r in results)
    page = Page(
        title="steadygrad lab: vanishing and exploding gradients, measured",
        subtitle="Each claim below was run on this machine just now. Its verdict is computed from the numbers it "
        "measured; where a claim does not hold on this data, the page says so."
        + (" This was a quick run at reduced size: some effects need the full run to show." if quick else ""),
        meta=[
            ("Date", time.strftime("%Y-%m-%d %H:%M")),
            ("Machine", f"{platform.machine()}, {torch.get_num_threads()} threads"),
            ("torch", torch.__version__),
            ("Seed", str(seed)),
            ("Total time", f"{seconds:.0f} s"),
            ("Mode", "quick" if quick else "full"),
        ],
        counts=[(verdict, n, _KINDS.get(verdict, "info")) for verdict, n in counts.items()],
        summary={
            "title": "Claims",
            "columns": ["#", "claim", "verdict", "key numbers"],
            "rows": [
                [
                    r.claim.number,
                    {"href": f"#claim-{r.claim.number}", "text": r.claim.title},
                    {"kind": _KINDS.get(r.verdict, "info"), "text": r.verdict},
                    r.summary,
                ]
                for r in results
            ],
        },
        sections=[_section(r) for r in results],
    )
    data = {"seed": seed, "quick": quick, "seconds": seconds, "claims": [r.to_dict() for r in results]}
    return write_page(page, out_dir, data)
