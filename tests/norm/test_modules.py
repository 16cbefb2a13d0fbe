"""steadygrad's norms against torch.nn's: outputs, gradients and running statistics."""

import pytest
import torch
from torch import nn

from steadygrad import norm

# (ours, theirs, constructor args, input shape)
CASES = {
    "bn1d_2d": (norm.BatchNorm1d, nn.BatchNorm1d, (6,), (2, 6)),
    "bn1d_3d": (norm.BatchNorm1d, nn.BatchNorm1d, (6,), (4, 6, 5)),
    "bn2d": (norm.BatchNorm2d, nn.BatchNorm2d, (6,), (2, 6, 5, 4)),
    "bn3d": (norm.BatchNorm3d, nn.BatchNorm3d, (6,), (3, 6, 2, 3, 4)),
    "in1d": (norm.InstanceNorm1d, nn.InstanceNorm1d, (6,), (1, 6, 7)),
    "in2d": (norm.InstanceNorm2d, nn.InstanceNorm2d, (6,), (3, 6, 5, 4)),
    "in3d": (norm.InstanceNorm3d, nn.InstanceNorm3d, (6,), (1, 6, 2, 3, 4)),
    "ln_last": (norm.LayerNorm, nn.LayerNorm, (9,), (1, 9)),
    "ln_two": (norm.LayerNorm, nn.LayerNorm, ((5, 9),), (3, 4, 5, 9)),
    "gn1d": (norm.GroupNorm, nn.GroupNorm, (3, 6), (1, 6, 7)),
    "gn2d": (norm.GroupNorm, nn.GroupNorm, (2, 6), (2, 6, 5, 4)),
    "gn3d": (norm.GroupNorm, nn.GroupNorm, (6, 6), (1, 6, 2, 3, 4)),
}
TOL = {torch.float32: {"rtol": 2e-5, "atol": 2e-5}, torch.float64: {"rtol": 1e-10, "atol": 1e-10}}


def _affine_kwargs(theirs, affine):
    if theirs is nn.LayerNorm:
        return {"elementwise_affine": affine}
    return {"affine": affine}


def _pair(case, affine=True, dtype=torch.float32, **kwargs):
    ours_cls, theirs_cls, args, shape = CASES[case]
    kw = {**_affine_kwargs(theirs_cls, affine), **kwargs}
    theirs = theirs_cls(*args, **kw, dtype=dtype)
    ours = ours_cls(*args, **kw, dtype=dtype)
    if affine:  # non-trivial affine parameters, the same in both
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs, shape


def _inputs(shape, dtype, layout):
    x = torch.randn(shape, dtype=dtype) * 3 + 1
    if layout == "channels_last" and len(shape) in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    elif layout == "non_contiguous":
        x = (torch.randn(*shape[:-1], shape[-1] * 2, dtype=dtype) * 3 + 1)[..., ::2]
        assert not x.is_contiguous()
    return x


def _forward_backward(module, x, grad_out):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(grad_out)
    params = [p.grad for p in module.parameters()]
    return y, x.grad, params


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "non_contiguous"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_equal_torch(case, dtype, affine, mode, layout):
    torch.manual_seed(0)
    ours, theirs, shape = _pair(case, affine, dtype)
    if mode == "eval":
        for _ in range(3):  # non-trivial running statistics, each module computing its own
            batch = _inputs(shape, dtype, "contiguous") * 2 - 1
            ours(batch), theirs(batch)
        ours.eval(), theirs.eval()
    x = _inputs(shape, dtype, layout)
    grad_out = torch.randn(shape, dtype=dtype)
    y_ours, gx_ours, gp_ours = _forward_backward(ours, x, grad_out)
    y_theirs, gx_theirs, gp_theirs = _forward_backward(theirs, x, grad_out)
    torch.testing.assert_close(y_ours, y_theirs, **TOL[dtype])
    torch.testing.assert_close(gx_ours, gx_theirs, **TOL[dtype])
    for a, b in zip(gp_ours, gp_theirs, strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype])
    for name, buffer in theirs.named_buffers():
        torch.testing.assert_close(dict(ours.named_buffers())[name], buffer, **TOL[dtype])


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum_0.1", "cumulative"])
@pytest.mark.parametrize("case", ["bn1d_2d", "bn1d_3d", "bn2d", "bn3d"])
def test_running_statistics_after_several_steps(case, momentum):
    torch.manual_seed(1)
    ours, theirs, shape = _pair(case, momentum=momentum)
    for step in range(6):
        x = torch.randn(shape) * (step + 1) + step
        ours(x), theirs(x)
    # float32 averages of values up to ~40, summed in another order than torch's: a few ulps apart (rtol 1e-5);
    # a biased variance or a wrong momentum would be off by percents
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-5, atol=1e-6)
    assert int(ours.num_batches_tracked) == 6


@pytest.mark.parametrize("case", ["in1d", "in2d"])
def test_instance_norm_running_statistics(case):
    torch.manual_seed(2)
    ours, theirs, shape = _pair(case, track_running_stats=True)
    for _ in range(4):
        x = torch.randn(shape) * 2 + 0.5
        ours(x), theirs(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval(), theirs.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), theirs(x))


def test_batchnorm_without_running_stats_uses_batch_statistics_in_eval():
    ours, theirs, shape = _pair("bn2d", track_running_stats=False)
    ours.eval(), theirs.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), theirs(x))
    assert ours.running_mean is None and "running_mean" not in ours.state_dict()


def test_unbatched_instance_norm():
    ours, theirs, _ = _pair("in2d")
    x = torch.randn(6, 5, 4)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_keys_and_defaults_match_torch(case):
    ours_cls, theirs_cls, args, _ = CASES[case]
    ours, theirs = ours_cls(*args), theirs_cls(*args)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    assert repr(ours) == repr(theirs)


def test_layer_norm_without_bias_matches_torch():
    ours, theirs = norm.LayerNorm(8, bias=False), nn.LayerNorm(8, bias=False)
    assert list(ours.state_dict()) == ["weight"] == list(theirs.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(ours(x), theirs(x))


def test_old_state_dict_without_num_batches_tracked_loads():
    state = nn.BatchNorm1d(4).state_dict()
    del state["num_batches_tracked"]
    state._metadata = {"": {"version": 1}}
    bn = norm.BatchNorm1d(4)
    bn.load_state_dict(state)
    assert int(bn.num_batches_tracked) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", ["bn2d", "ln_two", "gn2d", "in2d"])
def test_low_precision_is_computed_in_float32_and_returned_in_its_dtype(case, dtype):
    torch.manual_seed(3)
    ours, reference, shape = _pair(case, dtype=torch.float32)
    low = ours.to(dtype)
    x = torch.randn(shape) * 4 + 2
    x_low = x.to(dtype).requires_grad_(True)
    y = low(x_low)
    y.float().square().sum().backward()
    assert y.dtype == dtype and x_low.grad.dtype == dtype and low.weight.grad.dtype == dtype
    # the float32 computation on the same (rounded) input and parameters, rounded once at the end
    ref = reference.to(torch.float32)
    ref.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in low.state_dict().items()})
    expected = ref(x_low.detach().float())
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.float(), expected, rtol=2 * eps, atol=4 * eps)


@pytest.mark.parametrize(
    ("module", "x", "message"),
    [
        (
            norm.BatchNorm2d(4),
            torch.randn(2, 4, 5),
            r"BatchNorm2d expects a 4-D input \(N, C, H, W\); got a 3-D.*"
            r"use BatchNorm1d",
        ),
        (norm.BatchNorm1d(4), torch.randn(2, 4, 5, 5), r"BatchNorm1d expects a 2-D or 3-D input"),
        (norm.InstanceNorm2d(4), torch.randn(4, 5), r"InstanceNorm2d expects a 3-D or 4-D input"),
        (
            norm.GroupNorm(2, 4),
            torch.randn(2, 6, 3),
            r"GroupNorm\(2, 4\) expects an \(N, 4, \*\) input; got shape",
        ),
        (norm.LayerNorm(8), torch.randn(2, 7), r"trailing dimensions \(8,\)"),
        (norm.BatchNorm1d(4), torch.randn(2, 5), r"4-channel parameters but the input has 5 channels"),
    ],
    ids=["bn2d_3d", "bn1d_4d", "in2d_2d", "gn_channels", "ln_shape", "bn_channels"],
)
def test_module_input_errors_say_what_arrived_and_what_is_expected(module, x, message):
    with pytest.raises(ValueError, match=message):
        module(x)


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"groups \(3\) must divide the number of channels \(8\); choose one of 1, 2"):
        norm.GroupNorm(3, 8)
    with pytest.raises(ValueError, match="num_features must be a positive integer"):
        norm.BatchNorm1d(0)
