"""Gradient clipping: steadygrad.clip against torch.nn.utils on a ResNet-sized set of gradients.

.venv/bin/python benchmarks/clip.py
"""

from __future__ import annotations

import torch

from _timing import compare, machine
from steadygrad import clip


def _params(n_tensors=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for i in range(n_tensors):
        shape = (256, 256, 3, 3) if i % 8 == 0 else (256,) if i % 2 else (256, 256)
        p = torch.nn.Parameter(torch.randn(shape, generator=g))
        p.grad = torch.randn(shape, generator=g)
        params.append(p)
    return params


def main() -> list[tuple[str, str, str, float]]:
    torch.manual_seed(0)
    params = _params()
    rows = []
    for p_norm in (2.0, float("inf")):
        ref, ours, ratio = compare(
            lambda p=p_norm: torch.nn.utils.clip_grad_norm_(params, 1.0, p),
            lambda p=p_norm: clip.clip_grad_norm_(params, 1.0, p),
        )
        rows.append((f"clip_grad_norm_ p={p_norm:g}", str(ref), str(ours), ratio))
    ref, ours, ratio = compare(
        lambda: torch.nn.utils.clip_grad_value_(params, 0.5), lambda: clip.clip_grad_value_(params, 0.5)
    )
    rows.append(("clip_grad_value_", str(ref), str(ours), ratio))
    print(f"# clipping, {sum(p.numel() for p in params) / 1e6:.1f} M gradient elements; {machine()}")
    print(f"{'operation':28} {'torch.nn.utils':>22} {'steadygrad':>22} {'ratio':>7}")
    for name, ref_s, ours_s, r in rows:
        print(f"{name:28} {ref_s:>22} {ours_s:>22} {r:7.2f}")
    return rows


if __name__ == "__main__":
    main()
