"""The ``steadygrad`` command line: one module per command, registered on one typer app here.

Strings become objects in the commands; ``_options`` generates the network options from NetSpec's fields and
``_errors`` decides the exit code: 2 and one paragraph for a usage error, 1 and the traceback for a bug in
steadygrad (its docstring says which exceptions are which).
"""

from typing import Annotated

import typer

import steadygrad
from steadygrad.cli._output import console
from steadygrad.cli.doctor import doctor_command
from steadygrad.cli.inits import inits_command
from steadygrad.cli.lab import demo_command, report_command
from steadygrad.cli.probe import probe_command
from steadygrad.cli.sweep import sweep_command
from steadygrad.cli.train import train_command

__all__ = ["app", "main"]

app = typer.Typer(
    name="steadygrad",
    help=(
        "Keep gradients steady through deep networks.\n\n"
        "Measure how signal and gradient travel through a model, try the classic remedies "
        "(initialization, normalization, skip connections, clipping) and see the field's claims reproduced."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # markdown reflows each docstring paragraph to the terminal; rich mode keeps the source's line breaks
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        console.print(f"steadygrad {steadygrad.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Keep gradients steady through deep networks."""


app.command("inits")(inits_command)
app.command("probe")(probe_command)
app.command("train")(train_command)
app.command("demo")(demo_command)
app.command("report")(report_command)
app.command("doctor")(doctor_command)
app.command("sweep")(sweep_command)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="steadygrad")
