import math
from functools import partial

import pytest
import torch
from scipy import stats

from steadygrad import init
from steadygrad.init import (
    constant_,
    glorot_normal_,
    glorot_uniform_,
    he_normal_,
    he_uniform_,
    identical_,
    lecun_normal_,
    lecun_uniform_,
    orthogonal_,
    scaled_normal_,
)

SHAPE = (512, 256)  # fan_out, fan_in: 131072 draws
FAN_OUT, FAN_IN = SHAPE
KURTOSIS = {"uniform": 1.8, "normal": 3.0}

# scheme, closed-form variance, family (for the KS test)
CASES = [
    (he_uniform_, 2 / FAN_IN, "uniform"),
    (he_normal_, 2 / FAN_IN, "normal"),
    (partial(he_uniform_, mode="fan_out"), 2 / FAN_OUT, "uniform"),
    (partial(he_normal_, nonlinearity="tanh"), (5 / 3) ** 2 / FAN_IN, "normal"),
    (partial(he_uniform_, nonlinearity="leaky_relu", param=0.2), 2 / (1 + 0.04) / FAN_IN, "uniform"),
    (glorot_uniform_, 2 / (FAN_IN + FAN_OUT), "uniform"),
    (glorot_normal_, 2 / (FAN_IN + FAN_OUT), "normal"),
    (partial(glorot_uniform_, gain=2.0), 8 / (FAN_IN + FAN_OUT), "uniform"),
    (lecun_uniform_, 1 / FAN_IN, "uniform"),
    (lecun_normal_, 1 / FAN_IN, "normal"),
    (partial(scaled_normal_, std=0.3), 0.09, "normal"),
]
IDS = [
    "he_uniform",
    "he_normal",
    "he_uniform_fan_out",
    "he_normal_tanh",
    "he_uniform_leaky",
    "glorot_uniform",
    "glorot_normal",
    "glorot_uniform_gain2",
    "lecun_uniform",
    "lecun_normal",
    "scaled_normal",
]


def _distribution(family, variance):
    if family == "uniform":
        bound = math.sqrt(3 * variance)
        return stats.uniform(loc=-bound, scale=2 * bound)
    return stats.norm(loc=0, scale=math.sqrt(variance))


@pytest.mark.parametrize(("fn", "variance", "family"), CASES, ids=IDS)
def test_variance_matches_closed_form_within_sampling_error(fn, variance, family, generator):
    w = fn(torch.empty(SHAPE, dtype=torch.float64), generator=generator)
    n = w.numel()
    # standard error of a sample variance: sigma^2 * sqrt((kurtosis - 1) / n); allow 5 of them
    tolerance = 5 * variance * math.sqrt((KURTOSIS[family] - 1) / n)
    assert float(w.var()) == pytest.approx(variance, abs=tolerance)
    assert abs(float(w.mean())) < 5 * math.sqrt(variance / n)


@pytest.mark.parametrize(("fn", "variance", "family"), CASES, ids=IDS)
def test_ks_against_the_distribution(fn, variance, family, generator):
    w = fn(torch.empty(SHAPE, dtype=torch.float64), generator=generator).flatten().numpy()
    assert stats.kstest(w, _distribution(family, variance).cdf).pvalue > 1e-3


def test_ks_rejects_the_wrong_distribution(generator):
    # the KS test above can fail: He-uniform draws are not Glorot-uniform draws
    w = he_uniform_(torch.empty(SHAPE, dtype=torch.float64), generator=generator).flatten().numpy()
    assert stats.kstest(w, _distribution("uniform", 2 / (FAN_IN + FAN_OUT)).cdf).pvalue < 1e-6
    assert stats.kstest(w, _distribution("normal", 2 / FAN_IN).cdf).pvalue < 1e-6


def test_he_uniform_limit_is_sqrt_6_over_fan_in(generator):
    w = he_uniform_(torch.empty(64, 10), generator=generator)
    bound = math.sqrt(6 / 10)
    assert float(w.abs().max()) <= bound
    assert float(w.abs().max()) > 0.95 * bound


def test_glorot_uniform_limit(generator):
    w = glorot_uniform_(torch.empty(32, 10), generator=generator)
    bound = math.sqrt(6 / 42)
    assert bound * 0.9 < float(w.abs().max()) <= bound


@pytest.mark.parametrize(
    ("fn", "shape", "expected"),
    [
        (he_normal_, (16, 3, 5, 5), 2 / 75),
        (glorot_uniform_, (16, 3, 5, 5), 2 / (75 + 400)),
        (lecun_normal_, (32, 8, 7), 1 / 56),
    ],
    ids=["he_conv2d", "glorot_conv2d", "lecun_conv1d"],
)
def test_conv_variance_uses_receptive_field(fn, shape, expected, generator):
    draws = torch.stack([fn(torch.empty(shape, dtype=torch.float64), generator=generator) for _ in range(50)])
    n = draws.numel()
    assert float(draws.var()) == pytest.approx(expected, abs=5 * expected * math.sqrt(2 / n))


@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        # the seed material's printed numbers (He-uniform 10->32 printed 0.1925)
        (("he", 10, 32), 0.2),
        (("he", 100, 128), 0.02),
        (("glorot", 10, 32), 0.0476),
        (("glorot", 100, 128), 0.00877),
    ],
    ids=["he_10_32", "he_100_128", "glorot_10_32", "glorot_100_128"],
)
def test_seed_numbers(layer, expected, generator):
    scheme, fan_in, fan_out = layer
    fn = he_uniform_ if scheme == "he" else glorot_uniform_
    single = float(fn(torch.empty(fan_out, fan_in), generator=generator).var())
    n = fan_in * fan_out
    assert single == pytest.approx(expected, abs=5 * expected * math.sqrt(0.8 / n))
    many = torch.stack([fn(torch.empty(fan_out, fan_in), generator=generator).var() for _ in range(400)])
    assert float(many.mean()) == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("shape", [(64, 64), (100, 30), (30, 100), (16, 4, 3, 3)], ids=str)
def test_orthogonal_is_orthogonal(shape, generator):
    w = orthogonal_(torch.empty(shape, dtype=torch.float64), gain=1.7, generator=generator)
    flat = w.reshape(shape[0], -1)
    rows, cols = flat.shape
    gram = flat.T @ flat if rows >= cols else flat @ flat.T
    torch.testing.assert_close(gram, 1.7**2 * torch.eye(min(rows, cols), dtype=torch.float64))


def test_orthogonal_is_haar_distributed(generator):
    # entries of a Haar-random orthogonal n x n matrix have mean 0, variance 1/n, and are sign-symmetric
    # on the diagonal (without the sign(diag(R)) correction the diagonal of Q is biased positive)
    diagonals = torch.stack([orthogonal_(torch.empty(8, 8), generator=generator).diagonal() for _ in range(2000)])
    assert abs(float(diagonals.mean())) < 5 * math.sqrt(1 / 8 / diagonals.numel())
    assert float(diagonals.var()) == pytest.approx(1 / 8, rel=0.1)


def test_generator_makes_draws_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = he_normal_(torch.empty(20, 10), generator=torch.Generator().manual_seed(7))
    b = he_normal_(torch.empty(20, 10), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(before, torch.get_rng_state())


def test_initializers_do_not_record_autograd_history():
    p = torch.nn.Parameter(torch.empty(5, 4))
    he_uniform_(p)
    assert p.grad_fn is None and p.is_leaf


def test_constant_and_identical(generator):
    assert torch.all(constant_(torch.empty(3, 4), 0.5) == 0.5)
    w = identical_(torch.empty(6, 4, 3), generator=generator)
    assert torch.equal(w, w[:1, :1].expand_as(w))  # one kernel for every (unit, input) pair
    assert not torch.all(w == w.flatten()[0])  # but a random one


def test_scaled_normal_rejects_negative_std():
    with pytest.raises(ValueError, match=r"std must be a finite number >= 0; got -0.1"):
        scaled_normal_(torch.empty(3, 3), std=-0.1)


@pytest.mark.parametrize(
    "fn",
    [
        he_uniform_,
        he_normal_,
        glorot_uniform_,
        glorot_normal_,
        lecun_uniform_,
        lecun_normal_,
        orthogonal_,
        identical_,
    ],
)
def test_fan_based_init_rejects_vectors(fn):
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        fn(torch.empty(10))


def test_bad_mode_and_nonlinearity():
    with pytest.raises(ValueError, match=r"Unknown mode 'fan_avg'. Accepted: fan_in, fan_out"):
        he_uniform_(torch.empty(3, 3), mode="fan_avg")
    with pytest.raises(ValueError, match="Unknown nonlinearity 'mish'"):
        he_normal_(torch.empty(3, 3), nonlinearity="mish")


def test_public_names_exist():
    for name in init.__all__:
        assert hasattr(init, name), name
