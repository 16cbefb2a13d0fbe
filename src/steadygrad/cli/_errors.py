"""Which failures are the user's (exit 2, one paragraph, no traceback) and which are steadygrad's (exit 1,
with the traceback).

A command ends in one of four ways:

- success: exit 0 (``train`` also exits 1 when its non-finite guard stopped the run: a result, not an error);
- click's own usage errors (an unknown option, ``--fan-in ten``, a missing argument): click prints them and
  exits 2, before any of our code runs;
- a **usage error**: exit 2, and stderr gets one paragraph, ``Error: <message>``, no traceback. Exactly
  these exception types count (``USAGE_ERRORS``):

  * ``UsageError``, raised by the CLI itself for option text it cannot use (``--only a,b``, a ``--grid``
    item without ``=``, several values where one is taken, an unwritable output path);
  * ``ValueError`` and its subclasses (``DataError``, ``CheckpointError``, ...): the library's documented
    answer to a bad argument (see ``steadygrad._checks``). Every value the CLI hands the library comes from
    the user, so a ValueError reports the user's input, in a message that says what was wrong, what is
    accepted and how to fix it. The CLI passes it through unchanged.

- anything else is a **bug in steadygrad**: the traceback is printed to stderr, then a line asking for a
  report, and the exit code is 1. ``TypeError`` is in this group on purpose: the CLI parses every option into
  the type the library expects, so a TypeError cannot come from what the user typed, only from a mistake in
  steadygrad (before this module it was turned into exit 2, hiding the bug's traceback). The same holds for
  ``KeyError``, ``AttributeError``, ``RuntimeError`` (torch's included) and the rest.

The message's wording is the raiser's job: a ``UsageError`` states in one paragraph what was wrong, what is
accepted and how to fix it.
"""

import functools
import traceback

import click
import typer
from rich.console import Console
from rich.markup import escape

errors = Console(stderr=True)  # usage errors and tracebacks go to stderr

USAGE_ERROR = 2  # click's code for bad usage; ours for bad input of any kind
BUG = 1  # Python's code for an uncaught exception


class UsageError(ValueError):
    """Input the user typed cannot be used. The message is the whole explanation: what was wrong, what is
    accepted and how to fix it. A ValueError, so code that catches the library's ValueErrors catches it too."""


USAGE_ERRORS = (UsageError, ValueError)
# how click and typer end a command on purpose (typer.Exit, Abort, click's own usage errors): never ours to handle.
# typer 0.29's Exit is its own class, not click's: a command's deliberate exit code must not read as a bug.
_CLICK_EXITS = (click.exceptions.Exit, typer.Exit, click.exceptions.Abort, click.ClickException)


def fail(message: str, code: int = USAGE_ERROR) -> None:
    """Print one clear paragraph to stderr and exit with ``code`` (no traceback)."""
    errors.print(f"[bold red]Error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def handle_errors(command):
    """Run ``command`` so that usage errors exit 2 with their message and any other exception, a bug, prints
    its traceback and exits 1 (see the module docstring for which is which)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except _CLICK_EXITS:
            raise
        except USAGE_ERRORS as error:
            fail(str(error))
        except Exception:
            # printed here, not left to Python: under typer's test runner an uncaught exception is swallowed
            errors.print(traceback.format_exc(), markup=False, highlight=False, soft_wrap=True, end="")
            errors.print(
                "[bold red]This is a bug in steadygrad[/], not a problem with your input: please report it with "
                "the traceback above and the command you ran.",
                highlight=False,
            )
            raise typer.Exit(BUG) from None

    return wrapper
