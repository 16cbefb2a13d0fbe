"""What results show a person: tables and figures, independent of where they are rendered.

The lab's experiments, the doctor and the run pages return these; the report (HTML) and the CLI (rich)
render them. They live at the bottom of the package so that a result can carry them without importing a
renderer, and a renderer can take them without importing the lab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Figure", "Table"]


@dataclass
class Table:
    """A titled table: ``rows`` are lists aligned with ``columns``."""

    title: str
    columns: list[str]
    rows: list[list]


@dataclass
class Figure:
    """A titled PNG image with its caption."""

    title: str
    png: bytes = field(repr=False)
    caption: str = ""
