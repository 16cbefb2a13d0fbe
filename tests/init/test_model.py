import itertools
import math

import pytest
import torch
from torch import nn

from steadygrad.init import init_model, next_activation


def mlp(act=nn.ReLU, widths=(8, 16, 16, 3)):
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers += [nn.BatchNorm1d(b), act()]
    return nn.Sequential(*layers)


def test_auto_nonlinearity_follows_each_layer():
    net = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8), nn.LeakyReLU(0.2), nn.Linear(8, 2)
    )
    assert next_activation(net) == {"0": ("tanh", None), "3": ("leaky_relu", 0.2), "5": ("linear", None)}
    records = init_model(net, "he_normal")
    weights = [r for r in records if r.param == "weight"]
    assert [r.nonlinearity for r in weights] == ["tanh", "leaky_relu", "linear"]


def test_he_std_per_layer_matches_the_gain_of_its_activation(generator):
    net = nn.Sequential(nn.Linear(400, 500), nn.Tanh(), nn.Linear(500, 600), nn.ReLU(), nn.Linear(600, 300))
    init_model(net, "he_normal", generator=generator)
    expected = [5 / 3 / math.sqrt(400), math.sqrt(2 / 500), 1 / math.sqrt(600)]
    for layer, std in zip([net[0], net[2], net[4]], expected, strict=True):
        assert float(layer.weight.detach().std()) == pytest.approx(std, rel=0.02)
        assert torch.all(layer.bias == 0)


def test_explicit_nonlinearity_and_bias_choice(generator):
    net = mlp()
    init_model(net, "he_uniform", nonlinearity="linear", bias=None, generator=generator)
    assert float(net[0].weight.detach().var()) == pytest.approx(1 / 8, rel=0.25)
    assert not torch.all(net[0].bias == 0)  # left as torch initialized it


def test_norm_layers_are_left_alone():
    net = mlp()
    with torch.no_grad():
        net[1].weight.fill_(3.0)
    init_model(net, "glorot_uniform")
    assert torch.all(net[1].weight == 3.0)


def test_returns_a_record_per_parameter():
    records = init_model(mlp(), "lecun_normal")
    assert [(r.layer, r.param) for r in records] == [
        ("0", "weight"),
        ("0", "bias"),
        ("3", "weight"),
        ("3", "bias"),
        ("6", "weight"),
        ("6", "bias"),
    ]
    assert records[0].fan_in == 8 and records[0].fan_out == 16
    assert set(records[0].to_dict()) >= {"layer", "kind", "param", "shape", "fan_in", "fan_out", "std"}


def test_generator_makes_it_reproducible():
    a, b = mlp(), mlp()
    init_model(a, "he_normal", generator=torch.Generator().manual_seed(3))
    init_model(b, "he_normal", generator=torch.Generator().manual_seed(3))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_functional_activations_keep_the_scheme_default(generator):
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(1000, 1000)

        def forward(self, x):
            return torch.relu(self.fc(x))

    records = init_model(Functional(), "he_normal", generator=generator)
    assert records[0].nonlinearity is None
    assert records[0].std == pytest.approx(math.sqrt(2 / 1000), rel=0.02)  # he_normal's default: relu


@pytest.mark.parametrize(("cls", "gates"), [(nn.RNN, 1), (nn.GRU, 3), (nn.LSTM, 4)])
def test_recurrent_weights_are_initialized_gate_by_gate(cls, gates, generator):
    rnn = cls(input_size=300, hidden_size=200, num_layers=2, bidirectional=True)
    init_model(rnn, "glorot_normal", recurrent="orthogonal", generator=generator)
    # each gate of weight_ih is its own (200, 300) Glorot matrix
    for gate in rnn.weight_ih_l0.detach().chunk(gates):
        assert float(gate.var()) == pytest.approx(2 / 500, rel=0.05)
    # each gate of weight_hh is its own orthogonal (200, 200) matrix
    for gate in rnn.weight_hh_l1_reverse.detach().chunk(gates):
        torch.testing.assert_close(gate @ gate.T, torch.eye(200), atol=1e-5, rtol=0)
    assert torch.all(rnn.bias_ih_l1 == 0)


def _train(net, steps=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return x


def _hidden_units_identical(net, x):
    h = net[1](net[0](x))  # first hidden layer after ReLU
    return torch.allclose(h, h[:, :1].expand_as(h), atol=1e-6) and torch.allclose(
        net[2].weight, net[2].weight[:1].expand_as(net[2].weight), atol=1e-6
    )


def test_identical_init_is_never_differentiated_by_training():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    init_model(net, "identical", generator=torch.Generator().manual_seed(0))
    before = net[2].weight.detach().clone()
    x = _train(net)
    assert not torch.equal(before, net[2].weight)  # it did train
    assert _hidden_units_identical(net, x)


def test_random_init_is_differentiated():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    init_model(net, "he_uniform", generator=torch.Generator().manual_seed(0))
    x = _train(net)
    assert not _hidden_units_identical(net, x)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"Unknown initialization scheme 'he_unifrom'"):
        init_model(mlp(), "he_unifrom")
    with pytest.raises(ValueError, match=r"Unknown nonlinearity 'swish'. Accepted: auto, linear"):
        init_model(mlp(), "he_normal", nonlinearity="swish")
    with pytest.raises(TypeError, match=r"needs an nn\.Module"):
        init_model([torch.empty(3, 3)], "he_normal")
