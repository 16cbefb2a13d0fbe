"""Monitor overhead: a training step with steadygrad's Monitor over the bare step, measured in one run.

    .venv/bin/python benchmarks/monitor.py [--steps 200]

A 20-layer, width-256 ReLU MLP, batch 128, SGD. Rows: the bare step (the reference), the Monitor logging
every step (full per-layer records), every 10th step, both with the compiled statistics
(``steadygrad.fast``) and with the eager ones, and a plain per-step hook baseline (a forward hook
and a gradient hook per layer computing mean, std and gradient norm, the way hand-written monitoring
usually does). Ratios are mean step times over the bare step's, interleaved so machine noise hits all alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from _timing import machine
from steadygrad import fast
from steadygrad.measure import Monitor
from steadygrad.nets import NetSpec, build

COCKPIT = (
    "cockpit-for-pytorch (the best-known peer): not measured. `pip install --dry-run cockpit-for-pytorch` shows that "
    "1.0.2 pulls backpack-for-pytorch 1.7.1 and with it torch 2.14.1 (a CUDA build) and torchvision 0.29.1, which "
    "would replace the pinned CPU torch 2.13.0 this project must keep."
)


class PlainHooks:
    """What people write by hand: per-layer forward and tensor hooks with .item() calls (host syncs)."""

    def __init__(self, model):
        self.handles = []
        self.log = []
        for block in model.blocks:
            self.handles.append(block.register_forward_hook(self._hook))

    def _hook(self, module, args, out):
        self.log.append((out.mean().item(), out.std().item()))
        out.register_hook(lambda g: self.log.append(g.norm().item()))

    def close(self):
        for h in self.handles:
            h.remove()


def main(steps: int = 200) -> list[tuple[str, str, float]]:
    torch.manual_seed(0)
    net = build(NetSpec(depth=20, width=256, in_features=256))
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    x, y = torch.randn(128, 256), torch.randint(0, 10, (128,))

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    compiled = fast.enable()

    def monitor(every: int, use_kernels: bool):
        def start():
            (fast.enable if use_kernels else fast.disable)()
            return Monitor(net, every=every, optimizer=opt).attach()

        return start, lambda m: m.detach()

    variants = {
        "bare step (reference)": (lambda: None, lambda c: None),
        "Monitor, every step": monitor(1, compiled),
        "Monitor, every 10th step": monitor(10, compiled),
        "Monitor, every step, eager": monitor(1, False),
        "Monitor, every 10th, eager": monitor(10, False),
        "plain per-step hooks": (lambda: PlainHooks(net), lambda h: h.close()),
    }
    times = {name: [] for name in variants}
    for _ in range(3):
        step()
    for _ in range(steps // 20):  # rounds: each variant runs 20 steps in turn, so drift hits all alike
        for name, (start, stop) in variants.items():
            context = start()
            began = time.perf_counter()
            for _ in range(20):
                step()
            times[name].append((time.perf_counter() - began) / 20)
            stop(context)
    bare = statistics.mean(times["bare step (reference)"])
    rows = []
    print(f"# monitor overhead: 20-layer width-256 ReLU MLP, batch 128, SGD, mean of {steps} steps; {machine()}")
    print(f"{'variant':28} {'ms per step':>12} {'ratio':>7}")
    for name, values in times.items():
        mean = statistics.mean(values)
        rows.append((name, f"{mean * 1e3:.3f}", mean / bare))
        print(f"{name:28} {mean * 1e3:12.3f} {mean / bare:7.2f}")
    print(COCKPIT)
    fast.disable()
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    main(parser.parse_args().steps)
