"""The Monitor and the probe on real models: a 4-layer GPT-2 (Hugging Face, from its config) and a ResNet-18-style CNN.

    .venv/bin/python benchmarks/models.py [--rounds 6]

Models (random weights, nothing downloaded):

- GPT-2: ``GPT2LMHeadModel`` with 4 layers, n_embd 128, 4 heads, sequence 64, batch 8, a vocabulary of 2,048 (the
  full 50,257 would make the head most of the step, which flatters any per-layer cost), AdamW, its own loss.
- ResNet-18: torchvision's layout (BasicBlocks 2-2-2-2, zero-initialized residual BN, ``tests/zoo.py``) at half its
  widths (32-256; full width takes 0.7 s a step on 2 cores), on 32x32 images, batch 32, SGD with momentum.

Rows, each against the bare training step in the same round (rounds run every variant in turn, 10 steps each, so
drift hits all alike; the ratio is the median over rounds): the Monitor at its defaults logging every step and every
10th step (its update ratio then on logged steps 10 optimizer steps apart), with the eager taps and with the C++
taps (``steadygrad.fast.enable()``); and ``steadygrad.probe`` of the same batch against one training step,
alternating. Targets (issue 22): every 10th step at most 1.02x, every step at most 1.15x, the probe at most 3x.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _timing import machine  # noqa: E402

STEPS_PER_ROUND = 10


def gpt2():
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=4, n_embd=128, n_head=4, vocab_size=2048, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    tokens = torch.randint(0, 2048, (8, 64), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": tokens, "labels": tokens}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def loss():
        return model(**inputs).loss

    return "GPT-2 4x128, seq 64, batch 8", model, inputs, None, optimizer, loss


def _zoo():
    """tests/zoo.py, loaded by path: putting tests/ on sys.path would hide benchmarks/norm.py behind tests/norm."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("steadygrad_test_zoo", HERE.parent / "tests" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def resnet18():
    zoo = _zoo()
    torch.manual_seed(0)
    model = zoo.ResNet18(widths=(32, 64, 128, 256))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def loss():
        return F.cross_entropy(model(x), y)

    return "ResNet-18 (half width), 32x32, batch 32", model, x, y, optimizer, loss


def _seconds(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def measure(make, rounds: int) -> list[str]:
    from steadygrad import fast
    from steadygrad.measure import Monitor, probe

    label, model, inputs, targets, optimizer, loss = make()
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    def steps():
        for _ in range(STEPS_PER_ROUND):
            step()

    compiled = fast.enable() and fast.backend() == "cpp"
    fast.disable()
    taps = ["eager"] + (["C++"] if compiled else [])
    monitors = {(t, every): Monitor(model, every=every, optimizer=optimizer) for t in taps for every in (1, 10)}
    variants = {"bare": (None, None)}
    for (t, every), monitor in monitors.items():
        variants[f"Monitor every {'step' if every == 1 else '10th step'}, {t} taps"] = (t, monitor)
    for _ in range(2):
        steps()
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (t, monitor) in variants.items():
            fast.enable("cpp") if t == "C++" else fast.disable()
            if monitor is not None:
                monitor.attach()
            times[name].append(_seconds(steps) / STEPS_PER_ROUND)
            if monitor is not None:
                monitor.detach()
    fast.disable()
    bare = times["bare"]
    lines = [f"{label}: bare step {statistics.median(bare) * 1e3:.1f} ms"]
    for name, values in times.items():
        if name == "bare":
            continue
        ratios = sorted(v / b for v, b in zip(values, bare, strict=True))
        lines.append(f"  {name:<36} {statistics.median(ratios):6.3f}x  (rounds {ratios[0]:.3f}-{ratios[-1]:.3f})")
    for t in taps:
        fast.enable("cpp") if t == "C++" else fast.disable()
        probe(model, inputs, targets)  # warm-up
        probes, trained = [], []
        for _ in range(rounds):
            probes.append(_seconds(lambda: probe(model, inputs, targets)))
            trained.append(_seconds(step))
        ratios = sorted(p / s for p, s in zip(probes, trained, strict=True))
        lines.append(
            f"  {f'probe, {t} taps, against one step':<36} {statistics.median(ratios):6.3f}x  "
            f"(rounds {ratios[0]:.3f}-{ratios[-1]:.3f}; probe {statistics.median(probes) * 1e3:.1f} ms)"
        )
    fast.disable()
    return lines


def main(rounds: int = 6) -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    print(f"# the Monitor at its defaults and the probe on real models; {machine()}")
    print(
        f"# ratio: median over {rounds} rounds of (variant's step / the bare step's in the same round), "
        f"{STEPS_PER_ROUND} steps"
    )
    print("# per variant per round; the probe alternates with single training steps")
    for make in (gpt2, resnet18):
        for line in measure(make, rounds):
            print(line)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    main(parser.parse_args().rounds)
