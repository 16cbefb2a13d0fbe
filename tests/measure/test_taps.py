"""The Monitor's compiled taps, the C++ Collector and numba's, against float64 references, directly."""

import math

import pytest
import torch

from steadygrad import fast
from steadygrad.measure.hooks import SUMS_COLUMNS

NO_KIND, TANH, SIGMOID, RECTIFIER = range(4)


@pytest.fixture(params=["cpp", "numba"])
def collector_type(request):
    if not fast.available(request.param):
        pytest.skip(f"steadygrad's {request.param} kernels cannot be had here (no C++ compiler, or no numba)")
    fast.enable(request.param)
    yield fast.collector_type()
    fast.disable()


def layer(weights=(), biases=(), snapshot=None):
    """One layer's constructor arguments: its weights, biases, first weight (of more than one value), snapshot."""
    first = weights[0] if weights and weights[0].numel() > 1 else None
    return list(weights), list(biases), first, snapshot


def make(collector_type, *layers):
    return collector_type(*(list(column) for column in zip(*(layers or [layer()]), strict=True)))


def rows(table):
    return [dict(zip(SUMS_COLUMNS, row, strict=True)) for row in table.tolist()]


def with_gradient(collector, y, grad, slot, kind=NO_KIND):
    """Hand y to the collector as a layer output, then run the backward that brings its gradient."""
    leaf = y.detach().requires_grad_(True)
    out = leaf * 1.0
    collector.output(out, slot, kind)
    out.backward(grad)


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (1e4, 1e-2), (-3.0, 1e-3)], ids=str)
@pytest.mark.parametrize("shape", [(128, 256), (7, 33), (3, 5000), (1,)], ids=str)
def test_activation_moments_are_accurate_at_any_offset(collector_type, mean, std, shape):
    y = (torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * std + mean).float()
    collector = make(collector_type)
    collector.output(y, 0, NO_KIND)  # no gradient to wait for: summed at once
    (got,) = rows(collector.statistics([0]))
    ref = y.double()
    n = got["n"]
    assert n == y.numel()
    assert got["mean"] == pytest.approx(ref.mean().item(), rel=1e-9, abs=1e-6 * std)
    if y.numel() > 1:
        assert math.sqrt(got["m2"] / (n - 1)) == pytest.approx(ref.std().item(), rel=1e-4)
    assert (got["min"], got["max"]) == (ref.min().item(), ref.max().item())
    # float32 partial sums of 4096 values
    assert got["squares"] == pytest.approx(ref.square().sum().item(), rel=1e-5)
    assert got["nonfinite"] == 0 and math.isnan(got["grad_squares"])


def test_micro_batches_merge_and_units_count(collector_type):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(16, 40, generator=g), torch.randn(8, 40, generator=g)
    a[:, :5] = -1.0  # five units dead in both micro-batches
    b[:, :5] = -2.0
    b[0, 6] = 1.0  # unit 6 alive in one only: alive
    a[:, 6] = -1.0
    collector = make(collector_type)
    collector.output(a, 0, RECTIFIER)
    collector.output(b, 0, RECTIFIER)
    (got,) = rows(collector.statistics([0]))
    whole = torch.cat([a, b]).double()
    assert got["n"] == 24 * 40 and got["mean"] == pytest.approx(whole.mean().item(), abs=1e-7)
    assert math.sqrt(got["m2"] / (got["n"] - 1)) == pytest.approx(whole.std().item(), rel=1e-6)
    assert got["units"] == 40 and got["dead"] == int(((whole > 0).sum(0) == 0).sum())


@pytest.mark.parametrize(
    ("kind", "values", "is_saturated"),
    [
        (TANH, lambda u: u * 2.04 - 1.02, lambda y: y.abs() > 0.99),
        (SIGMOID, lambda u: u, lambda y: (y < 0.01) | (y > 0.99)),
    ],
    ids=["tanh", "sigmoid"],
)
def test_saturation_counts(collector_type, kind, values, is_saturated):
    y = values(torch.rand(64, 50, generator=torch.Generator().manual_seed(2)))
    collector = make(collector_type)
    collector.units(y, 0, kind)  # an activation function's output that is not the layer's: units only
    (got,) = rows(collector.statistics([0]))
    assert got["saturated"] == int(is_saturated(y).sum()) and got["counted"] == y.numel()
    assert got["n"] == 0


def test_gradients_weights_and_the_snapshot(collector_type):
    g = torch.Generator().manual_seed(3)
    y, grad, wgrad, bgrad, w = (torch.randn(s, generator=g) for s in ((32, 10), (32, 10), (10, 20), (10,), (10, 20)))
    weight, bias = torch.nn.Parameter(w.clone()), torch.nn.Parameter(torch.zeros(10))
    weight.grad, bias.grad = wgrad, bgrad
    snapshot = torch.zeros_like(w)
    collector = make(collector_type, layer(), layer([weight], [bias], snapshot))
    with_gradient(collector, y, grad, 1)
    empty, got = rows(collector.statistics([0, 1]))
    assert all(math.isnan(empty[k]) for k in ("grad_squares", "weight_grad_squares", "bias_grad_squares"))
    assert got["n"] == y.numel() and got["mean"] == pytest.approx(y.double().mean().item(), abs=1e-7)
    assert got["grad_squares"] == pytest.approx(grad.double().square().sum().item(), rel=1e-6)
    assert got["weight_grad_squares"] == pytest.approx(wgrad.double().square().sum().item(), rel=1e-6)
    assert got["bias_grad_squares"] == pytest.approx(bgrad.double().square().sum().item(), rel=1e-6)
    assert got["weight_m2"] / (got["weight_n"] - 1) == pytest.approx(w.double().var().item(), rel=1e-6)
    assert torch.equal(snapshot, w)
    with torch.no_grad():
        weight.add_(0.01)  # the optimizer's step
    norms = collector.update_norms()
    assert norms[0].isnan().all()  # a layer with no weight has no ratio
    change, size = norms[1].tolist()
    assert math.sqrt(change) == pytest.approx((weight.detach() - w).double().norm().item(), rel=1e-5)
    assert size == pytest.approx(w.double().square().sum().item(), rel=1e-6)


def test_a_gradient_arriving_twice_counts_its_output_once(collector_type):
    # retain_graph and a second backward: the output was summed with the first gradient, the gradients add
    g = torch.Generator().manual_seed(7)
    y, grad = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    collector = make(collector_type)
    leaf = y.requires_grad_(True)
    out = leaf * 1.0
    collector.output(out, 0, NO_KIND)
    out.backward(grad, retain_graph=True)
    out.backward(grad)
    (got,) = rows(collector.statistics([0]))
    assert got["n"] == y.numel()
    assert got["grad_squares"] == pytest.approx(2 * grad.double().square().sum().item(), rel=1e-6)


def test_non_finite_values_are_excluded_and_counted(collector_type):
    g = torch.Generator().manual_seed(8)
    y, grad = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    y[1, 2], y[3, 3], grad[0, 0] = math.nan, math.inf, -math.inf
    collector = make(collector_type)
    with_gradient(collector, y, grad, 0, RECTIFIER)
    (got,) = rows(collector.statistics([0]))
    finite = y[torch.isfinite(y)].double()
    assert got["nonfinite"] == 2 and got["n"] == finite.numel()
    assert got["mean"] == pytest.approx(finite.mean().item(), abs=1e-7)
    assert (got["min"], got["max"]) == (finite.min().item(), finite.max().item())
    assert got["grad_nonfinite"] == 1
    assert got["grad_squares"] == pytest.approx(grad[torch.isfinite(grad)].double().square().sum().item(), rel=1e-6)


@pytest.mark.parametrize("other", [torch.float64, torch.bfloat16], ids=str)
def test_other_dtypes_are_summed_as_float32(collector_type, other):
    y = torch.randn(5, 7, generator=torch.Generator().manual_seed(9)).to(other)
    collector = make(collector_type)
    collector.output(y, 0, NO_KIND)
    (got,) = rows(collector.statistics([0]))
    assert got["n"] == y.numel()
    assert got["mean"] == pytest.approx(y.float().double().mean().item(), abs=1e-6)


@pytest.mark.parametrize(("mean", "std"), [(0.0, 0.05), (1e3, 1e-2)], ids=str)
def test_weight_moments_and_snapshot_over_several_chunks(collector_type, mean, std):
    # 15,000 values: four 4,096-value chunks and a ragged end, far from zero in the second case
    w = (torch.randn(300, 50, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * std + mean).float()
    snapshot = torch.empty_like(w)
    collector = make(collector_type, layer([torch.nn.Parameter(w.clone())], snapshot=snapshot))
    (got,) = rows(collector.statistics([0]))
    assert got["weight_n"] == w.numel()
    assert got["weight_m2"] / (got["weight_n"] - 1) == pytest.approx(w.double().var().item(), rel=1e-4)
    assert torch.equal(snapshot, w)


def test_a_layer_called_twice_has_one_weight_in_both_slots(collector_type):
    w = torch.nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(10)))
    snapshot = torch.zeros_like(w)
    collector = make(collector_type, layer([w], snapshot=snapshot))
    first, second = rows(collector.statistics([0, 0]))
    assert first["weight_m2"] == second["weight_m2"] > 0
    assert torch.equal(snapshot, w.detach())
    assert collector.update_norms()[0, 0].item() == 0.0  # no step yet: no change


def test_the_numba_taps_use_the_measure_layers_constants():
    # jit_collector sits below steadygrad.measure (as the C++ taps do) and repeats its constants
    pytest.importorskip("numba")
    from steadygrad.fast import jit_collector
    from steadygrad.measure import hooks, stats

    assert jit_collector.TANH_SATURATION == stats.TANH_SATURATION
    assert jit_collector.SIGMOID_SATURATION == stats.SIGMOID_SATURATION
    assert len(SUMS_COLUMNS) == jit_collector.COLUMNS
    codes = {"tanh": jit_collector.TANH, "sigmoid": jit_collector.SIGMOID, "rectifier": jit_collector.RECTIFIER}
    assert {kind: code for kind, code in hooks._KIND_CODES.items() if kind} == codes


def test_the_taps_write_rows_of_the_layouts_width(collector_type):
    # the layout is declared once (steadygrad/_layout.py); each backend reports its own width, and a row has it
    from steadygrad._layout import SUMS_WIDTH

    assert collector_type.columns() == SUMS_WIDTH == len(SUMS_COLUMNS)
    collector = make(collector_type, layer([torch.randn(3, 4)]))
    collector.output(torch.randn(5, 3), 0, NO_KIND)
    assert collector.statistics([0]).shape == (1, SUMS_WIDTH)


class _Wider:
    @staticmethod
    def columns():
        return len(SUMS_COLUMNS) + 1


class _BuiltBeforeColumns:  # a cached build from before Collector.columns() existed
    pass


@pytest.mark.parametrize("taps", [_Wider, _BuiltBeforeColumns], ids=["wider", "older"])
def test_the_recorder_refuses_taps_of_another_width(monkeypatch, taps):
    # a kernel built for another layout is refused before it is used, with what to do about it
    from torch import nn

    from steadygrad.measure import hooks

    monkeypatch.setattr(fast, "collector_type", lambda: taps)
    recorder = hooks.Recorder([("0", nn.Linear(2, 2))])
    with pytest.raises(RuntimeError, match="rebuild the kernels"):
        recorder.renew_collector()
