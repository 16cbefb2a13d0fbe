"""The opt-in fused kernels, C++ and numba, give the reference's results (torch.nn in float64), and fall back where
they must."""

import pytest
import torch
import torch.nn.functional as TF

from steadygrad.norm import fast
from steadygrad.norm import functional as F

_UNAVAILABLE = {
    "cpp": "steadygrad's C++ norm kernels cannot be built here (no C++ compiler or ninja): not tested",
    "numba": "numba is not installed (the [numba] extra): its norm kernels are not tested",
}
# each backend's autograd node names: C++ torch::autograd::Functions and jit.py's Numba* Functions
_NODE_MARKS = {"cpp": "steadygrad::", "numba": "Numba"}


@pytest.fixture(autouse=True, params=["cpp", "numba"])
def fused(request):
    if not fast.available(request.param):
        pytest.skip(_UNAVAILABLE[request.param])
    assert fast.enable(request.param)
    assert fast.backend() == request.param
    yield request.param
    fast.disable()


def _ran_compiled(y: torch.Tensor) -> bool:
    """Whether y came out of the enabled backend's autograd functions (their node, under a reshape's)."""
    nodes = [y.grad_fn, *(fn for fn, _ in y.grad_fn.next_functions if fn is not None)]
    return any(_NODE_MARKS[fast.backend()] in node.name() for node in nodes)


def _compare(ours, reference, shape, param_shape, affine=True, offset=1.0, scale=3.0, tol=1e-5):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * scale + offset).requires_grad_(True)
    w = (torch.rand(param_shape, generator=g) + 0.5).requires_grad_(True) if affine else None
    b = torch.randn(param_shape, generator=g).requires_grad_(True) if affine else None
    dy = torch.randn(shape, generator=g)
    y = ours(x, w, b)
    assert _ran_compiled(y)  # the kernels themselves are compared, not the eager fallback
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], dy)
    x64 = x.detach().double().requires_grad_(True)
    w64 = None if w is None else w.detach().double().requires_grad_(True)
    b64 = None if b is None else b.detach().double().requires_grad_(True)
    y64 = reference(x64, w64, b64)
    grads64 = torch.autograd.grad(y64, [t for t in (x64, w64, b64) if t is not None], dy.double())
    for got, want in zip((y, *grads), (y64, *grads64), strict=True):
        # relative to the larger of the reference's scale and 1 (dy ~ N(0, 1)): a gradient that is zero in exact
        # arithmetic (batch norm over 2 examples) must be compared to rounding, not divided by it
        error = float((got.detach().double() - want.detach()).abs().max() / want.detach().abs().max().clamp(min=1.0))
        assert error < tol, error


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape", [(64, 1024), (1, 33), (3, 5, 7), (2, 4, 6, 8)], ids=str)
def test_layer_norm(shape, affine):
    d = shape[-1]
    _compare(
        lambda x, w, b: F.layer_norm(x, (d,), w, b), lambda x, w, b: TF.layer_norm(x, (d,), w, b), shape, (d,), affine
    )


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize(("shape", "groups"), [((4, 64, 8, 8), 8), ((1, 16, 5), 4), ((2, 6, 3, 2, 2), 3)], ids=str)
def test_group_norm(shape, groups, affine):
    c = shape[1]
    _compare(
        lambda x, w, b: F.group_norm(x, groups, w, b),
        lambda x, w, b: TF.group_norm(x, groups, w, b),
        shape,
        (c,),
        affine,
    )


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape", [(64, 32), (2, 7), (5, 3, 7), (8, 16, 16, 16), (3, 4, 2, 3, 4)], ids=str)
def test_batch_norm_training(shape, affine):
    c = shape[1]
    _compare(
        lambda x, w, b: F.batch_norm(x, None, None, w, b, True),
        lambda x, w, b: TF.batch_norm(x, None, None, w, b, True),
        shape,
        (c,),
        affine,
    )


def _norm_cases(bn1d, bn2d, ln, gn_groups_shape):
    """(ours, torch's, input shape, parameter shape) for batch norm on two layouts, layer norm over the last axis
    and group norm, with the given shapes: one list for every test that runs all four kernels."""
    bn = (
        lambda x, w, b: F.batch_norm(x, None, None, w, b, True),
        lambda x, w, b: TF.batch_norm(x, None, None, w, b, True),
    )
    d = ln[-1]
    groups, gn = gn_groups_shape
    return [
        pytest.param(*bn, bn1d, (bn1d[1],), id="bn1d"),
        pytest.param(*bn, bn2d, (bn2d[1],), id="bn2d"),
        pytest.param(
            lambda x, w, b: F.layer_norm(x, (d,), w, b), lambda x, w, b: TF.layer_norm(x, (d,), w, b), ln, (d,), id="ln"
        ),
        pytest.param(
            lambda x, w, b: F.group_norm(x, groups, w, b),
            lambda x, w, b: TF.group_norm(x, groups, w, b),
            gn,
            (gn[1],),
            id="gn",
        ),
    ]


@pytest.mark.parametrize(
    ("ours", "reference", "shape", "pshape"), _norm_cases((4096, 8), (8, 4, 32, 32), (16, 4096), (2, (4, 8, 32, 32)))
)
def test_large_offset_stays_accurate(ours, reference, shape, pshape):
    # mean 1e4, std 1e-2 in float32: the shift and the deviation are kept apart in the kernels
    _compare(ours, reference, shape, pshape, offset=1e4, scale=1e-2, tol=1e-4)


def test_running_statistics_match_torch():
    from torch import nn

    from steadygrad.norm import BatchNorm2d

    ours, theirs = BatchNorm2d(6), nn.BatchNorm2d(6)
    g = torch.Generator().manual_seed(5)
    for step in range(4):
        x = torch.randn(5, 6, 4, 4, generator=g, requires_grad=True) * (step + 1) + step
        version = ours.running_mean._version
        assert _ran_compiled(ours(x))
        assert ours.running_mean._version > version  # moved in place, and autograd is told, as by torch's ops
        theirs(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


@pytest.mark.parametrize("shape", [(64, 12), (7, 12, 3)], ids=str)  # the row sweeps: fewer than 16 values per row
def test_running_statistics_of_short_rows_match_torch(shape):
    from torch import nn

    from steadygrad.norm import BatchNorm1d

    ours, theirs = BatchNorm1d(12), nn.BatchNorm1d(12)
    g = torch.Generator().manual_seed(6)
    for step in range(3):
        x = torch.randn(shape, generator=g) * (step + 2) - step
        assert _ran_compiled(ours(x.requires_grad_(True)))
        theirs(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_other_cases_take_the_eager_path_with_the_same_results():
    x64 = torch.randn(4, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    assert not _ran_compiled(F.batch_norm(x64, None, None, training=True))
    torch.testing.assert_close(
        F.batch_norm(x64, None, None, training=True), TF.batch_norm(x64, None, None, training=True)
    )
    channels_last = torch.randn(4, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(F.group_norm(channels_last, 3), TF.group_norm(channels_last, 3), atol=1e-5, rtol=1e-5)


def test_double_backward_is_refused_clearly():
    x = torch.randn(8, 4, requires_grad=True)
    normalized = F.layer_norm(x, (4,))
    assert _ran_compiled(normalized)  # the kernels' backward refuses, not the eager one
    y = normalized.pow(3).sum()
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(y, x, create_graph=True)


def test_nothing_is_fused_unless_asked():
    fast.disable()
    assert not fast.enabled()


@pytest.mark.parametrize(
    ("ours", "reference", "shape", "pshape"),
    _norm_cases((1024, 1024), (16, 16, 64, 64), (1024, 1024), (4, (16, 16, 64, 64))),
)
def test_large_outputs(ours, reference, shape, pshape):
    # 4 MB tensors: many chunks per thread, float partial sums joining doubles many times
    _compare(ours, reference, shape, pshape)


def test_empty_batches_give_empty_results():
    x = torch.randn(0, 4, 5, requires_grad=True)
    for y in (F.layer_norm(x, (5,)), F.group_norm(x, 2)):
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape


def test_nonfinite_inputs_give_nan_not_garbage():
    # NaN keeps its IEEE meaning in both backends (numba's fastmath is limited to reassociation and contraction)
    x = torch.randn(6, 8, 4)
    x[2, 3, 1] = float("nan")
    ours, theirs = F.batch_norm(x, None, None, training=True), TF.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(ours.isnan(), theirs.isnan())
    torch.testing.assert_close(F.layer_norm(x, (4,)).isnan(), TF.layer_norm(x, (4,)).isnan())
