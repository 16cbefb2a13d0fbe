"""Structure- and data-aware initializations: Fixup, LSUV, mean-field, layer-wise pre-training."""

import math

import pytest
import torch
from torch import nn

from steadygrad import data
from steadygrad.init import fixup_, lsuv_, mean_field_, pretrain_autoencoders
from steadygrad.nets import NetSpec, build


def residual(blocks=10, branch_layers=2, width=256):
    return build(
        NetSpec(depth=blocks + 1, width=width, in_features=width, skip="residual", branch_layers=branch_layers),
        torch.Generator().manual_seed(0),
    )


@pytest.mark.parametrize("m", [2, 3])
def test_fixup_zeroes_the_last_layers_and_scales_the_others(m):
    net = residual(blocks=16, branch_layers=m)
    fixup_(net, generator=torch.Generator().manual_seed(1))
    expected_std = math.sqrt(2 / 256) * 16 ** (-1 / (2 * m - 2))  # He std times L^(-1/(2m-2))
    for block in net.blocks[1:]:
        linears = [mod for mod in block.modules() if isinstance(mod, nn.Linear)]
        assert len(linears) == m
        assert torch.all(linears[-1].weight == 0) and torch.all(linears[-1].bias == 0)
        for layer in linears[:-1]:
            assert float(layer.weight.detach().std()) == pytest.approx(expected_std, rel=0.05)
    assert torch.all(net.head.weight == 0) and torch.all(net.head.bias == 0)


def test_fixup_network_starts_as_the_identity_on_its_stream():
    net = residual(blocks=8)
    fixup_(net)
    x = torch.randn(16, 256)
    stream = net.block01(x)
    for block in net.blocks[1:]:
        torch.testing.assert_close(block(stream), torch.zeros_like(stream))
    assert torch.all(net(x) == 0)


def test_fixup_needs_residual_branches():
    with pytest.raises(ValueError, match="fixup_ needs the residual branches"):
        fixup_(build(NetSpec(depth=3, width=8, in_features=4)))
    custom = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    fixup_(custom, branches=[custom], head=None)
    assert torch.all(custom[2].weight == 0)


def test_lsuv_gives_every_layer_unit_output_variance():
    net = build(NetSpec(depth=8, width=128, in_features=64, activation="tanh", init="small_normal"))
    x = torch.randn(256, 64)
    stds = lsuv_(net, x, tolerance=0.02, generator=torch.Generator().manual_seed(0))
    assert len(stds) == 9 and all(abs(s - 1) <= 0.02 for s in stds)
    outputs = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, out, k=name: outputs.__setitem__(k, out))
        for name, m in net.named_modules()
        if isinstance(m, nn.Linear)
    ]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    assert all(abs(float(out.std()) - 1) < 0.05 for out in outputs.values())


def test_lsuv_bad_input():
    with pytest.raises(ValueError, match="at least 2 examples"):
        lsuv_(build(NetSpec(depth=2, width=8, in_features=4)), torch.randn(1, 4))
    with pytest.raises(ValueError, match="no Linear or convolution"):
        lsuv_(nn.Sequential(nn.ReLU()), torch.randn(4, 4))


def test_mean_field_variances():
    net = build(NetSpec(depth=3, width=512, in_features=512, activation="tanh"))
    mean_field_(net, 1.76, 0.05, torch.Generator().manual_seed(0))
    layer = net.block02.linear
    assert float(layer.weight.detach().var()) == pytest.approx(1.76 / 512, rel=0.02)
    assert float(layer.bias.detach().var()) == pytest.approx(0.05, rel=0.25)  # 512 draws
    with pytest.raises(ValueError, match="are variances"):
        mean_field_(net, -1.0)


def test_pretraining_learns_to_reconstruct_each_layer():
    digits = data.digits()
    net = build(
        NetSpec(depth=3, width=64, in_features=64, activation="sigmoid", init="glorot_normal"),
        torch.Generator().manual_seed(0),
    )
    before = net.block01.linear.weight.detach().clone()
    errors = pretrain_autoencoders(net, digits.x_train[:512], epochs=3, generator=torch.Generator().manual_seed(0))
    assert len(errors) == 3
    assert all(0 <= e < 0.8 for e in errors)  # relative error: 1 would be no better than the mean
    assert not torch.equal(before, net.block01.linear.weight)
    with pytest.raises(ValueError, match="plain MLP"):
        pretrain_autoencoders(build(NetSpec(depth=2, width=8, skip="residual")), torch.randn(8, 64))


def test_branch_layers_builds_preactivation_branches_and_is_validated():
    net = residual(blocks=2, branch_layers=3, width=8)
    assert list(net.block02._modules) == ["act1", "linear1", "act2", "linear2", "act3", "linear3"]
    with pytest.raises(ValueError, match="branch_layers > 1 describes residual branches"):
        NetSpec(branch_layers=2)
