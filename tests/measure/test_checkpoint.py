"""Gradient checkpointing: the recompute in the backward pass is no call of its own, so the records of a
checkpointed model equal those of the same model run plainly (reentrant and non-reentrant, torch's checkpoint and
transformers' gradient_checkpointing_enable, probe and Monitor, eager and numba's taps)."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from steadygrad import fast
from steadygrad.measure import Monitor, probe

FIELDS = (
    "act_mean",
    "act_std",
    "act_min",
    "act_max",
    "act_second_moment",
    "saturated",
    "grad_norm",
    "grad_ratio",
    "weight_grad_norm",
    "bias_grad_norm",
    "weight_var",
    "nonfinite_act",
    "nonfinite_grad",
)


class Block(nn.Module):
    """A residual block whose Linear runs twice: two calls inside one checkpointed segment."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.act = nn.Tanh()

    def forward(self, x):
        return x + self.act(self.linear(self.act(self.linear(x))))


class Net(nn.Module):
    """Six residual blocks, each checkpointed when ``reentrant`` is True or False (None: run plainly)."""

    def __init__(self, width: int = 8, reentrant: bool | None = None) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.stem = nn.Linear(4, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(6))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x) if self.reentrant is None else checkpoint(block, x, use_reentrant=self.reentrant)
        return self.head(x)


def nets(reentrant: bool) -> tuple[Net, Net]:
    """The same weights, plain and checkpointed."""
    plain = Net()
    checkpointed = copy.deepcopy(plain)
    checkpointed.reentrant = reentrant
    return plain, checkpointed


def assert_same(a, b, rtol=1e-6, atol=1e-9) -> None:
    """Equal record lists: the same (name, call)s in the same order, and the same statistics."""
    assert [(r.name, r.call) for r in a.records] == [(r.name, r.call) for r in b.records]
    for ra, rb in zip(a.records, b.records, strict=True):
        for name in FIELDS:
            va, vb = getattr(ra, name), getattr(rb, name)
            if isinstance(va, float) and math.isnan(va):
                assert math.isnan(vb), (ra.label, name)
            else:
                assert vb == pytest.approx(va, rel=rtol, abs=atol), (ra.label, name)


def _check_records(report) -> None:
    """What the comparison stands on: every block's Linear has two calls, each with a gradient."""
    assert [r.call for r in report.records if r.name == "blocks.3.linear"] == [1, 2]
    assert all(math.isfinite(r.grad_norm) and r.grad_norm > 0 for r in report.records)


@pytest.mark.parametrize("reentrant", [True, False])
def test_probe_of_checkpointed_blocks_equals_the_plain_probe(reentrant):
    torch.manual_seed(0)
    plain, checkpointed = nets(reentrant)
    x = torch.randn(16, 4)
    expected = probe(plain, x)
    _check_records(expected)
    assert_same(expected, probe(checkpointed, x))


class SharedNet(nn.Module):
    """A Linear shared by the first and the last of three segments: reentrant checkpointing recomputes the last
    segment first, so its recompute must find its own call, not the earliest waiting one."""

    def __init__(self, width: int = 8, reentrant: bool | None = None) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.shared = nn.Linear(width, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(3))
        self.head = nn.Linear(width, 3)

    def segment(self, i: int, x):
        x = x + torch.tanh(self.blocks[i](x))
        return x + torch.tanh(self.shared(x)) if i != 1 else x

    def forward(self, x):
        for i in range(3):
            if self.reentrant is None:
                x = self.segment(i, x)
            else:
                x = checkpoint(self.segment, i, x, use_reentrant=self.reentrant)
        return self.head(x)


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_module_shared_by_two_checkpointed_segments_keeps_each_calls_gradient(reentrant):
    torch.manual_seed(5)
    plain = SharedNet()
    checkpointed = copy.deepcopy(plain)
    checkpointed.reentrant = reentrant
    x = torch.randn(16, 8)
    expected = probe(plain, x)
    calls = [r for r in expected.records if r.name == "shared"]
    assert len(calls) == 2 and calls[0].grad_norm != pytest.approx(calls[1].grad_norm, rel=1e-3)
    assert_same(expected, probe(checkpointed, x))


def _train(net: nn.Module, batches):
    """Two optimizer steps of two micro-batches each under a Monitor; its history's reports."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with Monitor(net, every=1, optimizer=optimizer) as monitor:
        for step in batches:
            optimizer.zero_grad()
            for x, y in step:
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                monitor.observe_loss(loss)
            optimizer.step()
    return monitor.history.reports


def _batches():
    g = torch.Generator().manual_seed(7)
    return [[(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)] for _ in "ab"]


@pytest.mark.parametrize("reentrant", [True, False])
def test_monitor_over_two_steps_of_micro_batches_equals_the_plain_run(reentrant):
    torch.manual_seed(1)
    plain, checkpointed = nets(reentrant)
    batches = _batches()
    expected, got = _train(plain, batches), _train(checkpointed, batches)
    assert len(expected) == len(got) == 2
    for a, b in zip(expected, got, strict=True):
        _check_records(a)
        assert_same(a, b)
        assert [r.update_ratio for r in b.records] == pytest.approx(
            [r.update_ratio for r in a.records], rel=1e-5, nan_ok=True
        )


@pytest.mark.parametrize("reentrant", [True, False])
def test_numba_taps_on_checkpointed_blocks_equal_the_plain_eager_run(reentrant):
    """The deferred path: the taps see the first forward's output; a reentrant recompute's gradient is tapped by
    the recorder and added to the taps' sums, a non-reentrant recompute is skipped."""
    if not fast.available("numba"):
        pytest.skip("numba is not installed")
    torch.manual_seed(2)
    plain, checkpointed = nets(reentrant)
    batches = _batches()
    expected = _train(plain, batches)
    fast.enable("numba")
    try:
        got = _train(checkpointed, batches)
    finally:
        fast.disable()
    for a, b in zip(expected, got, strict=True):
        assert_same(a, b, rtol=1e-5, atol=1e-7)  # the taps sum float32 values in float32 chunks


@pytest.mark.parametrize("reentrant", [True, False])
def test_gpt2_with_gradient_checkpointing_enable_records_as_without(reentrant):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    torch.manual_seed(3)
    model = transformers.GPT2LMHeadModel(config).train()
    inputs = {"input_ids": torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))}
    layers = ["transformer.h.*", "transformer.ln_f"]
    expected = probe(model, inputs, layers=layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it activation_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.transformer.gradient_checkpointing
    got = probe(model, inputs, layers=layers)
    assert {"transformer.h.0", "transformer.h.1.mlp.c_fc", "transformer.h.1.attn"} <= {r.name for r in got.records}
    assert all(r.call == 1 for r in got.records)
    assert sum(math.isfinite(r.grad_norm) for r in got.records) >= 20  # gradients reached the blocks
    assert_same(expected, got, rtol=1e-5, atol=1e-8)


class EqualFirstRows(nn.Module):
    """A Linear called twice on inputs, so outputs, that agree in their first row (sample 0): only the rest of the
    outputs tells the calls apart. The calls are in two checkpointed segments (recomputed last first), or in one
    (``together``: recomputed in forward order)."""

    def __init__(self, reentrant: bool | None = None, together: bool = False) -> None:
        super().__init__()
        self.reentrant, self.together = reentrant, together
        self.shared = nn.Linear(32, 32)
        self.mid = nn.Linear(32, 32)
        self.register_buffer("delta", torch.cat([torch.zeros(1, 32), 5 * torch.ones(7, 32)]))

    def first(self, x):
        return self.mid(self.shared(x))

    def second(self, x):
        return self.shared(x + self.delta) * 3

    def both(self, x):
        return self.first(x) + self.second(x)

    def run(self, segment, x):
        return segment(x) if self.reentrant is None else checkpoint(segment, x, use_reentrant=self.reentrant)

    def forward(self, x):
        return self.run(self.both, x) if self.together else self.run(self.first, x) + self.run(self.second, x)


@pytest.mark.parametrize("together", [False, True])
@pytest.mark.parametrize("reentrant", [True, False])
def test_a_shared_modules_calls_with_equal_first_rows_keep_their_gradients(reentrant, together):
    torch.manual_seed(0)
    plain = EqualFirstRows(together=together)
    checkpointed = copy.deepcopy(plain)
    checkpointed.reentrant = reentrant
    x = torch.randn(8, 32)
    x[0] = 0
    expected = probe(plain, x, layers=["shared"])
    calls = [r.grad_norm for r in expected.records]
    assert len(calls) == 2 and calls[0] != pytest.approx(calls[1], rel=1e-3)
    assert_same(expected, probe(checkpointed, x, layers=["shared"]))
