"""Normalization forward+backward: steadygrad's modules over torch.nn's native ones, in the same run.

    .venv/bin/python benchmarks/norm.py [--repeats 20]

Each row times y = layer(x); y.backward(dy) for ours and for torch's, alternating, and prints the
ratio ours / torch (below 1: ours is faster). The floor is the time to stream the four tensors a fused
forward+backward must touch (read x, write y, read dy, write dx) with two plain copies into preallocated
tensors, measured in the same run: no normalization can beat it, and x/floor says how far a kernel is
from the memory system's limit.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

from _timing import compare, machine, timed
from steadygrad import fast, norm

# name -> (ours, theirs, input shape); the shapes of issue 3, plus a small-batch BN2d
CASES = {
    "BN1d (4096, 1024)": (lambda: norm.BatchNorm1d(1024), lambda: nn.BatchNorm1d(1024), (4096, 1024)),
    "BN2d (64, 64, 32, 32)": (lambda: norm.BatchNorm2d(64), lambda: nn.BatchNorm2d(64), (64, 64, 32, 32)),
    "BN2d (8, 32, 16, 16)": (lambda: norm.BatchNorm2d(32), lambda: nn.BatchNorm2d(32), (8, 32, 16, 16)),
    "LN (4096, 1024)": (lambda: norm.LayerNorm(1024), lambda: nn.LayerNorm(1024), (4096, 1024)),
    "GN (64, 64, 32, 32) G=8": (lambda: norm.GroupNorm(8, 64), lambda: nn.GroupNorm(8, 64), (64, 64, 32, 32)),
}


def _step(layer, x, dy):
    def run():
        x.grad = None
        layer(x).backward(dy)

    return run


def _floor(x: torch.Tensor, dy: torch.Tensor):
    y, dx = torch.empty_like(x), torch.empty_like(dy)

    def stream():
        with torch.no_grad():
            y.copy_(x)
            dx.copy_(dy)

    return stream


def _enable(backend: str) -> tuple[bool, float]:
    """Switch ``backend``'s kernels on, quietly; (whether they are on, seconds the first enable took)."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on = fast.enable(backend) and fast.backend() == backend
    return on, time.perf_counter() - start


def main(repeats: int = 20) -> list[tuple]:
    torch.manual_seed(0)
    # the path each column runs: None is the plain eager one (no kernels enabled)
    backends = {"eager": None}
    first_calls = {}
    for column, backend in (("numba", "numba"), ("fused", "cpp")):
        on, first_calls[column] = _enable(backend)
        if on:
            backends[column] = backend
    fast.disable()
    rows = []
    for name, (make_ours, make_theirs, shape) in CASES.items():
        x = torch.randn(shape, requires_grad=True)
        dy = torch.randn(shape)
        theirs, ours = make_theirs(), make_ours()
        times, ratios = {}, {}
        for column, backend in backends.items():
            # each ratio is against the native run interleaved with it; the native column and nat/floor show the
            # last of those runs
            (fast.enable(backend) if backend else fast.disable())
            ref, times[column], ratios[column] = compare(_step(theirs, x, dy), _step(ours, x, dy), repeats=repeats)
        fast.disable()
        floor = timed(_floor(x, dy), repeats=repeats)
        rows.append((name, ref, times, ratios, floor))
    columns = ("eager", "numba", "fused")
    print(f"# normalization forward+backward, float32, training mode; {machine()}")
    for column, label in (("numba", "numba kernels (no C++ compiler needed)"), ("fused", "C++ fused kernels")):
        if column in backends:
            print(f"# {label}: first enable() took {first_calls[column]:.1f} s (a compile, or a load from the cache)")
        else:
            print(f"# {label}: NOT available here")
    print(
        "# floor: two plain copies (x -> y, dy -> dx) into preallocated tensors; nat/floor, numba/floor and "
        "fused/floor against it"
    )
    print(
        f"{'layer':24} {'torch.nn (native)':>21} {'eager':>21} {'numba':>21} {'fused':>21} {'floor':>9} "
        f"{'eager/nat':>9} {'numba/nat':>9} {'fused/nat':>9} {'nat/floor':>9} {'numba/floor':>11} {'fused/floor':>11}"
    )
    for name, ref, times, ratios, floor in rows:
        cells = [str(times[c]) if c in times else "n/a" for c in columns]
        ratio = [ratios.get(c, float("nan")) for c in columns]
        to_floor = [times[c].median_ms / floor.median_ms if c in times else float("nan") for c in ("numba", "fused")]
        print(
            f"{name:24} {ref!s:>21} {cells[0]:>21} {cells[1]:>21} {cells[2]:>21} {floor.median_ms:6.3f} ms "
            f"{ratio[0]:9.2f} {ratio[1]:9.2f} {ratio[2]:9.2f} {ref.median_ms / floor.median_ms:9.2f} "
            f"{to_floor[0]:11.2f} {to_floor[1]:11.2f}"
        )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    main(parser.parse_args().repeats)
