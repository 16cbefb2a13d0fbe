"""Normalization forward+backward: steadygrad's modules over torch.nn's native ones, in the same run.

    .venv/bin/python benchmarks/norm.py [--repeats 20]

Each row times y = layer(x); y.backward(dy) for ours and for torch's, alternating, and prints the
ratio ours / torch (below 1: ours is faster).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from _timing import compare, machine
from steadygrad import norm
from steadygrad.norm import fast

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


def main(repeats: int = 20) -> list[tuple[str, str, str, str, float, float]]:
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
        ref, eager, eager_ratio = compare(_step(theirs, x, dy), _step(ours, x, dy), repeats=repeats)
        fused, fused_ratio = "n/a", float("nan")
        if compiled:
            fast.enable()
            ref, fused_t, fused_ratio = compare(_step(theirs, x, dy), _step(ours, x, dy), repeats=repeats)
            fused = str(fused_t)
        rows.append((name, str(ref), str(eager), fused, eager_ratio, fused_ratio))
    fast.disable()
    print(f"# normalization forward+backward, float32, training mode; {machine()}")
    print(
        f"# fused kernels: {'built' if compiled else 'NOT available'}; first enable() took {first_call:.1f} s "
        "(a compile, or a load from torch's extension cache)"
    )
    print(f"{'layer':26} {'torch.nn (native)':>22} {'eager':>22} {'fused':>22} {'eager/nat':>9} {'fused/nat':>9}")
    for name, ref_s, eager_s, fused_s, eager_r, fused_r in rows:
        print(f"{name:26} {ref_s:>22} {eager_s:>22} {fused_s:>22} {eager_r:9.2f} {fused_r:9.2f}")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    main(parser.parse_args().repeats)
