"""The step's end as one pass over many tensors: steadygrad's passes against ``torch._foreach_norm``.

    .venv/bin/python benchmarks/foreach.py

At a logged step's end the Monitor reads every watched layer's parameter gradients and first weight. Here N layers
(N = 100, 1,000 and 5,000), each a (64, 256) weight with its gradient, so 2N tensors of 16,384 float32 values, are
read by:

- the reference: one ``torch._foreach_norm`` over the same 2N tensors (the sums of squares alone);
- the eager taps' pass (``Recorder.finalize``'s parameter table: ``square_norms`` of the gradients and of the
  weights, and each weight's sum), all in multi-tensor passes but the sums;
- the C++ taps' pass (``Collector.statistics``: gradient squares, and each weight's count, sum and squares, in one
  parallel pass), and numba's where it is installed.

Each ratio is the median of interleaved runs (``_timing.compare``). Target (issue 22): no worse than
``_foreach_norm`` at any count, and linear in the count.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import compare, machine

COUNTS = (100, 1000, 5000)
SHAPE = (64, 256)


def _layers(count: int) -> nn.ModuleList:
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Linear(SHAPE[1], SHAPE[0], bias=False) for _ in range(count))
    for layer in layers:
        layer.weight.grad = torch.randn_like(layer.weight)
    return layers


def _eager_pass(layers):
    from steadygrad.measure.hooks import Recorder

    recorder = Recorder([(str(i), layer) for i, layer in enumerate(layers)])
    return lambda: recorder._parameter_table(torch.device("cpu"))


def _compiled_pass(layers, backend: str):
    from steadygrad import fast

    if not (fast.enable(backend) and fast.backend() == backend):
        return None
    made = fast.collector_type()
    weights = [[layer.weight] for layer in layers]
    collector = made(weights, [[] for _ in layers], [layer.weight for layer in layers], [None for _ in layers])
    slots = list(range(len(layers)))

    def run():
        collector.clear()
        return collector.statistics(slots, False)

    return run


def main() -> None:
    warnings.filterwarnings("ignore")
    from steadygrad import fast

    print(f"# the step's end over N layers, each a {SHAPE[0]}x{SHAPE[1]} float32 weight and its gradient; {machine()}")
    print("# ratio: median of interleaved runs against one torch._foreach_norm over the same 2N tensors")
    print(
        f"{'layers':>7} {'tensors':>8} {'pass':<26} {'_foreach_norm':>20} {'steadygrad':>20} {'ratio':>7} "
        f"{'us/tensor':>10}"
    )
    for count in COUNTS:
        layers = _layers(count)
        tensors = [t for layer in layers for t in (layer.weight.grad, layer.weight)]

        def reference(tensors=tensors):
            return torch._foreach_norm(tensors, 2)

        passes = {"eager taps (finalize)": _eager_pass(layers)}
        for label, backend in (("C++ taps (statistics)", "cpp"), ("numba taps (statistics)", "numba")):
            made = _compiled_pass(layers, backend)
            if made is not None:
                passes[label] = made
        fast.disable()
        repeats = 30 if count < 5000 else 12
        for label, candidate in passes.items():
            ref, ours, ratio = compare(reference, candidate, repeats=repeats)
            per_tensor = 1e3 * ours.median_ms / len(tensors)
            print(f"{count:7d} {len(tensors):8d} {label:<26} {ref!s:>20} {ours!s:>20} {ratio:7.2f} {per_tensor:10.2f}")
    fast.disable()


if __name__ == "__main__":
    main()
