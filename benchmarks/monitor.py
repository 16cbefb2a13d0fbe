"""Monitor overhead: a training step with steadygrad's Monitor over the bare step, measured in one run.

    .venv/bin/python benchmarks/monitor.py [--steps 400]

A 20-layer, width-256 ReLU MLP, batch 128, SGD. Rows: the bare step (the reference), the Monitor logging
every step (full per-layer records) and every 10th step, with each kind of taps this machine has: the C++
ones (``steadygrad.fast``), numba's (``steadygrad.fast.enable("numba")``, for machines with no C++
compiler) and the eager statistics; and a plain per-step hook baseline (a forward hook
and a gradient hook per layer computing mean, std and gradient norm, the way hand-written monitoring
usually does). Each ratio is the median over rounds of the variant's mean step time over the bare step's in
the same round (every variant runs 20 steps per round, in turn), so the machine's drift hits all alike; the
middle half of the rounds' ratios shows the spread. A last measurement shows where the every-10th schedule's
cost lies: one Monitor logging every 10th step, each step timed and filed by its place in the 10-step cycle.

The best-known peer, cockpit-for-pytorch with its 'economy' configuration tracking every step, runs last
where it is installed (`make bench-peer`, which `make bench` calls; see benchmarks/peer-requirements.txt for
why it is installed without its dependencies). At over a second a step it runs 5 rounds, not 20.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from _timing import machine
from steadygrad import fast
from steadygrad.measure import Monitor
from steadygrad.nets import NetSpec, build

PEER = "cockpit-for-pytorch 'economy' (the best-known peer)"
PEER_ROUNDS, BARE_PER_ROUND = 5, 5  # one cockpit step takes over a second


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


def _use(backend: str | None) -> None:
    """Switch to ``backend``'s taps ("cpp", "numba"), or to the eager statistics (None)."""
    fast.enable(backend) if backend else fast.disable()


def _cycle_costs(step, net, opt, steps: int, backend: str | None) -> tuple[list[float], float]:
    """Where a Monitor logging every 10th step spends its time: ([extra ms of each step of the 10-step cycle,
    the logged step first], the clean unlogged step's ms). Every step is timed and filed by its position after
    the last logged step. The clean step is the median of positions 2-8: position 1 can pay for what the logged
    step left behind (caches, the allocator's heap) and position 9 re-arms the hooks in its optimizer step. All
    positions interleave within one run, so the machine's drift hits them alike."""
    _use(backend)
    monitor = Monitor(net, every=10, optimizer=opt).attach()
    by_position = [[] for _ in range(10)]
    since_logged = None  # steps since the last logged one: None until the first logged step
    for i in range(steps + 20):
        logged = monitor.logging
        began = time.perf_counter()
        step()
        elapsed = time.perf_counter() - began
        since_logged = 0 if logged else (None if since_logged is None else since_logged + 1)
        if i >= 20 and since_logged is not None and since_logged < 10:  # after a warm-up of 20 steps
            by_position[since_logged].append(elapsed)
    monitor.detach()
    medians = [statistics.median(times) * 1e3 for times in by_position]
    clean = statistics.median(medians[2:9])
    return [m - clean for m in medians], clean


def _cockpit_ratio(bare_step, net, x, y) -> tuple[float, float, float] | str:
    """cockpit-for-pytorch's 'economy' configuration, tracking every step, over the bare step: (median cockpit
    ms, median bare ms, median of the rounds' ratios), or why it could not run. Each of PEER_ROUNDS rounds times
    BARE_PER_ROUND ``bare_step``s (of ``net``) and one cockpit step of a backpack-extended copy (``extend`` adds hooks
    to every module, so the bare net stays unextended)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cockpit imports the deprecated pkg_resources
            from backpack import extend
            from cockpit import Cockpit
            from cockpit.utils.configuration import configuration
    except ImportError as error:
        return f"not installed here ({error}); `make bench-peer` installs it without its dependencies"
    model = extend(copy.deepcopy(net))
    loss_fn = extend(torch.nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    cockpit = Cockpit(model.parameters(), quantities=configuration("economy"))

    def cockpit_step(step: int):
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = loss_fn(out, y)
        info = {
            "batch_size": x.shape[0],
            "individual_losses": F.cross_entropy(out, y, reduction="none"),
            "loss": loss,
            "optimizer": opt,
        }
        with cockpit(step, info=info):
            loss.backward(create_graph=cockpit.create_graph(step))
        opt.step()

    def seconds(fn) -> float:
        began = time.perf_counter()
        fn()
        return time.perf_counter() - began

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # backpack's full backward hooks warn that the input needs no grad
        cockpit_step(0)
        bare, peer = [], []
        for step in range(1, PEER_ROUNDS + 1):
            bare.append(statistics.mean(seconds(bare_step) for _ in range(BARE_PER_ROUND)))
            peer.append(seconds(lambda s=step: cockpit_step(s)))
    ratio = statistics.median(p / b for p, b in zip(peer, bare, strict=True))
    return statistics.median(peer) * 1e3, statistics.median(bare) * 1e3, ratio


def main(steps: int = 400) -> list[tuple[str, str, float]]:
    torch.manual_seed(0)
    net = build(NetSpec(depth=20, width=256, in_features=256))
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    x, y = torch.randn(128, 256), torch.randint(0, 10, (128,))

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    # the taps each backend has here: C++ (compiled), numba (no C++ compiler needed), and the eager statistics
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backends = {"compiled": "cpp", "numba": "numba"}
        backends = {label: b for label, b in backends.items() if fast.enable(b) and fast.backend() == b}
    backends["eager"] = None

    def monitor(every: int, backend: str | None):
        made = Monitor(net, every=every, optimizer=opt)  # made once: rounds time the steps, not the set-up

        def start():
            _use(backend)
            return made.attach()

        return start, lambda m: m.detach()

    variants = {"bare step (reference)": (lambda: None, lambda c: None)}
    for label, backend in backends.items():
        suffix = "" if label == "compiled" else f", {label}"
        variants[f"Monitor, every step{suffix}"] = monitor(1, backend)
        variants[f"Monitor, every 10th step{suffix}"] = monitor(10, backend)
    variants["plain per-step hooks"] = (lambda: PlainHooks(net), lambda h: h.close())
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
    bare = times["bare step (reference)"]
    rows = []
    print(
        f"# monitor overhead: 20-layer width-256 ReLU MLP, batch 128, SGD, {steps // 20} rounds of 20 steps per "
        f"variant; {machine()}"
    )
    print("# ratio: median over rounds of (variant's mean step / the bare step's in the same round), with the")
    print("# middle half of the rounds' ratios; a round runs every variant in turn, so drift hits all alike")
    print(f"{'variant':33} {'ms per step':>12} {'ratio':>7}  {'middle half':>13}")
    for name, values in times.items():
        ratios = [v / b for v, b in zip(values, bare, strict=True)]
        q1, median, q3 = statistics.quantiles(ratios, n=4)
        mean_ms = statistics.mean(values) * 1e3
        rows.append((name, f"{mean_ms:.3f}", median))
        print(f"{name:33} {mean_ms:12.3f} {median:7.3f}  {q1:6.3f}-{q3:6.3f}")
    for label, backend in backends.items():
        extra, clean = _cycle_costs(step, net, opt, steps, backend)
        print(
            f"# every 10th step ({label}), each step of the cycle timed in one run: the logged step "
            f"+{extra[0]:.3f} ms, the one after it {extra[1]:+.3f}, the one before it (re-arming) {extra[9]:+.3f}, "
            f"on a {clean:.3f} ms unlogged step; the cycle costs {1 + sum(extra) / (10 * clean):.3f}x"
        )
    peer = _cockpit_ratio(step, net, x, y)
    if isinstance(peer, str):
        print(f"{PEER}: {peer}")
    else:
        peer_ms, bare_ms, ratio = peer
        rows.append((PEER, f"{peer_ms:.3f}", ratio))
        print(
            f"{PEER}, every step: {peer_ms:.1f} ms per step against {bare_ms:.3f} ms bare, {ratio:.0f}x "
            f"(median of {PEER_ROUNDS} rounds: {BARE_PER_ROUND} bare steps, then one cockpit step)"
        )
    fast.disable()
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    main(parser.parse_args().steps)
