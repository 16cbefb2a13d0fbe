"""Probe cost at depth: time and peak memory of steadygrad.probe on width-256 MLPs, batch 128.

    .venv/bin/python benchmarks/probe.py

Each depth runs in a fresh process, so its peak resident memory is its own; the time is the median of
three probes after one warm-up (the first call pays allocations). Target: 1,000 layers in at most 5 s,
time and memory linear in depth.
"""

from __future__ import annotations

import json
import subprocess
import sys

from _timing import machine

CHILD = """
import json, resource, statistics, sys, time, torch
from steadygrad.measure import probe
from steadygrad.nets import NetSpec, build
depth = int(sys.argv[1])
net = build(NetSpec(depth=depth, width=256, in_features=256), torch.Generator().manual_seed(0))
x = torch.randn(128, 256)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
probe(net, x)
times = []
for _ in range(3):
    start = time.perf_counter(); probe(net, x); times.append(time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"depth": depth, "seconds": statistics.median(times), "peak_mb": peak / 1024,
                  "probe_mb": (peak - before) / 1024}))
"""


def main(depths=(100, 300, 1000)) -> list[dict]:
    rows = []
    for depth in depths:
        done = subprocess.run([sys.executable, "-c", CHILD, str(depth)], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"# probe of a width-256 MLP, batch 128, median of 3 after a warm-up; {machine()}")
    print(f"{'depth':>6} {'seconds':>8} {'s / 100 layers':>15} {'peak RSS MB':>12}")
    for row in rows:
        per_100 = 100 * row["seconds"] / row["depth"]
        print(f"{row['depth']:6d} {row['seconds']:8.2f} {per_100:15.3f} {row['peak_mb']:12.0f}")
    return rows


if __name__ == "__main__":
    main()
