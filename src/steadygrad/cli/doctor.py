"""``steadygrad doctor``: load the user's model factory, diagnose it, try the fixes, print a patch."""

import ast
import importlib
import importlib.util
import sys
import traceback
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.markup import escape
from rich.table import Table

from steadygrad import data as sg_data
from steadygrad.cli._errors import UsageError, handle_errors
from steadygrad.cli._output import console, write_json


def _user_lines(error: BaseException, user_file: str | None) -> str:
    """The frames of the traceback that are in the user's code (not steadygrad's, torch's or Python's)."""
    frames = traceback.extract_tb(error.__traceback__)
    mine = [
        f
        for f in frames
        if (user_file and Path(f.filename).resolve() == Path(user_file).resolve())
        or (
            "site-packages" not in f.filename
            and "steadygrad" not in f.filename
            and "importlib" not in f.filename
            and not f.filename.startswith("<")
        )
    ]
    text = "".join(traceback.format_list(mine[-4:])) if mine else ""
    return text + f"{type(error).__name__}: {error}"


def load_factory(target: str):
    """``path/to/file.py:make_model`` or ``package.module:make_model`` -> (the callable, the file or None)."""
    module_part, sep, name = target.rpartition(":")
    if not sep or not module_part or not name:
        raise UsageError(f"Give the model factory as FILE.py:FUNCTION or package.module:FUNCTION; got {target!r}.")
    user_file = None
    try:
        if module_part.endswith(".py") or "/" in module_part:
            path = Path(module_part)
            if not path.is_file():
                raise UsageError(f"No file {path}: give the path of the .py file that defines {name}.")
            user_file = str(path.resolve())
            spec = importlib.util.spec_from_file_location(f"_steadygrad_user_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.path.insert(0, str(path.resolve().parent))  # its own imports of neighbouring files
            try:
                spec.loader.exec_module(module)
            finally:
                sys.path.pop(0)
        else:
            module = importlib.import_module(module_part)
    except ValueError:
        raise
    except ModuleNotFoundError as error:
        raise UsageError(
            f"Cannot import {module_part}: {error}. Give FILE.py:FUNCTION or an importable package.module:FUNCTION."
        ) from None
    except Exception as error:
        raise UsageError(f"Importing {module_part} failed:\n{_user_lines(error, user_file)}") from None
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        available = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        raise UsageError(f"{module_part} has no callable {name!r}. Callables there: {', '.join(available) or 'none'}.")
    return factory, user_file


def _parse_args(pairs: list[str]) -> dict:
    kwargs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--arg takes KEY=VALUE with a Python identifier as KEY; got {pair!r}.")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value  # a plain string
    return kwargs


def _synthetic(samples, input_shape, input_dtype, vocab, seq_len, seed):
    g = torch.Generator().manual_seed(seed)
    if input_dtype == "long":
        if vocab is None or seq_len is None:
            raise UsageError("--input-dtype long makes token ids: give --vocab N and --seq-len T as well.")
        return torch.randint(0, vocab, (samples, seq_len), generator=g)
    if input_dtype != "float":
        raise UsageError(f"--input-dtype takes float or long; got {input_dtype!r}.")
    if input_shape is None:
        raise UsageError(
            "Give the data: --data digits (or FILE.npz, FILE.csv, FILE.py:FUNC), --input-shape 3,32,32 [--classes 10] "
            "for synthetic inputs, or --input-dtype long --vocab N --seq-len T for synthetic token ids."
        )
    try:
        shape = tuple(int(part) for part in input_shape.split(","))
    except ValueError:
        raise UsageError(f"--input-shape takes sizes separated by commas, e.g. 3,32,32; got {input_shape!r}.") from None
    if not shape or min(shape) < 1:
        raise UsageError(f"--input-shape sizes must be positive; got {input_shape!r}.")
    return torch.randn(samples, *shape, generator=g)


def _user_data(spec: str, target_column, samples: int, seed: int):
    """``--data``: a built-in set or a .npz/.csv file as (x, y) tensors (integer arrays stay integers), or
    FILE.py:FUNC / module:FUNC returning a batch, a Dataset, a DataLoader or an iterable."""
    if ":" in spec and not Path(spec).exists():
        function, user_file = load_factory(spec)
        try:
            return function(), user_file
        except Exception as error:
            raise UsageError(f"The data function {spec} raised:\n{_user_lines(error, user_file)}") from None
    dataset = sg_data.load(spec, target=target_column, standardize=False, seed=seed)
    return (dataset.x_train[:samples], dataset.y_train[:samples]), None


def _table(report) -> Table:
    table = Table(
        title=f"Candidates: each on fresh models, {report.repeats} seed(s), scored on held-out batches",
        title_justify="left",
    )
    for column in ("fix", "held-out loss", "spread", "vs control (worst seed)", "grad first/last", "s", "status"):
        table.add_column(column, justify="left" if column in ("fix", "status") else "right")

    def number(v: float) -> str:
        return f"{v:.4g}" if v == v and abs(v) != float("inf") else "-"

    for trial in [report.control, *report.candidates]:
        low, high = trial.spread()
        gains = trial.improvements(report.control) if trial is not report.control else []
        worst = min(gains) if gains else float("nan")
        table.add_row(
            escape(trial.fix),
            number(trial.held_out_loss),
            f"{number(low)} to {number(high)}",
            (f"{worst:+.1%}" if worst > -10 else "< -999%") if gains and worst == worst else "",
            number(trial.grad_ratio),
            f"{trial.seconds:.1f}",
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
    kwargs = _parse_args(arg or [])
    data_file = None
    if data is not None:
        dataset, data_file = _user_data(data, target_column, samples, seed)
    else:
        dataset = _synthetic(samples, input_shape, input_dtype, vocab, seq_len, seed)
    loss_fn, loss_file = load_factory(loss) if loss is not None else (None, None)

    def build():
        try:
            model = factory(**kwargs)
        except Exception as error:
            raise UsageError(f"The model factory {target} raised:\n{_user_lines(error, user_file)}") from None
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"The model factory {target} returned {type(model).__name__}, not an nn.Module.")
        return model

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
            where = _user_lines(error.__cause__, loss_file or data_file or user_file)
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
