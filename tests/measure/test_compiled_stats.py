"""The compiled statistics of the Monitor's deferred mode against float64 references, directly."""

import math

import pytest
import torch

from steadygrad import fast

pytestmark = pytest.mark.skipif(not fast.available(), reason="steadygrad's compiled kernels cannot be built here")

ACTIVATION, UNITS, OUTPUT_GRAD, WEIGHT_GRAD, BIAS_GRAD, WEIGHT = range(6)
TANH, SIGMOID, RECTIFIER = 1, 2, 3


def table(entries, slots=1, snapshots=None):
    tensors, index, roles, kinds = (list(c) for c in zip(*entries, strict=True))
    copies = snapshots or [None] * len(tensors)
    return fast.kernels().layer_statistics(tensors, index, roles, kinds, slots, copies)[0].tolist()


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (1e4, 1e-2), (-3.0, 1e-3)], ids=str)
@pytest.mark.parametrize("shape", [(128, 256), (7, 33), (3, 5000), (1,)], ids=str)
def test_activation_moments_are_accurate_at_any_offset(mean, std, shape):
    y = (torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * std + mean).float()
    n, m, m2, lo, hi, squares, *_ = table([(y, 0, ACTIVATION, 0)])
    ref = y.double()
    assert n == y.numel()
    assert m == pytest.approx(ref.mean().item(), rel=1e-9, abs=1e-6 * std)
    if y.numel() > 1:
        assert math.sqrt(m2 / (n - 1)) == pytest.approx(ref.std().item(), rel=1e-4)  # float32 inputs: exact sums
    assert (lo, hi) == (ref.min().item(), ref.max().item())
    assert squares == pytest.approx(ref.square().sum().item(), rel=1e-5)  # float32 partial sums of 4096


def test_micro_batches_merge_and_units_count():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(16, 40, generator=g), torch.randn(8, 40, generator=g)
    a[:, :5] = -1.0  # five units dead in both micro-batches
    b[:, :5] = -2.0
    b[0, 6] = 1.0  # unit 6 alive in one only: alive
    a[:, 6] = -1.0
    row = table([(a, 0, ACTIVATION, RECTIFIER), (b, 0, ACTIVATION, RECTIFIER)])
    whole = torch.cat([a, b]).double()
    assert row[0] == 24 * 40 and row[1] == pytest.approx(whole.mean().item(), abs=1e-7)
    assert math.sqrt(row[2] / (row[0] - 1)) == pytest.approx(whole.std().item(), rel=1e-6)
    assert row[8] == 40 and row[9] == int(((whole > 0).sum(0) == 0).sum())


@pytest.mark.parametrize(("kind", "saturated"), [(TANH, lambda y: y.abs() > 0.99), (SIGMOID, None)])
def test_saturation_counts(kind, saturated):
    y = torch.rand(64, 50, generator=torch.Generator().manual_seed(2)) * 2 - 1
    if kind == SIGMOID:
        y = (y + 1) / 2
        expected = int(((y < 0.01) | (y > 0.99)).sum())
    else:
        y = y * 1.02
        expected = int(saturated(y).sum())
    row = table([(y, 0, UNITS, kind)])
    assert row[6] == expected and row[7] == y.numel()


def test_gradients_weights_and_the_snapshot():
    g = torch.Generator().manual_seed(3)
    grad, wgrad, bgrad, w = (torch.randn(s, generator=g) for s in ((32, 10), (10, 20), (10,), (10, 20)))
    snapshot = torch.zeros_like(w)
    row = table(
        [(grad, 1, OUTPUT_GRAD, 0), (wgrad, 1, WEIGHT_GRAD, 0), (bgrad, 1, BIAS_GRAD, 0), (w, 1, WEIGHT, 0)],
        slots=2,
        snapshots=[None, None, None, snapshot],
    )
    assert all(math.isnan(v) for v in row[10:13])  # slot 0 received nothing
    full = (
        fast.kernels()
        .layer_statistics(
            [grad, wgrad, bgrad, w],
            [1, 1, 1, 1],
            [OUTPUT_GRAD, WEIGHT_GRAD, BIAS_GRAD, WEIGHT],
            [0] * 4,
            2,
            [None, None, None, snapshot],
        )[1]
        .tolist()
    )
    assert full[10] == pytest.approx(grad.double().square().sum().item(), rel=1e-6)
    assert full[11] == pytest.approx(wgrad.double().square().sum().item(), rel=1e-6)
    assert full[12] == pytest.approx(bgrad.double().square().sum().item(), rel=1e-6)
    assert full[15] / (full[13] - 1) == pytest.approx(w.double().var().item(), rel=1e-6)
    assert torch.equal(snapshot, w)
    moved = w + 0.01
    change, size = fast.kernels().update_norms([moved], [w])[0].tolist()
    assert math.sqrt(change) == pytest.approx((moved - w).double().norm().item(), rel=1e-6)
    assert size == pytest.approx(w.double().square().sum().item(), rel=1e-6)


def test_nan_propagates_so_the_monitor_can_repair():
    y = torch.randn(4, 8)
    y[1, 2] = math.nan
    row = table([(y, 0, ACTIVATION, 0)])
    assert math.isnan(row[1]) and math.isnan(row[3]) and math.isnan(row[4])
