"""RMSNorm: against torch.nn.RMSNorm and F.rms_norm, float64 gradcheck of the hand-derived backward, the closed
form of that backward, conversion both ways, and its place among the norms."""

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

from steadygrad import kinds, norm
from steadygrad.norm import functional as F

TOL = {torch.float32: {"rtol": 2e-5, "atol": 2e-5}, torch.float64: {"rtol": 1e-10, "atol": 1e-10}}


def _pair(shape, dtype, **kwargs):
    theirs = nn.RMSNorm(shape, dtype=dtype, **kwargs)
    ours = norm.RMSNorm(shape, dtype=dtype, **kwargs)
    if theirs.weight is not None:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("layout", ["contiguous", "non_contiguous"])
@pytest.mark.parametrize("eps", [None, 1e-3])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(9,), (5, 9)], ids=["last", "two"])
def test_outputs_and_gradients_equal_torch(shape, dtype, affine, eps, layout):
    torch.manual_seed(0)
    ours, theirs = _pair(shape, dtype, eps=eps, elementwise_affine=affine)
    x = torch.randn(3, 4, *shape, dtype=dtype) * 3 + 1
    if layout == "non_contiguous":
        x = (torch.randn(3, 4, *shape[:-1], shape[-1] * 2, dtype=dtype) * 3 + 1)[..., ::2]
        assert not x.is_contiguous()
    grad_out = torch.randn(x.shape, dtype=dtype)
    results = []
    for module in (ours, theirs):
        leaf = x.detach().clone().requires_grad_(True)
        y = module(leaf)
        y.backward(grad_out)
        results.append((y, leaf.grad, [p.grad for p in module.parameters()]))
    (y_a, gx_a, gp_a), (y_b, gx_b, gp_b) = results
    torch.testing.assert_close(y_a, y_b, **TOL[dtype])
    torch.testing.assert_close(gx_a, gx_b, **TOL[dtype])
    assert len(gp_a) == len(gp_b) == (1 if affine else 0)
    for a, b in zip(gp_a, gp_b, strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_gradcheck_float64(affine):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 4, generator=g, dtype=torch.float64) * 2 + 0.5).requires_grad_(True)
    if affine:
        w = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x, w: F.rms_norm(x, (3, 4), w, 1e-6), (x, w))
    else:
        assert torch.autograd.gradcheck(lambda x: F.rms_norm(x, (3, 4), None, 1e-6), (x,))


def test_backward_is_the_closed_form():
    # dL/dx = inv_rms * (g - x_hat * mean(g * x_hat)), g = dy * gamma: written out row by row
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 8, generator=g, dtype=torch.float64)
    dy = torch.randn(6, 8, generator=g, dtype=torch.float64)
    gamma = torch.rand(8, generator=g, dtype=torch.float64) + 0.5
    leaf = x.clone().requires_grad_(True)
    F.rms_norm(leaf, (8,), gamma, 1e-6).backward(dy)
    for row in range(6):
        inv_rms = 1 / torch.sqrt((x[row] ** 2).mean() + 1e-6)
        x_hat, grad = x[row] * inv_rms, dy[row] * gamma
        expected = inv_rms * (grad - x_hat * (grad * x_hat).mean())
        torch.testing.assert_close(leaf.grad[row], expected, rtol=1e-12, atol=1e-12)


def test_default_eps_is_the_dtypes_machine_epsilon_as_torchs():
    x = torch.full((2, 4), 1e-4)  # mean square 1e-8, comparable to float32's eps (1.2e-7): eps matters
    torch.testing.assert_close(F.rms_norm(x, (4,)), TF.rms_norm(x, (4,)))
    assert not torch.allclose(F.rms_norm(x, (4,)), F.rms_norm(x, (4,), eps=1e-12))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_computed_in_float32_and_returned_in_its_dtype(dtype):
    x = torch.randn(4, 16).to(dtype)
    y = norm.RMSNorm(16, eps=1e-6, dtype=dtype)(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), TF.rms_norm(x.float(), (16,), eps=1e-6), rtol=1e-2, atol=1e-2)


def test_state_dict_repr_and_conversion_both_ways():
    model = nn.Sequential(nn.Linear(4, 8), nn.RMSNorm(8, eps=1e-5))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 4)
    ours = norm.convert_norms(model)
    assert type(ours[1]) is norm.RMSNorm and ours[1].eps == 1e-5
    assert ours.state_dict().keys() == model.state_dict().keys()
    torch.testing.assert_close(ours(x), model(x))
    back = norm.convert_norms(ours, to="torch")
    assert type(back[1]) is nn.RMSNorm
    torch.testing.assert_close(back(x), model(x))
    assert repr(norm.RMSNorm(8)) == "RMSNorm((8,), eps=None, elementwise_affine=True)"


def test_it_is_a_norm_of_the_rms_family():
    assert kinds.norm_family(norm.RMSNorm(8)) == "rms"


def test_a_wrong_trailing_shape_says_what_to_set():
    with pytest.raises(ValueError, match=r"rms_norm normalizes over the trailing dimensions \(8,\).*RMSNorm\(x.shape"):
        norm.RMSNorm(8)(torch.randn(2, 6))
