import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from steadygrad.clip import (
    adaptive_clip_grad_,
    clip_grad_norm_,
    clip_grad_norm_per_layer_,
    clip_grad_value_,
    clip_grads_,
    grad_norm,
)


def make_params(seed, scale=1.0, with_none=True):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,), (6, 6)]
    params = []
    for i, shape in enumerate(shapes):
        p = nn.Parameter(torch.randn(shape, generator=g))
        if not (with_none and i == 3):  # one parameter without a gradient
            p.grad = torch.randn(shape, generator=g) * scale
        params.append(p)
    return params


def clone(params):
    out = []
    for p in params:
        q = nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def assert_same_grads(a, b):
    for pa, pb in zip(a, b, strict=True):
        if pa.grad is None:
            assert pb.grad is None
        else:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf], ids=["p1", "p2", "pinf"])
@pytest.mark.parametrize("max_norm", [0.1, 1.0, 1e3], ids=["clips", "clips_less", "no_clip"])
@pytest.mark.parametrize("seed", range(5))
def test_clip_grad_norm_equals_torch(norm_type, max_norm, seed):
    ours, theirs = make_params(seed, scale=3.0), None
    theirs = clone(ours)
    total = clip_grad_norm_(ours, max_norm, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    torch.testing.assert_close(total, expected)
    assert_same_grads(ours, theirs)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), clip_value=st.floats(1e-3, 10.0), scale=st.floats(1e-3, 100.0))
def test_clip_grad_value_equals_torch(seed, clip_value, scale):
    ours = make_params(seed, scale=scale)
    theirs = clone(ours)
    clip_grad_value_(ours, clip_value)
    torch.nn.utils.clip_grad_value_(theirs, clip_value)
    assert_same_grads(ours, theirs)


def test_single_tensor_and_empty_inputs():
    p = nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 10.0)
    total = clip_grad_norm_(p, 1.0)
    assert float(total) == pytest.approx(20.0)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    assert float(clip_grad_norm_([], 1.0)) == 0.0
    clip_grad_value_([], 1.0)  # no error
    no_grad = nn.Parameter(torch.ones(3))
    assert float(clip_grad_norm_([no_grad], 1.0)) == 0.0


def test_total_norm_stays_on_device_as_a_tensor():
    params = make_params(0)
    total = clip_grad_norm_(params, 1.0)
    assert isinstance(total, torch.Tensor) and total.dim() == 0


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_error_if_nonfinite(bad):
    params = make_params(0)
    params[0].grad[0, 0] = bad
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    total = clip_grad_norm_(make_params(0), 1.0)  # without the flag, no error
    assert torch.isfinite(total)


def test_per_layer_clipping_of_a_module():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    net(torch.randn(16, 4)).pow(2).sum().mul(100).backward()
    expected = []
    for layer in (net[0], net[2]):
        grads = [layer.weight.grad.clone(), layer.bias.grad.clone()]
        norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
        expected.append((norm, [g * min(1.0, 0.5 / (float(norm) + 1e-6)) for g in grads]))
    norms = clip_grad_norm_per_layer_(net, 0.5)
    torch.testing.assert_close(norms, torch.stack([e[0] for e in expected]))
    for layer, (_, grads) in zip((net[0], net[2]), expected, strict=True):
        torch.testing.assert_close(layer.weight.grad, grads[0])
        torch.testing.assert_close(layer.bias.grad, grads[1])
        assert float(torch.linalg.vector_norm(torch.cat([layer.weight.grad.flatten(), layer.bias.grad]))) <= 0.5 + 1e-5


def test_per_layer_clipping_of_tensors_equals_torch_on_each():
    ours = make_params(3, scale=5.0)
    theirs = clone(ours)
    clip_grad_norm_per_layer_(ours, 1.0, norm_type=1.0)
    for p in theirs:
        torch.nn.utils.clip_grad_norm_([p], 1.0, norm_type=1.0)
    assert_same_grads(ours, theirs)


def agc_reference(weight, grad, clipping, eps):
    """AGC written out unit by unit from Brock et al. 2021, eq. 3."""
    grad = grad.clone()
    units = [slice(None)] if weight.dim() <= 1 else range(weight.shape[0])
    for i in units:
        w_norm = max(float(weight[i].norm()), eps)
        g_norm = float(grad[i].norm())
        if g_norm / w_norm > clipping:
            grad[i] = grad[i] * (clipping * w_norm / g_norm)
    return grad


@pytest.mark.parametrize("clipping", [0.01, 0.1, 1.0])
def test_agc_against_its_formula(clipping):
    params = make_params(7, scale=0.5)
    with torch.no_grad():
        params[0][2].zero_()  # a unit with zero weights: eps takes over
    expected = [None if p.grad is None else agc_reference(p.detach(), p.grad, clipping, 1e-3) for p in params]
    fraction = adaptive_clip_grad_(params, clipping=clipping, eps=1e-3)
    for p, e in zip(params, expected, strict=True):
        if e is not None:
            torch.testing.assert_close(p.grad, e)
    assert 0.0 <= float(fraction) <= 1.0
    if clipping == 0.01:
        assert float(fraction) == 1.0  # every unit's gradient is far above 1% of its weight


def test_dispatcher_matches_each_function():
    for mode, fn, kwargs in [
        ("norm", clip_grad_norm_, {}),
        ("value", clip_grad_value_, {}),
        ("agc", adaptive_clip_grad_, {}),
        ("layer_norm", clip_grad_norm_per_layer_, {}),
    ]:
        a, b = make_params(1, scale=4.0), None
        b = clone(a)
        clip_grads_(a, mode=mode, threshold=0.5, **kwargs)
        fn(b, 0.5)
        assert_same_grads(a, b)


@pytest.mark.parametrize("mode", ["norm", "value", "agc", "layer_norm"])
def test_dispatcher_returns_the_pre_clip_total_norm_in_every_mode(mode):
    params = make_params(2, scale=4.0)
    expected = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    total = clip_grads_(params, mode=mode, threshold=0.01)
    assert isinstance(total, torch.Tensor) and total.dim() == 0
    torch.testing.assert_close(total, expected)
    assert float(grad_norm(params)) < float(expected)  # the gradients were clipped after the norm was taken
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model(torch.randn(5, 3)).square().sum().backward()
    expected = grad_norm(model.parameters())
    torch.testing.assert_close(clip_grads_(model, mode=mode, threshold=0.01), expected)  # a module, a generator
    torch.testing.assert_close(clip_grads_(model.parameters(), mode=mode, threshold=1e9), grad_norm(model.parameters()))


@pytest.mark.parametrize("norm_type", [1.0, math.inf], ids=["p1", "pinf"])
def test_dispatcher_total_norm_follows_norm_type(norm_type):
    for mode in ("norm", "layer_norm"):
        params = make_params(3, scale=2.0)
        expected = grad_norm(params, norm_type)
        torch.testing.assert_close(clip_grads_(params, mode=mode, threshold=0.1, norm_type=norm_type), expected)


@pytest.mark.parametrize("mode", ["norm", "value", "agc", "layer_norm"])
def test_dispatcher_reports_a_nonfinite_gradient(mode):
    params = make_params(4)
    params[0].grad[0, 0] = math.inf
    assert not torch.isfinite(clip_grads_(params, mode=mode, threshold=0.5))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: clip_grad_norm_(p, 0.0), r"max_norm must be a finite number > 0; got 0.0"),
        (lambda p: clip_grad_norm_(p, -1.0), r"max_norm must be a finite number > 0"),
        (lambda p: clip_grad_norm_(p, 1.0, norm_type=-2), r"norm_type must be > 0 or inf"),
        (lambda p: clip_grad_value_(p, -1.0), r"clip_value must be a finite number > 0"),
        (lambda p: adaptive_clip_grad_(p, clipping=0), r"clipping must be a finite number > 0"),
        (
            lambda p: clip_grads_(p, mode="median"),
            r"Unknown clipping mode 'median'. Accepted: norm, value, agc",
        ),
    ],
    ids=["zero_max_norm", "negative_max_norm", "bad_p", "negative_value", "zero_agc", "bad_mode"],
)
def test_bad_input_messages(call, message):
    with pytest.raises(ValueError, match=message):
        call(make_params(0))


def test_grad_norm_measures_without_clipping():
    params = make_params(2, scale=3.0)
    before = [None if p.grad is None else p.grad.clone() for p in params]
    norm = grad_norm(params)
    expected = torch.nn.utils.clip_grad_norm_(clone(params), 1e9)
    torch.testing.assert_close(norm, expected)
    for p, b in zip(params, before, strict=True):
        assert (p.grad is None and b is None) or torch.equal(p.grad, b)
    assert float(grad_norm([nn.Parameter(torch.ones(2))])) == 0.0
