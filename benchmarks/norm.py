"""Normalization forward+backward: steadygrad's modules over torch.nn's native ones, in the same run.

    .venv/bin/python benchmarks/norm.py [--repeats 20]

Each row times y = layer(x); y.backward(dy) for ours and for torch's, alternating, and prints the
ratio ours / torch (below 1: ours is faster).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from _timing import compare, machine
from steadygrad import norm

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


def main(repeats: int = 20) -> list[tuple[str, str, str, float]]:
    torch.manual_seed(0)
    rows = []
    for name, (make_ours, make_theirs, shape) in CASES.items():
        x = torch.randn(shape, requires_grad=True)
        dy = torch.randn(shape)
        ref, ours, ratio = compare(_step(make_theirs(), x, dy), _step(make_ours(), x, dy), repeats=repeats)
        rows.append((name, str(ref), str(ours), ratio))
    print(f"# normalization forward+backward, float32, training mode; {machine()}")
    print(f"{'layer':26} {'torch.nn (native)':>22} {'steadygrad':>22} {'ratio':>7}")
    for name, ref_s, ours_s, ratio in rows:
        print(f"{name:26} {ref_s:>22} {ours_s:>22} {ratio:7.2f}")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    main(parser.parse_args().repeats)
