"""Self-contained HTML pages (figures inline as PNG, no network) from lab results, probes and runs."""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

import steadygrad

__all__ = ["Page", "Section", "figure", "fmt", "slug", "write_page"]


@dataclass
class Section:
    id: str
    title: str
    badge: str = ""
    badge_kind: str = "info"  # reproduced, partly, not, error, info
    fields: list[tuple[str, str]] = field(default_factory=list)
    paragraphs: list[str] = field(default_factory=list)
    note: str = ""
    tables: list = field(default_factory=list)  # objects with title, columns, rows
    figures: list[dict] = field(default_factory=list)  # {"title", "data" (base64 PNG), "caption"}
    pre: str = ""


@dataclass
class Page:
    title: str
    subtitle: str = ""
    meta: list[tuple[str, str]] = field(default_factory=list)
    counts: list[tuple[str, int, str]] = field(default_factory=list)
    summary: dict | None = None  # {"title", "columns", "rows"}
    sections: list[Section] = field(default_factory=list)
    version: str = steadygrad.__version__


def figure(title: str, png: bytes, caption: str = "") -> dict:
    return {"title": title, "data": base64.b64encode(png).decode("ascii"), "caption": caption}


def fmt(value) -> str:
    """A number for a table: 4 significant digits, "n/a" for None, NaN and infinities; other values as text."""
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    return "n/a" if value is None else str(value)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("steadygrad.report", "templates"),
    autoescape=jinja2.select_autoescape(["html", "j2"]),
    undefined=jinja2.StrictUndefined,
)


def write_page(page: Page, out_dir: str | Path, data: dict | None = None) -> Path:
    """Render ``page`` to ``out_dir/index.html`` (and ``data`` to ``out_dir/results.json``); returns the page's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    html = _ENVIRONMENT.get_template("page.html.j2").render(page=page)
    path = out / "index.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)  # a reader never sees half a page
    if data is not None:
        (out / "results.json").write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    return path
