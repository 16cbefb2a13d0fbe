"""What every lab experiment shares: the claim it tests, the result it returns, and the context it runs in.

An experiment is a module with ``CLAIM`` (a ``Claim``) and ``run(ctx) -> ClaimResult``. Its verdict is
computed from the numbers it measured, never written in: if a claim does not hold on this data, the
result says so.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import cached_property

import torch

from steadygrad import data as sg_data
from steadygrad.display import Figure, Table

__all__ = ["NOT_REPRODUCED", "PARTLY", "REPRODUCED", "Claim", "ClaimResult", "Context", "Figure", "Table", "verdict"]

REPRODUCED = "reproduced"
PARTLY = "partly reproduced"
NOT_REPRODUCED = "not reproduced"


def verdict(*checks: bool) -> str:
    """``reproduced`` if every check holds, ``not reproduced`` if none does, else ``partly reproduced``."""
    if all(checks):
        return REPRODUCED
    return PARTLY if any(checks) else NOT_REPRODUCED


@dataclass(frozen=True)
class Claim:
    """A claim of the seed material or a paper, stated before it is tested."""

    number: int
    slug: str
    title: str  # the claim in one sentence
    source: str  # where it comes from
    setup: str  # what is run
    expected: str  # what would confirm it
    teaches: str  # what a student should take away


@dataclass
class ClaimResult:
    """What an experiment measured and what that says about its claim."""

    claim: Claim
    verdict: str
    summary: str  # the key numbers in one or two sentences
    numbers: dict = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    notes: str = ""  # caveats, what the numbers do not show
    seconds: float = 0.0
    quick: bool = False
    error: str = ""  # an experiment that crashed reports it here; the others still run

    def to_dict(self) -> dict:
        def clean(value):
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [clean(v) for v in value]
            return value

        return {
            "number": self.claim.number,
            "slug": self.claim.slug,
            "claim": self.claim.title,
            "source": self.claim.source,
            "setup": self.claim.setup,
            "expected": self.claim.expected,
            "teaches": self.claim.teaches,
            "verdict": self.verdict,
            "summary": self.summary,
            "numbers": clean(self.numbers),
            "notes": self.notes,
            "seconds": self.seconds,
            "quick": self.quick,
            "error": self.error,
            "tables": [{"title": t.title, "columns": t.columns, "rows": clean(t.rows)} for t in self.tables],
            "figures": [{"title": f.title, "caption": f.caption} for f in self.figures],
        }


class Context:
    """Sizes (full or quick), seeds and shared data for the experiments of one lab run."""

    def __init__(self, quick: bool = False, seed: int = 0) -> None:
        self.quick = quick
        self.seed = seed
        self._started = time.perf_counter()

    def size(self, full, quick):
        """``full`` normally, ``quick`` in a quick run."""
        return quick if self.quick else full

    def seeds(self, full: int, quick: int = 1) -> list[int]:
        return [self.seed + i for i in range(self.size(full, quick))]

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 7919 + offset)

    @cached_property
    def digits(self) -> sg_data.Dataset:
        return sg_data.digits(seed=self.seed)

    @cached_property
    def digits_raw(self) -> sg_data.Dataset:
        return sg_data.digits(standardize=False, seed=self.seed)

    def train(self, model, dataset=None, **config):
        """Train quietly with ``steadygrad.Trainer`` (no progress bar, no logs); returns its TrainResult."""
        from steadygrad.train import TrainConfig, Trainer

        config = {"progress": False, "monitor_every": 10**9, "seed": self.seed, **config}
        return Trainer(model, dataset or self.digits, TrainConfig(**config)).fit()


def png(figure) -> bytes:
    """A matplotlib figure as PNG bytes (closed afterwards)."""
    from steadygrad.measure.plot import figure_png

    return figure_png(figure)


def subplots(ncols: int = 1, width: float = 5.5, height: float = 3.6):
    from steadygrad.measure.plot import _pyplot

    plt = _pyplot()
    figure, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return figure, list(axes[0])


def plot_accuracy(ax, results: dict, title: str = "") -> None:
    """Held-out accuracy per epoch of several training results (name -> TrainResult) on one axis."""
    for name, result in results.items():
        if result.epochs:
            ax.plot(
                [e["epoch"] for e in result.epochs], [e["test_accuracy"] for e in result.epochs], marker="o", label=name
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out accuracy")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)


def fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}g}"
