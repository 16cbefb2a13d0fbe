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


def main(repeats: int = 20) -> list[tuple]:
    torch.manual_seed(0)
    start = time.perf_counter()
    compiled = fast.enable()
    first_call = time.perf_counter() - start
    rows = []
    for name, (make_ours, make_theirs, shape) in CASES.items():
        x = torch.randn(shape, requires_grad=True)
        dy = torch.randn(shape)
        theirs, ours = make_theirs(), make_ours()
        fast.disable()
        # each ratio is against the native run interleaved with it; the native column and nat/floor show the
        # last of those runs (the fused one where the kernels are built)
        ref, eager, eager_ratio = compare(_step(theirs, x, dy), _step(ours, x, dy), repeats=repeats)
        fused, fused_ratio = "n/a", float("nan")
        if compiled:
            fast.enable()
            ref, fused_t, fused_ratio = compare(_step(theirs, x, dy), _step(ours, x, dy), repeats=repeats)
            fused = str(fused_t)
        floor = timed(_floor(x, dy), repeats=repeats)
        fused_floor = fused_t.median_ms / floor.median_ms if compiled else float("nan")
        rows.append(
            (
                name,
                str(ref),
                str(eager),
                fused,
                eager_ratio,
                fused_ratio,
                floor,
                ref.median_ms / floor.median_ms,
                fused_floor,
            )
        )
    fast.disable()
    print(f"# normalization forward+backward, float32, training mode; {machine()}")
    print(
        f"# fused kernels: {'built' if compiled else 'NOT available'}; first enable() took {first_call:.1f} s "
        "(a compile, or a load from torch's extension cache)"
    )
    print("# floor: two plain copies (x -> y, dy -> dx) into preallocated tensors; nat/floor, fused/floor against it")
    print(
        f"{'layer':24} {'torch.nn (native)':>21} {'eager':>21} {'fused':>21} {'floor':>9} "
        f"{'eager/nat':>9} {'fused/nat':>9} {'nat/floor':>9} {'fused/floor':>11}"
    )
    for name, ref_s, eager_s, fused_s, eager_r, fused_r, floor, nat_f, fused_f in rows:
        print(
            f"{name:24} {ref_s:>21} {eager_s:>21} {fused_s:>21} {floor.median_ms:6.3f} ms "
            f"{eager_r:9.2f} {fused_r:9.2f} {nat_f:9.2f} {fused_f:11.2f}"
        )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    main(parser.parse_args().repeats)
