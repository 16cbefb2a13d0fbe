"""``steadygrad train``: build a network from options, train it with guard rails, report findings."""

import importlib.util
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.markup import escape
from rich.table import Table

from steadygrad import data as sg_data
from steadygrad import distributed
from steadygrad.cli._errors import UsageError, handle_errors
from steadygrad.cli._options import network_options
from steadygrad.cli._output import console
from steadygrad.diagnose import findings_text
from steadygrad.nets import build, expand_specs
from steadygrad.train import TrainConfig, Trainer

DIVERGED = 1  # exit code of a run stopped by the non-finite guard


def _opt(help_text: str):
    return typer.Option(help=help_text)


@handle_errors
@network_options(comma_lists=False)
def train_command(
    data: Annotated[
        str,
        typer.Option(
            help="A built-in set (digits, spirals, blobs, teacher), a .npz (arrays X, y) or .csv file; for --kind "
            "transformer a token set: copy, reverse, recall (synthetic next-token tasks) or pysource (characters of "
            "the Python standard library's sources)."
        ),
    ] = "digits",
    target: Annotated[str | None, _opt("The target column of a .csv file.")] = None,
    standardize: Annotated[
        bool, _opt("Standardize features to zero mean and unit variance (training split's statistics).")
    ] = True,
    test_fraction: Annotated[float, _opt("Fraction of the data held out for evaluation.")] = 0.2,
    network: dict[str, str | None] | None = None,  # the network options (see cli._options)
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training split.")] = 10,
    lr: Annotated[float, _opt("Learning rate.")] = 1e-3,
    optimizer: Annotated[str, _opt("sgd, momentum (SGD with 0.9 momentum), adam or adamw.")] = "adam",
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per optimizer step.")] = 64,
    weight_decay: Annotated[float, _opt("L2 weight decay.")] = 0.0,
    clip: Annotated[
        str | None, _opt("Gradient clipping MODE:THRESHOLD: norm:1.0, value:0.5, agc:0.01, layer_norm:1.0.")
    ] = None,
    logdir: Annotated[Path, _opt("Where history.jsonl, monitor.jsonl, checkpoint.pt and summary.json go.")] = Path(
        "runs/train"
    ),
    tensorboard: Annotated[bool, _opt("Also write TensorBoard events to LOGDIR/tensorboard.")] = False,
    mlflow: Annotated[
        bool,
        _opt(
            "Also log to MLflow: per-layer scalars and the loss at every logged step, the options as params, the "
            "findings as findings.json. The store is LOGDIR/mlflow.db (SQLite; artifacts in LOGDIR/mlartifacts), "
            "so a run's files stay together: mlflow ui --backend-store-uri sqlite:///LOGDIR/mlflow.db shows it. "
            "Needs pip install 'steadygrad[mlflow]'."
        ),
    ] = False,
    mlflow_uri: Annotated[
        str | None,
        _opt(
            "Log to this MLflow tracking URI instead of LOGDIR/mlflow.db: a server (http://localhost:5000) or one "
            "store for every run (sqlite:///mlflow.db). Implies --mlflow."
        ),
    ] = None,
    resume: Annotated[
        bool, _opt("Continue from LOGDIR/checkpoint.pt, with the same options as the run that wrote it.")
    ] = False,
    on_nonfinite: Annotated[
        str,
        _opt(
            "On a NaN/Inf loss or gradient: stop (naming the first layer to go "
            "non-finite), or rollback to the last good checkpoint with half the "
            "learning rate."
        ),
    ] = "stop",
    seed: Annotated[int, _opt("Seed of the weights and the data order.")] = 0,
    monitor_every: Annotated[int, typer.Option(min=1, help="Record per-layer statistics every k steps.")] = 10,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Optimizer steps between checkpoints.")] = 50,
    progress: Annotated[bool, _opt("Show a progress bar.")] = True,
) -> None:
    """Train a network on real or generated data, with clipping, a monitor, checkpoints and a
    non-finite guard; print what went wrong, if anything, and how to fix it.

    Examples:

      steadygrad train --depth 10 --act sigmoid --init glorot_uniform --epochs 5

      steadygrad train --depth 30 --act relu --init he_normal --norm batch --lr 0.01 --logdir runs/bn

      steadygrad train --data my.csv --target label --clip norm:1.0 --tensorboard

      steadygrad train --depth 20 --norm batch --mlflow --logdir runs/bn

      steadygrad train --kind transformer --data copy --depth 2 --width 32 --heads 2 --optimizer adam --lr 3e-3

    Exit code 0: trained; 1: stopped by the non-finite guard (or a bug in steadygrad, with its traceback);
    2: bad options or files.
    """
    torch.set_flush_denormal(True)  # denormals make near-zero activations 5-10x slower on CPU
    mlflow = mlflow or mlflow_uri is not None
    if mlflow and importlib.util.find_spec("mlflow") is None:
        raise UsageError("--mlflow needs the mlflow package: pip install 'steadygrad[mlflow]'.")
    specs = expand_specs(network)
    if len(specs) != 1:
        raise UsageError(
            "train takes one value per option; to compare several networks, use `steadygrad probe` or run "
            "train once per network."
        )
    if specs[0].kind == "transformer" and data == "digits":
        data = "pysource"  # the default data set, for a language model
    dataset = sg_data.load(data, target=target, test_fraction=test_fraction, standardize=standardize, seed=seed)
    spec = specs[0].replace(**dataset.spec_sizes(specs[0].kind))
    config = TrainConfig(
        epochs=epochs,
        lr=lr,
        optimizer=optimizer,
        batch_size=batch_size,
        weight_decay=weight_decay,
        clip=clip,
        seed=seed,
        monitor_every=monitor_every,
        on_nonfinite=on_nonfinite,
        checkpoint_every=checkpoint_every,
        logdir=logdir,
        tensorboard=tensorboard,
        mlflow=mlflow,
        mlflow_uri=mlflow_uri,
        progress=progress,
    )
    model = build(spec, torch.Generator().manual_seed(seed))
    console.print(
        f"Training [bold]{escape(spec.label())}[/] on {escape(dataset.name)} "
        f"({len(dataset.x_train)} train / {len(dataset.x_test)} test, {dataset.task})."
    )
    try:
        trainer = Trainer(model, dataset, config)
        result = trainer.fit(resume=resume)  # a CheckpointError is a ValueError: exit 2
    except OSError as error:  # the run's files: an unwritable or full --logdir is the user's to fix
        raise UsageError(f"Could not write the run's files to {logdir}: {error}. Choose a writable --logdir.") from None
    distributed.teardown()  # under torchrun: every rank got here (they take every branch together)
    if result.epochs:
        table = Table(title="Held-out metrics per epoch", title_justify="left")
        columns = [c for c in ("epoch", "step", "lr", "test_loss", "test_accuracy", "seconds") if c in result.epochs[0]]
        for column in columns:
            table.add_column(column, justify="right")
        for row in result.epochs:
            table.add_row(*[f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns])
        console.print(table)
    if result.findings:
        console.print("[bold]Findings[/]")
    for line in findings_text(result.findings):
        console.print(escape(line))
    console.print(
        f"Wrote {logdir}/summary.json, history.jsonl, monitor.jsonl, checkpoint.pt"
        f"{' and tensorboard/' if tensorboard else ''}."
    )
    if trainer.mlflow is not None:
        uri = trainer.mlflow.tracking_uri
        console.print(
            f"Logged to MLflow run {trainer.mlflow.run_id} at {escape(uri)}"
            + (f"; see it with: mlflow ui --backend-store-uri {escape(uri)}" if uri.startswith("sqlite:") else "."),
            soft_wrap=True,  # the command stays on one line, to be copied
        )
    if result.status != "completed":
        console.print(f"[bold red]{escape(result.message)}[/]")
        raise typer.Exit(DIVERGED)
