import pytest
import torch
from torch import nn

from steadygrad import norm
from steadygrad.nets import NetSpec, build

SPECS = {
    "mlp": NetSpec(depth=3, width=16, in_features=5),
    "mlp_bn_after_dense": NetSpec(depth=3, width=16, in_features=5, norm="batch", norm_position="after", skip="dense"),
    "mlp_ln_residual": NetSpec(depth=4, width=16, in_features=5, norm="layer", skip="residual", residual_scale=0.5),
    "mlp_gn_nobias": NetSpec(depth=2, width=16, in_features=5, norm="group", norm_groups=4, bias=False),
    "cnn_bn_residual": NetSpec(kind="cnn", depth=3, width=8, in_features=3, norm="batch", skip="residual"),
    "cnn_in_dense": NetSpec(kind="cnn", depth=2, width=8, in_features=3, norm="instance", skip="dense"),
    "rnn_tanh": NetSpec(kind="rnn", depth=2, width=12, in_features=4, activation="tanh", seq_len=7),
    "lstm_ln_dense": NetSpec(
        kind="rnn",
        cell="lstm",
        depth=2,
        width=12,
        in_features=4,
        activation="tanh",
        norm="layer",
        skip="dense",
    ),
    "gru_residual": NetSpec(
        kind="rnn", cell="gru", depth=3, width=12, in_features=4, activation="tanh", skip="residual"
    ),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_every_kind_builds_runs_and_backpropagates(name):
    spec = SPECS[name]
    net = build(spec, torch.Generator().manual_seed(0))
    x = torch.randn(4, *spec.input_shape, requires_grad=True)
    y = net(x)
    assert y.shape == (4, spec.out_features)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_blocks_are_named_in_depth_order():
    net = build(NetSpec(depth=12, width=8, in_features=3))
    names = [name for name, _ in net.named_children()]
    assert names == [f"block{i:02d}" for i in range(1, 13)] + ["head"]
    assert names == [*sorted(names[:-1]), "head"]


def test_norm_position_orders_the_parts():
    before = build(NetSpec(depth=1, width=8, in_features=3, norm="batch", norm_position="before"))
    after = build(NetSpec(depth=1, width=8, in_features=3, norm="batch", norm_position="after"))
    assert list(before.block01._modules) == ["linear", "norm", "act"]
    assert list(after.block01._modules) == ["linear", "act", "norm"]
    assert isinstance(before.block01.norm, norm.BatchNorm1d)  # steadygrad's own norms


def test_residual_adds_the_scaled_branch():
    spec = NetSpec(depth=2, width=6, in_features=6, skip="residual", residual_scale=0.25, activation="identity")
    net = build(spec, torch.Generator().manual_seed(0))
    x = torch.randn(3, 6)
    h = net.block01(x)
    expected = net.head(h + 0.25 * net.block02(h))
    torch.testing.assert_close(net(x), expected)


def test_dense_blocks_see_the_input_and_every_earlier_output():
    net = build(NetSpec(depth=3, width=4, in_features=5, skip="dense"))
    assert [b.linear.in_features for b in net.blocks] == [5, 9, 13]
    assert net.head.in_features == 17


def test_init_and_bias_are_applied(generator):
    net = build(NetSpec(depth=2, width=400, in_features=400, init="glorot_normal", bias=True), generator)
    w = net.block02.linear.weight.detach()
    assert float(w.var()) == pytest.approx(2 / 800, rel=0.05)
    assert torch.all(net.block02.linear.bias == 0)
    assert build(NetSpec(depth=2, width=8, in_features=3, bias=False)).block01.linear.bias is None


def test_build_is_reproducible_with_a_generator():
    a = build(NetSpec(depth=3, width=8, in_features=3), torch.Generator().manual_seed(5))
    b = build(NetSpec(depth=3, width=8, in_features=3), torch.Generator().manual_seed(5))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_spec_names_are_normalized_and_replace_validates():
    spec = NetSpec(activation="Leaky-ReLU", kind="MLP")
    assert spec.activation == "leaky_relu" and spec.kind == "mlp"
    with pytest.raises(ValueError, match=r"NetSpec\.depth must be a positive integer"):
        spec.replace(depth=0)
    assert "relu" in spec.label() and spec.to_dict()["depth"] == 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "vit"}, r"Unknown NetSpec.kind 'vit'. Accepted: mlp, cnn, rnn, transformer"),
        ({"activation": "swish"}, r"Unknown NetSpec.activation 'swish'. Accepted: sigmoid, tanh, relu"),
        ({"norm": "weight"}, r"Unknown NetSpec.norm 'weight'. Accepted: none, batch, layer, group, instance"),
        ({"skip": "highway"}, r"Unknown NetSpec.skip 'highway'. Accepted: none, residual, dense"),
        ({"norm_position": "middle"}, r"Unknown NetSpec.norm_position"),
        ({"init": "he"}, r"Unknown initialization scheme 'he'"),
        ({"width": 2.5}, r"NetSpec.width must be a positive integer"),
        (
            {"norm": "group", "width": 10, "norm_groups": 4},
            r"norm_groups \(4\) must divide NetSpec.width \(10\)",
        ),
        ({"norm": "instance"}, r"needs spatial positions"),
        (
            {"kind": "rnn", "activation": "sigmoid"},
            r"NetSpec.activation for the rnn cell must be one of tanh, relu",
        ),
        (
            {"kind": "rnn", "norm": "batch", "activation": "tanh"},
            r"norm for kind='rnn' must be none or layer",
        ),
        ({"residual_scale": float("nan")}, r"residual_scale must be a finite number"),
    ],
    ids=lambda v: str(v)[:30] if isinstance(v, dict) else None,
)
def test_invalid_specs_name_the_field_and_the_accepted_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NetSpec(**kwargs)


def test_build_rejects_other_objects():
    with pytest.raises(TypeError, match="build takes a NetSpec"):
        build({"depth": 3})


def test_folding_works_on_a_built_network():
    net = build(NetSpec(depth=3, width=8, in_features=4, norm="batch"))
    for _ in range(3):
        net(torch.randn(16, 4))
    net.eval()
    folded = norm.fold_batchnorm(net)
    assert not any(isinstance(m, norm.BatchNorm1d) for m in folded.modules())
    x = torch.randn(5, 4)
    torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)
    assert isinstance(folded.block01.norm, nn.Identity)
