"""``steadygrad sweep``: every combination of a grid of network specs, probed or trained, into SQLite."""

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from steadygrad import data as sg_data
from steadygrad.cli._errors import UsageError, handle_errors
from steadygrad.cli._output import console
from steadygrad.nets import SPEC_OPTIONS
from steadygrad.sweep import TASKS, Job, SweepDB, expand_grid, run_sweep


def _grid(items: list[str]) -> dict[str, str]:
    """``["depth=10,50", "act=relu"]`` -> ``{"depth": "10,50", "act": "relu"}``, keys as the options' names."""
    grid: dict[str, str] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise UsageError(
                f"--grid takes OPTION=V1,V2,... items (e.g. depth=10,50 act=relu,tanh); got {item!r}. "
                f"OPTION is one of {', '.join(SPEC_OPTIONS)}."
            )
        key = key.strip().lstrip("-").replace("_", "-")
        if key not in SPEC_OPTIONS:
            raise UsageError(
                f"--grid has no network option {key!r}. Accepted: {', '.join(SPEC_OPTIONS)} "
                "(the network options of `steadygrad probe`)."
            )
        grid[key] = values
    return grid


@handle_errors
def sweep_command(
    grid: Annotated[
        list[str],
        typer.Option(
            help="OPTION=V1,V2,... for any network option of `steadygrad probe` "
            f"({', '.join(SPEC_OPTIONS)}); more may follow."
        ),
    ],
    more: Annotated[
        list[str] | None, typer.Argument(help="Further OPTION=V1,V2,... items of the grid.", show_default=False)
    ] = None,
    task: Annotated[
        str, typer.Option(help="probe: the gradient flow at initialization; train: train each network.")
    ] = "probe",
    db: Annotated[Path, typer.Option(help="The SQLite database of runs (created if missing; resumed if not).")] = Path(
        "sweep.sqlite"
    ),
    repeat: Annotated[int, typer.Option(min=1, help="Seeds per combination.")] = 1,
    seed: Annotated[int, typer.Option(help="The first seed.")] = 0,
    data: Annotated[
        str | None, typer.Option(help="train: the data (digits, spirals, blobs, teacher or a file).")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="train: epochs per run.")] = 3,
    lr: Annotated[float, typer.Option(help="train: learning rate.")] = 1e-3,
    optimizer: Annotated[str, typer.Option(help="train: sgd, momentum, adam or adamw.")] = "adam",
    batch: Annotated[int, typer.Option(min=2, help="probe: examples in the batch.")] = 128,
    executor: Annotated[str, typer.Option(help="local (a process pool) or ray.")] = "local",
    workers: Annotated[
        int | None, typer.Option(min=1, help="local: worker processes [default: the CPU count].")
    ] = None,
    address: Annotated[str | None, typer.Option(help="ray: the cluster address [default: start a local Ray].")] = None,
) -> None:
    """Run every combination of a grid of networks (times --repeat seeds), probed or trained, and store each
    finished run in SQLite. Kill it at any moment and run the same command again: it continues where it
    stopped, with no duplicate run. A failing run is recorded with its error and the sweep goes on.

    Examples:

      steadygrad sweep --grid depth=10,50 act=relu,tanh init=he_uniform,glorot_uniform norm=none,batch --db s.sqlite

      steadygrad sweep --grid depth=10,30 act=relu,sigmoid --task train --data digits --repeat 3 --db t.sqlite

      steadygrad report s.sqlite
    """
    if task not in TASKS:
        raise UsageError(f"Unknown task {task!r}. Accepted: {', '.join(TASKS)}.")
    specs = expand_grid(_grid([*grid, *(more or [])]))
    if task == "train":
        tokens = data in sg_data.TOKEN_SETS
        wrong = [s.get("kind") or "mlp" for s in specs if (s.get("kind") == "transformer") != tokens]
        if wrong:
            raise UsageError(
                f"--task train on {data} cannot train kind {wrong[0]}: kind transformer reads the token sets "
                f"({', '.join(sg_data.TOKEN_SETS)}; --data copy, say) and only it does. Sweep transformers and the "
                "other kinds separately."
            )
    train = {"epochs": epochs, "lr": lr, "optimizer": optimizer} if task == "train" else {}
    jobs = [
        Job(spec, task, seed + r, data if task == "train" else None, train, batch)
        for spec in specs
        for r in range(repeat)
    ]
    database = SweepDB(db)
    already = len(database.done() & {job.key for job in jobs})
    console.print(f"{len(jobs)} runs ({len(specs)} networks x {repeat} seed(s)); {already} already in {db}.")
    with Progress(
        TextColumn("[bold]sweep"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[last]}"),
        console=console,
    ) as progress:
        bar = progress.add_task("sweep", total=len(jobs) - already, last="")

        def recorded(row):
            mark = {"ok": "[green]ok[/]", "diverged": "[yellow]diverged[/]"}.get(row["status"], "[red]failed[/]")
            progress.update(bar, advance=1, last=f"{mark} {escape(row['key'][:8])} ({row['seconds']:.1f} s)")

        try:
            summary = run_sweep(jobs, database, executor=executor, workers=workers, address=address, on_row=recorded)
        except KeyboardInterrupt:
            stored = len(database.done() & {job.key for job in jobs})
            database.close()
            progress.stop()
            console.print(
                f"Interrupted: {stored} of {len(jobs)} runs are in {db} and the workers are stopped; the same command "
                "runs the rest."
            )
            raise typer.Exit(130) from None
    database.close()
    console.print(
        f"Ran {summary.ran} run(s) in {summary.seconds:.0f} s ({summary.failed} failed or diverged); "
        f"{summary.skipped} were already done. See them: steadygrad report {db}"
    )
