"""Time to an answer: the doctor's wall time to a ranked answer at its defaults (60 s budget, 3 seeds, 60 steps).

    .venv/bin/python benchmarks/doctor.py

Two models: a 4-layer GPT-2 from config (n_embd 128, sequence 64, batch 8, its own loss on counting sequences)
and a 20-layer ReLU MLP of width 64 on scikit-learn's digits. Each runs with the trial repeats in 2 forked worker
processes of one thread each, and in this process with 2 threads, alternating (one round each, twice), so that
the machine's state hits both alike. Reported: the wall time, the trials (control + candidates) and the
candidate-repeats that ran within the budget, and whether the answer used every seed. Target: the control and at
least six candidates with their repeats within the 60 s budget on 2 cores.
"""

from __future__ import annotations

import statistics
import time

import torch

import steadygrad as sg
from _timing import machine


def gpt2():
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=256, n_positions=64)
    start = torch.randint(0, 256, (160, 1), generator=torch.Generator().manual_seed(1))
    ids = (start + torch.arange(64)) % 256  # counting: learnable
    return (lambda: transformers.GPT2LMHeadModel(config)), {
        "data": {"input_ids": ids, "labels": ids},
        "batch_size": 8,
        "optimizer": "adamw",
    }


def mlp():
    from steadygrad import data
    from steadygrad.nets import NetSpec, build

    d = data.digits()
    spec = NetSpec(depth=20, width=64, in_features=64, activation="relu", init="he_normal")
    return (lambda: build(spec)), {"data": (d.x_train[:512], d.y_train[:512])}


def one(factory, kwargs, workers: int):
    torch.set_num_threads(2 if workers == 1 else 1)
    start = time.perf_counter()
    report = sg.doctor(factory, workers=workers, **kwargs)
    return time.perf_counter() - start, report


def main() -> None:
    print(machine())
    print(f"{'model':<26} {'mode':<22} {'wall s':>8} {'trials':>7} {'cand-repeats':>13} {'seeds':>6} {'skipped':>8}")
    for name, make in (("GPT-2 4x128, seq 64, b 8", gpt2), ("MLP 20x64 on digits", mlp)):
        factory, kwargs = make()
        times: dict[int, list[float]] = {1: [], 2: []}
        last = {}
        for _ in range(2):
            for workers in (2, 1):
                seconds, report = one(factory, kwargs, workers)
                times[workers].append(seconds)
                last[workers] = report
        for workers in (2, 1):
            r = last[workers]
            mode = "2 workers x 1 thread" if workers == 2 else "1 process x 2 threads"
            repeats = sum(len(t.repeats) for t in r.candidates)
            print(
                f"{name:<26} {mode:<22} {statistics.median(times[workers]):8.1f} {1 + len(r.candidates):>7} "
                f"{repeats:>13} {r.repeats:>6} {len(r.skipped):>8}"
            )
    torch.set_num_threads(2)


if __name__ == "__main__":
    main()
