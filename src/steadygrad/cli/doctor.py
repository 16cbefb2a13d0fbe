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
            help="Training data: a .npz (X, y) or .csv file, or a built-in set (digits, spirals, blobs, teacher)."
        ),
    ] = None,
    target_column: Annotated[str | None, typer.Option("--target", help="The target column of a .csv file.")] = None,
    input_shape: Annotated[
        str | None,
        typer.Option(help="Without --data: synthetic standardized inputs of this shape per example, e.g. 3,32,32."),
    ] = None,
    classes: Annotated[int | None, typer.Option(help="Without --data: number of classes (else regression).")] = None,
    samples: Annotated[int, typer.Option(min=2, help="Examples used for the trials.")] = 512,
    task: Annotated[str | None, typer.Option(help="classification or regression [default: inferred].")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps per trial.")] = 60,
    lr: Annotated[float, typer.Option(help="Learning rate of every trial.")] = 1e-2,
    optimizer: Annotated[str, typer.Option(help="momentum (SGD, 0.9), sgd, adam or adamw.")] = "momentum",
    budget: Annotated[
        float, typer.Option(help="Seconds for all trials; what does not fit is reported as skipped.")
    ] = 60.0,
    seed: Annotated[int, typer.Option(help="Seed of the model factory, the batches and synthetic data.")] = 0,
    json_path: Annotated[
        Path | None, typer.Option("--json", dir_okay=False, help="Write findings, control and candidates as JSON.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Also write an HTML report into this folder.")] = None,
) -> None:
    """Diagnose any PyTorch model, try each candidate fix on a copy, and print the one that measurably works.

    The model is built by your factory for each trial (same seed), never modified, and nothing is written
    except --json and --out. Every candidate runs the same optimizer steps on the same batches as the unchanged
    model, and is recommended only if it ends at least 10% lower.

    Examples:

      steadygrad doctor my_model.py:build --input-shape 3,32,32 --classes 10

      steadygrad doctor models.py:mlp --arg depth=30 --data digits --budget 30 --out doctor-report
    """
    from steadygrad.doctor import doctor

    torch.set_flush_denormal(True)
    factory, user_file = load_factory(target)
    kwargs = _parse_args(arg or [])
    if data is not None:
        dataset = sg_data.load(data, target=target_column, standardize=False, seed=seed)
        inputs, targets = dataset.x_train[:samples], dataset.y_train[:samples]
        task = task or dataset.task
    elif input_shape is not None:
        try:
            shape = tuple(int(part) for part in input_shape.split(","))
        except ValueError:
            raise UsageError(
                f"--input-shape takes sizes separated by commas, e.g. 3,32,32; got {input_shape!r}."
            ) from None
        if not shape or min(shape) < 1:
            raise UsageError(f"--input-shape sizes must be positive; got {input_shape!r}.")
        inputs = torch.randn(samples, *shape, generator=torch.Generator().manual_seed(seed))
        targets = None
    else:
        raise UsageError(
            "Give the data: --data FILE.npz (or a built-in set such as digits), or --input-shape "
            "3,32,32 [--classes 10] for synthetic inputs."
        )

    def build():
        try:
            model = factory(**kwargs)
        except Exception as error:
            raise UsageError(f"The model factory {target} raised:\n{_user_lines(error, user_file)}") from None
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"The model factory {target} returned {type(model).__name__}, not an nn.Module.")
        return model

    probe_model = build()
    try:
        with torch.no_grad():
            probe_model.eval()(inputs[:2])
    except Exception as error:
        shape = tuple(inputs.shape[1:])
        raise UsageError(
            f"The model rejects inputs of shape (N, {', '.join(map(str, shape))}):\n"
            f"{_user_lines(error, user_file)}\nCheck --input-shape or the data."
        ) from None
    with console.status("Diagnosing and trying fixes..."):
        report = doctor(
            build,
            inputs,
            targets,
            task=task,
            classes=classes,
            steps=steps,
            lr=lr,
            optimizer=optimizer,
            budget=budget,
            seed=seed,
        )
    console.print("[bold]Findings[/]")
    for finding in report.findings or []:
        console.print(f"- {escape(str(finding))}")
    if not report.findings:
        console.print("- none: the gradient flow and the inputs look healthy.")
    table = Table(title="Candidates (each on a fresh copy, same batches and seed)", title_justify="left")
    for column in ("fix", "final loss", "loss drop", "grad first/last", "non-finite", "s"):
        table.add_column(column, justify="left" if column == "fix" else "right")
    for trial in [report.control, *report.candidates]:
        table.add_row(
            escape(trial.fix),
            f"{trial.final_loss:.4g}",
            f"{trial.loss_drop:.1%}" if trial.loss_drop == trial.loss_drop else "-",
            f"{trial.grad_ratio:.3g}",
            str(trial.nonfinite),
            f"{trial.seconds:.1f}",
            style="green" if trial is report.recommended else "red" if trial.error else None,
        )
    console.print(table)
    if report.loss_name:
        console.print(f"[dim]loss: {escape(report.loss_name)}[/]")
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
