"""``steadygrad doctor``: load the user's model factory, diagnose it, try the fixes, print a patch."""

import math
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.markup import escape
from rich.table import Table

from steadygrad.cli._errors import UsageError, handle_errors
from steadygrad.cli._output import console, write_json
from steadygrad.cli._user import (
    build_user_model,
    load_factory,
    load_user_data,
    parse_factory_args,
    synthetic_inputs,
    user_lines,
)


def _table(report) -> Table:
    table = Table(
        title=f"Candidates: fresh models, {report.repeats} seed(s), held-out loss (vs control: the worst seed)",
        title_justify="left",
    )
    table.add_column("fix", ratio=3)
    for column in ("held-out", "spread", "vs control"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("status", ratio=2)

    def number(v: float) -> str:
        return f"{v:.4g}" if v == v and abs(v) != float("inf") else "-"

    for trial in [report.control, *report.candidates]:
        low, high = trial.spread()
        gains = trial.improvements(report.control) if trial is not report.control else []
        worst = min(gains) if gains else float("nan")
        table.add_row(
            escape(trial.fix),
            number(trial.held_out_loss),
            f"{number(low)}-{number(high)}",
            (f"{worst:+.0%}" if worst > -10 else "< -999%") if gains and math.isfinite(worst) else "-" if gains else "",
            escape(trial.status()),
            style="green"
            if trial is report.recommended
            else "yellow"
            if trial is report.uncertain
            else "red"
            if trial.status()
            else None,
        )
    return table


@handle_errors
def doctor_command(
    target: Annotated[
        str,
        typer.Argument(
            help="The model factory: path/to/file.py:make_model or package.module:make_model "
            "(a callable returning an nn.Module)."
        ),
    ],
    arg: Annotated[
        list[str] | None, typer.Option(help="Keyword argument for the factory, KEY=VALUE (repeatable).")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Training data: a built-in set (digits, spirals, blobs, teacher), a .npz (X, y) or .csv file "
            "(integer arrays stay integers), or FILE.py:FUNC / module:FUNC returning a batch, a Dataset, a "
            "DataLoader or an iterable of batches (HF batches with labels train the model's own loss)."
        ),
    ] = None,
    target_column: Annotated[str | None, typer.Option("--target", help="The target column of a .csv file.")] = None,
    input_shape: Annotated[
        str | None,
        typer.Option(help="Without --data: synthetic standardized inputs of this shape per example, e.g. 3,32,32."),
    ] = None,
    input_dtype: Annotated[
        str,
        typer.Option(help="Without --data: float (with --input-shape) or long (token ids, with --vocab, --seq-len)."),
    ] = "float",
    vocab: Annotated[int | None, typer.Option(min=2, help="Synthetic token ids: the vocabulary size.")] = None,
    seq_len: Annotated[int | None, typer.Option(min=1, help="Synthetic token ids: the sequence length.")] = None,
    classes: Annotated[int | None, typer.Option(help="Synthetic targets: classification (else inferred).")] = None,
    samples: Annotated[int, typer.Option(min=4, help="Examples used (in-memory data and synthetic inputs).")] = 512,
    task: Annotated[str | None, typer.Option(help="classification or regression [default: inferred].")] = None,
    loss: Annotated[
        str | None,
        typer.Option(help="FILE.py:FUNC: loss(output, targets) -> scalar (loss(output) without targets)."),
    ] = None,
    optimizer: Annotated[str, typer.Option(help="momentum (SGD, 0.9), sgd, adam or adamw.")] = "momentum",
    lr: Annotated[
        float | None, typer.Option(help="Learning rate [default: 1e-2 for sgd/momentum, 1e-3 for adam/adamw].")
    ] = None,
    precision: Annotated[str, typer.Option(help="float32 or bf16 (CPU autocast).")] = "float32",
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps per trial.")] = 60,
    batch_size: Annotated[int, typer.Option(min=2, help="Examples per batch for in-memory data.")] = 32,
    repeats: Annotated[int, typer.Option(min=1, help="Seeds per trial: a fix must win in every one.")] = 3,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Worker processes for the trials [default: the cores available].")
    ] = None,
    budget: Annotated[
        float, typer.Option(help="Seconds for everything; seeds, then candidates, are cut to fit (and said).")
    ] = 60.0,
    seed: Annotated[int, typer.Option(help="Seed of the first repeat, the data split and synthetic data.")] = 0,
    json_path: Annotated[
        Path | None, typer.Option("--json", dir_okay=False, help="Write findings, control and candidates as JSON.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Also write an HTML report into this folder.")] = None,
) -> None:
    """Diagnose any PyTorch model, try each candidate fix on fresh copies, and print the one that measurably works.

    Each trial (the unchanged model, then every candidate) builds your model afresh, trains it --steps steps
    on the training batches and is scored on held-out batches it never trained on, for --repeats seeds. A fix
    is recommended only when it beats the unchanged model's held-out loss by 5% in every seed, on a model with
    a finding; your files are never modified.

    Examples:

      steadygrad doctor models.py:mlp --arg depth=30 --data digits --json doctor.json --out doctor-report

      steadygrad doctor lm.py:make_gpt2 --input-dtype long --vocab 256 --seq-len 64 --optimizer adamw --lr 3e-4

      steadygrad doctor lm.py:make_gpt2 --data lm.py:train_loader --optimizer adamw --precision bf16
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from steadygrad.doctor import UserCodeError, doctor

    torch.set_flush_denormal(True)
    factory, user_file = load_factory(target)
    kwargs = parse_factory_args(arg or [])
    data_file = None
    if data is not None:
        dataset, data_file = load_user_data(data, target_column, samples, seed)
    else:
        dataset = synthetic_inputs(samples, input_shape, input_dtype, vocab, seq_len, seed)
    loss_fn, loss_file = load_factory(loss) if loss is not None else (None, None)

    def build():
        return build_user_model(factory, target, user_file, kwargs)

    build()  # a factory that raises is the user's to fix before any trial
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task_id = bar.add_task("Diagnosing...", total=None)

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task_id, completed=done, total=total, description=f"trial {escape(name[:40])}")

        try:
            report = doctor(
                build,
                data=dataset,
                task=task,
                classes=classes,
                steps=steps,
                batch_size=batch_size,
                lr=lr,
                optimizer=optimizer,
                budget=budget,
                seed=seed,
                loss=loss_fn,
                precision=precision,
                repeats=repeats,
                workers=workers,
                progress=progress,
            )
        except UserCodeError as error:
            where = user_lines(error.__cause__, loss_file or data_file or user_file)
            raise UsageError(f"{error.what}:\n{where}") from None
    console.print("[bold]Findings[/]")
    for finding in report.findings or []:
        console.print(f"- {escape(str(finding))}")
    if not report.findings:
        console.print("- none: the gradient flow and the inputs look healthy.")
    console.print(_table(report))
    for note in [*report.notes, f"loss: {report.loss_name}"]:
        console.print(f"[dim]{escape(note)}[/]")
    for note in report.skipped:
        console.print(f"[dim]skipped: {escape(note)}[/]")
    console.print(escape(report.summary().splitlines()[-1]))
    if report.patch():
        console.print("[bold]Patch:[/]")
        console.print(escape(report.patch()), highlight=False)
    if json_path is not None:
        write_json(json_path, report.to_dict())
    if out is not None:
        from steadygrad.report.doctor_page import write_doctor_report

        try:
            console.print(f"Wrote {write_doctor_report(report, out, target)}")
        except OSError as error:
            raise UsageError(
                f"Could not write the report to {out}: {error.strerror}. Choose a writable --out folder."
            ) from None
