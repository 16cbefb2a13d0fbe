import math

import pytest
import torch
from scipy import integrate, stats

from steadygrad.init import NONLINEARITIES, calculate_gain, fans

TORCH_GAINS = [
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "sigmoid",
    "tanh",
    "relu",
    "leaky_relu",
    "selu",
]


@pytest.mark.parametrize("name", TORCH_GAINS)
def test_gain_equals_torch(name):
    assert calculate_gain(name) == pytest.approx(torch.nn.init.calculate_gain(name), rel=1e-12)


@pytest.mark.parametrize("slope", [0.0, 0.01, 0.2, 1.0])
def test_leaky_relu_gain_equals_torch(slope):
    expected = torch.nn.init.calculate_gain("leaky_relu", slope)
    assert calculate_gain("leaky_relu", slope) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("name", "phi"),
    [("gelu", lambda z: z * stats.norm.cdf(z)), ("silu", lambda z: z / (1 + math.exp(-z)))],
)
def test_second_moment_gains_against_scipy_quadrature(name, phi):
    # independent reference: adaptive quadrature of E[phi(z)^2] for z ~ N(0, 1)
    second_moment, _ = integrate.quad(lambda z: phi(z) ** 2 * stats.norm.pdf(z), -40, 40, epsabs=1e-13)
    assert calculate_gain(name) == pytest.approx(1 / math.sqrt(second_moment), rel=1e-8)


def test_relu_gain_is_the_second_moment_gain():
    # the rule used for GELU/SiLU reproduces He's sqrt(2) for ReLU: E[relu(z)^2] = 1/2
    second_moment, _ = integrate.quad(lambda z: max(z, 0) ** 2 * stats.norm.pdf(z), -40, 40)
    assert 1 / math.sqrt(second_moment) == pytest.approx(calculate_gain("relu"), rel=1e-9)


def test_every_nonlinearity_has_a_finite_positive_gain():
    for name in NONLINEARITIES:
        assert math.isfinite(calculate_gain(name)) and calculate_gain(name) > 0


def test_names_are_case_and_dash_insensitive():
    assert calculate_gain("Leaky-ReLU", 0.2) == calculate_gain("leaky_relu", 0.2)


def test_unknown_nonlinearity_lists_accepted_names():
    with pytest.raises(ValueError, match=r"Unknown nonlinearity 'swish'.*Accepted: .*relu.*gelu"):
        calculate_gain("swish")


def test_bad_leaky_slope():
    with pytest.raises(ValueError, match="negative slope"):
        calculate_gain("leaky_relu", "a lot")


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (torch.nn.Linear(10, 32), (10, 32)),
        (torch.nn.Conv1d(3, 8, 5), (15, 40)),
        (torch.nn.Conv2d(3, 16, (3, 5)), (45, 240)),
        (torch.nn.Conv3d(2, 4, 3), (54, 108)),
        (torch.nn.Conv2d(8, 16, 3, groups=4), (18, 144)),  # fan_in counts the inputs of one group
    ],
    ids=["linear", "conv1d", "conv2d", "conv3d", "grouped"],
)
def test_fans_of_layers(module, expected):
    assert tuple(fans(module.weight)) == expected
    # the same numbers torch derives its own init from
    assert tuple(fans(module.weight)) == torch.nn.init._calculate_fan_in_and_fan_out(module.weight)


@pytest.mark.parametrize(("rnn", "gates"), [(torch.nn.RNN, 1), (torch.nn.GRU, 3), (torch.nn.LSTM, 4)])
def test_recurrent_fans_are_per_gate(rnn, gates):
    module = rnn(input_size=7, hidden_size=20)
    assert module.weight_ih_l0.shape == (gates * 20, 7)
    assert fans(module.weight_ih_l0, gates=gates) == (7, 20)
    assert fans(module.weight_hh_l0, gates=gates) == (20, 20)


def test_fans_reject_vectors_with_advice():
    with pytest.raises(ValueError, match=r"at least 2 dimensions.*got shape \(5,\).*constant_"):
        fans(torch.empty(5))


def test_fans_reject_gates_that_do_not_divide():
    with pytest.raises(ValueError, match="gates must be a positive integer dividing"):
        fans(torch.empty(10, 3), gates=4)
