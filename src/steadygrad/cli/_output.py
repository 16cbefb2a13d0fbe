"""What every command prints through: the console, and writing a JSON file the user asked for."""

import json
from pathlib import Path

from rich.console import Console

from steadygrad.cli._errors import UsageError

console = Console()


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON, creating folders; an unwritable path is a usage error (exit 2)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2))
    except OSError as error:
        raise UsageError(f"Could not write {path}: {error.strerror}. Choose a writable path.") from None
    console.print(f"Wrote {path}")
