"""The compiled statistics of the Monitor's deferred mode against float64 references, directly."""

import math

import pytest
import torch

from steadygrad import fast
from steadygrad.measure.hooks import SUMS_COLUMNS

pytestmark = pytest.mark.skipif(not fast.available(), reason="steadygrad's compiled kernels cannot be built here")

ACTIVATION, UNITS, OUTPUT_GRAD, WEIGHT_GRAD, BIAS_GRAD, WEIGHT = range(6)
TANH, SIGMOID, RECTIFIER = 1, 2, 3


def sums(entries, slots=1, snapshots=None):
    """Each slot's sums as a dict by SUMS_COLUMNS name, from (tensor, slot, role, kind) entries."""
    tensors, index, roles, kinds = (list(c) for c in zip(*entries, strict=True))
    copies = snapshots or [None] * len(tensors)
    table = fast.kernels().layer_statistics(tensors, index, roles, kinds, slots, copies)
    return [dict(zip(SUMS_COLUMNS, row, strict=True)) for row in table.tolist()]


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (1e4, 1e-2), (-3.0, 1e-3)], ids=str)
@pytest.mark.parametrize("shape", [(128, 256), (7, 33), (3, 5000), (1,)], ids=str)
def test_activation_moments_are_accurate_at_any_offset(mean, std, shape):
    y = (torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * std + mean).float()
    (got,) = sums([(y, 0, ACTIVATION, 0)])
    ref = y.double()
    n = got["n"]
    assert n == y.numel()
    assert got["mean"] == pytest.approx(ref.mean().item(), rel=1e-9, abs=1e-6 * std)
    if y.numel() > 1:
        assert math.sqrt(got["m2"] / (n - 1)) == pytest.approx(ref.std().item(), rel=1e-4)
    assert (got["min"], got["max"]) == (ref.min().item(), ref.max().item())
    # float32 partial sums of 4096 values
    assert got["squares"] == pytest.approx(ref.square().sum().item(), rel=1e-5)


def test_micro_batches_merge_and_units_count():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(16, 40, generator=g), torch.randn(8, 40, generator=g)
    a[:, :5] = -1.0  # five units dead in both micro-batches
    b[:, :5] = -2.0
    b[0, 6] = 1.0  # unit 6 alive in one only: alive
    a[:, 6] = -1.0
    (got,) = sums([(a, 0, ACTIVATION, RECTIFIER), (b, 0, ACTIVATION, RECTIFIER)])
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
def test_saturation_counts(kind, values, is_saturated):
    y = values(torch.rand(64, 50, generator=torch.Generator().manual_seed(2)))
    (got,) = sums([(y, 0, UNITS, kind)])
    assert got["saturated"] == int(is_saturated(y).sum()) and got["counted"] == y.numel()


def test_gradients_weights_and_the_snapshot():
    g = torch.Generator().manual_seed(3)
    grad, wgrad, bgrad, w = (torch.randn(s, generator=g) for s in ((32, 10), (10, 20), (10,), (10, 20)))
    snapshot = torch.zeros_like(w)
    empty, got = sums(
        [(grad, 1, OUTPUT_GRAD, 0), (wgrad, 1, WEIGHT_GRAD, 0), (bgrad, 1, BIAS_GRAD, 0), (w, 1, WEIGHT, 0)],
        slots=2,
        snapshots=[None, None, None, snapshot],
    )
    assert all(math.isnan(empty[k]) for k in ("grad_squares", "weight_grad_squares", "bias_grad_squares"))
    assert got["grad_squares"] == pytest.approx(grad.double().square().sum().item(), rel=1e-6)
    assert got["weight_grad_squares"] == pytest.approx(wgrad.double().square().sum().item(), rel=1e-6)
    assert got["bias_grad_squares"] == pytest.approx(bgrad.double().square().sum().item(), rel=1e-6)
    assert got["weight_m2"] / (got["weight_n"] - 1) == pytest.approx(w.double().var().item(), rel=1e-6)
    assert torch.equal(snapshot, w)
    moved = w + 0.01
    change, size = fast.kernels().update_norms([moved], [w])[0].tolist()
    assert math.sqrt(change) == pytest.approx((moved - w).double().norm().item(), rel=1e-6)
    assert size == pytest.approx(w.double().square().sum().item(), rel=1e-6)


def test_nan_propagates_so_the_monitor_can_repair():
    y = torch.randn(4, 8)
    y[1, 2] = math.nan
    (got,) = sums([(y, 0, ACTIVATION, 0)])
    assert math.isnan(got["mean"]) and math.isnan(got["min"]) and math.isnan(got["max"])


@pytest.mark.parametrize("other", [torch.float64, torch.bfloat16], ids=str)
def test_a_tensor_that_is_not_float32_gives_no_rows(other):
    """The signal for the Monitor's eager fallback: an empty table, not an error and not wrong sums."""
    tensors = [torch.randn(4, 3), torch.randn(4, 3).to(other)]
    table = fast.kernels().layer_statistics(tensors, [0, 1], [ACTIVATION, OUTPUT_GRAD], [0, 0], 2, [None, None])
    assert table.shape == (0, len(SUMS_COLUMNS))


@pytest.mark.parametrize(("mean", "std"), [(0.0, 0.05), (1e3, 1e-2)], ids=str)
def test_weight_moments_and_snapshot_over_several_chunks(mean, std):
    # 15,000 values: four 4,096-value chunks and a ragged end, far from zero in the second case
    w = (torch.randn(300, 50, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * std + mean).float()
    snapshot = torch.empty_like(w)
    (got,) = sums([(w, 0, WEIGHT, 0)], snapshots=[snapshot])
    assert got["weight_n"] == w.numel()
    assert got["weight_m2"] / (got["weight_n"] - 1) == pytest.approx(w.double().var().item(), rel=1e-4)
    assert torch.equal(snapshot, w)
