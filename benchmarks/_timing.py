"""Timing helpers shared by the benchmarks: medians with spread, reference and candidate interleaved."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    iqr_ms: float  # interquartile range: the spread

    def __str__(self) -> str:
        return f"{self.median_ms:8.3f} ms ± {self.iqr_ms / 2:.3f}"


def _summary(samples: list[float]) -> Timing:
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return Timing(statistics.median(samples) * 1e3, (q3 - q1) * 1e3)


def compare(reference: Callable[[], object], candidate: Callable[[], object], repeats: int = 30, warmup: int = 3):
    """Time both, alternating run by run so that machine noise hits them alike. Returns (ref, cand, ratio)."""
    for _ in range(warmup):
        reference()
        candidate()
    ref, cand = [], []
    for _ in range(repeats):
        for fn, out in ((reference, ref), (candidate, cand)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    ref_t, cand_t = _summary(ref), _summary(cand)
    return ref_t, cand_t, cand_t.median_ms / ref_t.median_ms


def timed(fn: Callable[[], object], repeats: int = 30, warmup: int = 3) -> Timing:
    """Median (and spread) of ``fn``'s wall time."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return _summary(samples)


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, python {platform.python_version()}"
    )
