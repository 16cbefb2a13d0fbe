"""torch.compile'd models: the probe and the Monitor measure them eagerly on logged steps, under the original
module's names, with the records of the eager model, and the unlogged steps run the compiled code.

The backend counts its compiles and the runs of what it compiled (it runs dynamo's graph as is), which is all
these tests need of a compiler and costs a dynamo trace, not an inductor build."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from steadygrad.measure import Monitor, probe
from steadygrad.nets import NetSpec, build

FIELDS = ("act_mean", "act_std", "act_second_moment", "saturated", "grad_norm", "weight_grad_norm", "weight_var")


class CountingBackend:
    def __init__(self) -> None:
        self.compiles = 0
        self.runs = 0

    def __call__(self, graph, example_inputs):
        self.compiles += 1

        def run(*args):
            self.runs += 1
            return graph.forward(*args)

        return run


@pytest.fixture
def backend():
    torch._dynamo.reset()
    yield CountingBackend()
    torch._dynamo.reset()


def assert_same(a, b, rtol=1e-6) -> None:
    assert [(r.name, r.call) for r in a.records] == [(r.name, r.call) for r in b.records]
    for ra, rb in zip(a.records, b.records, strict=True):
        for name in FIELDS:
            va, vb = getattr(ra, name), getattr(rb, name)
            assert (math.isnan(va) and math.isnan(vb)) or vb == pytest.approx(va, rel=rtol, abs=1e-9), (ra.label, name)


def net_and_data():
    net = build(NetSpec(depth=3, width=8, in_features=4, activation="tanh"), torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    return net, torch.randn(16, 4, generator=g), torch.randint(0, 10, (16,), generator=g)


def test_probe_of_a_compiled_mlp_equals_the_eager_probe(backend):
    net, x, _ = net_and_data()
    expected = probe(net, x)
    compiled = torch.compile(net, backend=backend)
    got = probe(compiled, x)
    assert len(got.records) == len(expected.records) >= 4
    assert not any(r.name.startswith("_orig_mod") for r in got.records)
    assert_same(expected, got)
    assert [r.predicted_second_moment for r in got.records] == [r.predicted_second_moment for r in expected.records]
    assert backend.compiles == backend.runs == 0  # measured eagerly: nothing was compiled
    compiled(x)  # compiled now, with no hook of ours; the probe still sees every layer
    assert_same(expected, probe(compiled, x))
    assert (backend.compiles, backend.runs) == (1, 1)


def _train(model: nn.Module, x, y, after_step=lambda: None):
    """Three SGD steps under a Monitor logging steps 1 and 3: its reports."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, every=2, optimizer=optimizer) as monitor:
        for _ in range(3):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            monitor.observe_loss(loss)
            optimizer.step()
            after_step()
    return monitor.history.reports


def test_monitor_attached_after_the_first_compiled_call_records_as_eager(backend):
    net, x, y = net_and_data()
    expected = _train(copy.deepcopy(net), x, y)
    compiled = torch.compile(net, backend=backend)
    compiled(x)  # the first call compiles, with no hook of ours anywhere
    assert (backend.compiles, backend.runs) == (1, 1)
    runs = []
    got = _train(compiled, x, y, after_step=lambda: runs.append(backend.runs))
    assert [r.step for r in got] == [r.step for r in expected] == [1, 3]
    for a, b in zip(expected, got, strict=True):
        assert_same(a, b)
        assert b.loss == pytest.approx(a.loss, rel=1e-6)
    assert runs == [1, 2, 2]  # the logged steps ran eagerly, the unlogged one the compiled graph
    assert backend.compiles == 1  # and nothing recompiled


def test_a_compiled_block_inside_an_eager_model_is_measured_under_its_names(backend):
    net, x, _ = net_and_data()
    expected = probe(net, x)
    wrapped = copy.deepcopy(net)
    name, block = next((n, m) for n, m in wrapped.named_children() if any(True for _ in m.parameters()))
    setattr(wrapped, name, torch.compile(block, backend=backend))
    got = probe(wrapped, x)
    assert_same(expected, got)
    assert backend.runs == 0


def test_a_model_compiled_in_place_is_refused_with_the_way_out():
    net, _, _ = net_and_data()
    net.compile()  # compiles lazily, at the first call: none happens here
    with pytest.raises(ValueError, match=r"torch\.compile\(model\)"):
        Monitor(net)


class Fails(nn.Module):
    """A Linear whose forward raises while ``fail`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.fail = False

    def forward(self, x):
        if self.fail:
            raise RuntimeError("boom")
        return self.linear(x)


def test_a_forward_that_raises_under_the_probe_leaves_the_model_compiled(backend):
    model = Fails()
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(8, 4)
    model.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        probe(compiled, x)
    model.fail = False
    compiled(x)
    assert backend.runs == 1  # the eager stance did not outlive the failed step
