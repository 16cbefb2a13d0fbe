"""Probe cost at depth: time and peak memory of steadygrad.probe on width-256 MLPs, batch 128.

    .venv/bin/python benchmarks/probe.py

Each measurement runs in a fresh process. The time is the median of three probes after one warm-up (the
first call pays allocations). The memory is the probe's own peak: the peak resident memory of a process that
builds the network and probes it once, less that of a process that only builds it. Both run with glibc's
``MALLOC_MMAP_THRESHOLD_=65536``, so every allocation of 64 KB or more is mapped on its own and returned when
freed. With glibc's defaults, freed memory is kept and reused, so a peak depends on the allocator's history:
in that mode, one run measured 109, 342 and 764 MB for 100, 300 and 1,000 layers, while this one measures
memory that grows in step with depth. Targets: 1,000 layers in at most 5 s, time and memory linear in depth (issue
8), and at most 15 MB per 100 layers (issue 22), against a floor of what the forward pass's autograd graph holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from _timing import machine

# both children's first lines: the network of the depth in argv[1], and its input
SETUP = """
import json, statistics, sys, time, torch
from steadygrad.measure import probe
from steadygrad.nets import NetSpec, build
net = build(NetSpec(depth=int(sys.argv[1]), width=256, in_features=256), torch.Generator().manual_seed(0))
x = torch.randn(128, 256)
"""

TIMED = (
    SETUP
    + """
probe(net, x)
times = []
for _ in range(3):
    start = time.perf_counter(); probe(net, x); times.append(time.perf_counter() - start)
print(json.dumps(statistics.median(times)))
"""
)

# argv[2]: "probe"; "graph": the forward pass alone, its autograd graph kept (the floor: what any backward pass needs
# alive at its start); anything else: the baseline, which builds the same network and stops
SIZED = (
    SETUP
    + """
if sys.argv[2] == "probe":
    probe(net, x)
elif sys.argv[2] == "graph":
    x.requires_grad_(True)
    kept = net(x)
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""
)


def _peak_mb(depth: int, mode: str) -> float:
    """Peak resident memory (MB) of a fresh process running SIZED: its VmHWM, the high-water mark of its own
    address space. Not ``ru_maxrss`` from ``wait4``: Linux carries the parent's high-water mark into a child
    across exec, so under ``make bench``, whose process holds the earlier benchmarks' memory, every child
    reported the parent's 832 MB."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(
        [sys.executable, "-c", SIZED, str(depth), mode], env=env, capture_output=True, text=True, check=True
    )
    return int(done.stdout.strip().splitlines()[-1]) / 1024  # kB


def main(depths=(100, 300, 1000)) -> list[dict]:
    rows = []
    for depth in depths:
        done = subprocess.run([sys.executable, "-c", TIMED, str(depth)], capture_output=True, text=True, check=True)
        peak, baseline, graph = _peak_mb(depth, "probe"), _peak_mb(depth, "baseline"), _peak_mb(depth, "graph")
        seconds = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "depth": depth,
                "seconds": seconds,
                "peak_mb": peak,
                "probe_mb": peak - baseline,
                "graph_mb": graph - baseline,
            }
        )
    print(f"# probe of a width-256 MLP, batch 128, median of 3 after a warm-up; {machine()}")
    print("# probe MB: peak resident memory of a process that builds the network and probes it, less one that")
    print("# only builds it (MALLOC_MMAP_THRESHOLD_=65536: large blocks go back when freed, so peaks follow live data)")
    print(
        "# graph MB: the same for a forward pass alone that keeps its autograd graph (the floor of any backward pass);"
    )
    print(
        "# MB / 100 more: the growth from the depth above, per 100 layers (the per-layer cost, without the fixed part)"
    )
    header = f"{'depth':>6} {'seconds':>8} {'s / 100 layers':>15} {'peak RSS MB':>12} {'probe MB':>9}"
    print(f"{header} {'MB / 100 layers':>16} {'MB / 100 more':>14} {'graph MB':>9} {'graph / 100 more':>17}")
    previous = None
    for row in rows:
        per_100 = 100 * row["seconds"] / row["depth"]
        mb_per_100 = 100 * row["probe_mb"] / row["depth"]
        more = graph_more = "-"
        if previous is not None:
            layers = row["depth"] - previous["depth"]
            more = f"{100 * (row['probe_mb'] - previous['probe_mb']) / layers:.1f}"
            graph_more = f"{100 * (row['graph_mb'] - previous['graph_mb']) / layers:.1f}"
        previous = row
        print(
            f"{row['depth']:6d} {row['seconds']:8.2f} {per_100:15.3f} {row['peak_mb']:12.0f} {row['probe_mb']:9.0f} "
            f"{mb_per_100:16.1f} {more:>14} {row['graph_mb']:9.0f} {graph_more:>17}"
        )
    return rows


if __name__ == "__main__":
    main()
