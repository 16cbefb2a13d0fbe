"""Run every benchmark in this folder, one after another: `make bench` (or python benchmarks/run_all.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import clip
import norm

if __name__ == "__main__":
    for benchmark in (clip, norm):
        benchmark.main()
        print()
