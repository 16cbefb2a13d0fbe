"""``steadygrad demo`` (the lab and its report) and ``steadygrad report DIR``."""

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from steadygrad import lab
from steadygrad.cli._errors import UsageError, handle_errors
from steadygrad.cli._output import console

_STYLE = {"reproduced": "green", "partly reproduced": "yellow", "not reproduced": "red", "error": "red"}


def _parse_only(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--only takes claim numbers separated by commas, e.g. --only 1,5,19; got {text!r}.") from None


@handle_errors
def demo_command(
    quick: Annotated[
        bool, typer.Option(help="Every claim at reduced size (about 15 s instead of about a minute).")
    ] = False,
    only: Annotated[str | None, typer.Option(help="Run only these claims, e.g. --only 5,19 (see --list).")] = None,
    out: Annotated[Path, typer.Option(help="Folder for index.html and results.json.")] = Path("steadygrad-report"),
    seed: Annotated[int, typer.Option(help="Seed of every experiment.")] = 0,
    list_claims: Annotated[bool, typer.Option("--list", help="List the claims and exit.")] = False,
) -> None:
    """Run the lab: every claim about vanishing and exploding gradients, measured on this machine, with a
    verdict computed from the numbers; writes a self-contained HTML report (OUT/index.html).

    Examples:

      steadygrad demo                  # the full lab, about a minute on 2 cores

      steadygrad demo --quick --only 5,6,19 --out /tmp/lab
    """
    if list_claims:
        table = Table(title="The lab's claims", title_justify="left")
        for column in ("#", "claim", "source"):
            table.add_column(column)
        for claim in lab.claims():
            table.add_row(str(claim.number), escape(claim.title), escape(claim.source))
        console.print(table)
        return
    selected = _parse_only(only)
    start = time.perf_counter()
    results = []
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[claim]}"),
        console=console,
        transient=True,
    ) as progress:
        count = len(selected) if selected is not None else len(lab.EXPERIMENTS)
        task = progress.add_task("lab", total=count, claim="")

        def started(claim):
            progress.update(task, claim=f"claim {claim.number}: {escape(claim.title[:60])}")

        def finished(result):
            results.append(result)
            progress.advance(task)
            style = _STYLE.get(result.verdict, "white")
            progress.console.print(
                f"[{style}]{result.verdict:>18}[/]  {result.claim.number:2d}. "
                f"{escape(result.claim.title)} [dim]({result.seconds:.1f} s)[/]"
            )

        lab.run(quick=quick, only=selected, seed=seed, on_result=finished, on_start=started)
    from steadygrad.report import write_lab_report

    try:
        path = write_lab_report(results, out, seed=seed, seconds=time.perf_counter() - start)
    except OSError as error:
        raise UsageError(
            f"Could not write the report to {out}: {error.strerror}. Choose a writable --out folder."
        ) from None
    counts = {}
    for result in results:
        counts[result.verdict] = counts.get(result.verdict, 0) + 1
    console.print(
        ", ".join(f"{n} {verdict}" for verdict, n in counts.items())
        + f" in {time.perf_counter() - start:.0f} s. Open {path}"
    )


@handle_errors
def report_command(
    path: Annotated[
        Path, typer.Argument(help="A training log directory, a probe JSON file (--json), or a folder holding one.")
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for index.html [default: PATH itself, or steadygrad-report next to a file]."),
    ] = None,
) -> None:
    """Render a self-contained HTML page (figures inline) for a probe's JSON or a training run's log directory.

    Examples:

      steadygrad train --logdir runs/a && steadygrad report runs/a

      steadygrad probe --act tanh,relu --json probe.json && steadygrad report probe.json
    """
    from steadygrad.report.runs import write_report

    written = write_report(path, out)
    console.print(f"Wrote {written}")
