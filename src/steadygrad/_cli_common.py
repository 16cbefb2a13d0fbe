"""What every CLI command shares: the consoles, the exit on bad input, writing JSON."""

import functools
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
errors = Console(stderr=True)

USAGE_ERROR = 2  # click's code for bad usage; ours for bad input of any kind


def fail(message: str, code: int = USAGE_ERROR) -> None:
    """Print one clear paragraph to stderr and exit with ``code`` (no traceback)."""
    errors.print(f"[bold red]Error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def user_errors(command):
    """Turn the library's ValueError/TypeError (bad input, already worded for a person) into exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ValueError, TypeError) as error:
            fail(str(error))

    return wrapper


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON, creating folders; an unwritable path exits 2."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2))
    except OSError as error:
        fail(f"Could not write {path}: {error.strerror}. Choose a writable path.")
    console.print(f"Wrote {path}")
