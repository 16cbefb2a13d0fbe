import math
import statistics

import pytest
import torch
from scipy import integrate, stats

from steadygrad import theory
from steadygrad.measure import probe
from steadygrad.nets import NetSpec, build


def gaussian_quad(fn):
    value, _ = integrate.quad(lambda z: fn(z) * stats.norm.pdf(z), -30, 30, epsabs=1e-12, limit=200)
    return value


@pytest.mark.parametrize("q", [0.05, 0.7, 3.0])
def test_tanh_moments_against_scipy(q):
    s = math.sqrt(q)
    m = theory.moments("tanh", q)
    assert m.phi2 == pytest.approx(gaussian_quad(lambda z: math.tanh(s * z) ** 2), rel=1e-6)
    assert m.dphi2 == pytest.approx(gaussian_quad(lambda z: (1 - math.tanh(s * z) ** 2) ** 2), rel=1e-6)
    d2 = gaussian_quad(lambda z: -2 * math.tanh(s * z) * (1 - math.tanh(s * z) ** 2) * math.tanh(s * z))
    assert m.d2phi_phi == pytest.approx(d2, rel=1e-6)


def test_relu_closed_form_against_scipy():
    m = theory.moments("relu", 1.7)
    assert m.phi2 == pytest.approx(gaussian_quad(lambda z: max(math.sqrt(1.7) * z, 0) ** 2), rel=1e-7)
    assert m.dphi2 == pytest.approx(0.5)


def test_custom_activation_callable():
    m = theory.moments(lambda x: x * torch.sigmoid(x), 1.0)
    assert m.phi2 == pytest.approx(gaussian_quad(lambda z: (z / (1 + math.exp(-z))) ** 2), rel=1e-8)


def test_critical_sigma_w2_of_tanh():
    critical = theory.critical_sigma_w2(0.05, "tanh")
    assert critical == pytest.approx(1.76, abs=0.01)  # Schoenholz et al. 2017
    assert theory.depth_scales(critical, 0.05, "tanh").chi_1 == pytest.approx(1.0, abs=1e-6)
    assert theory.depth_scales(critical, 0.05, "tanh").xi_c > 1e3  # diverges at the edge of chaos
    assert theory.depth_scales(1.0, 0.05, "tanh").chi_1 < 1 < theory.depth_scales(3.0, 0.05, "tanh").chi_1


def test_fixed_point_is_a_fixed_point():
    q_star = theory.fixed_point(2.5, 0.1, "tanh")
    assert theory.length_map(q_star, 2.5, 0.1, "tanh") == pytest.approx(q_star, rel=1e-10)
    with pytest.raises(ValueError, match="no finite fixed point"):
        theory.fixed_point(3.0, 0.0, "relu")


def test_gradient_ratio_numbers_of_the_issue():
    assert theory.gradient_ratio(50, 0.5, 0.0, "tanh") == pytest.approx(2.7e-8, rel=0.05)
    assert theory.gradient_ratio(50, 1.0, 0.0, "tanh") == pytest.approx(0.12, rel=0.05)
    assert theory.gradient_ratio(50, 4.0, 0.0, "tanh") == pytest.approx(1.6e3, rel=0.05)


def test_relu_closed_form():
    assert theory.relu_second_moment(30, 1.0) == pytest.approx(2**-29)
    assert theory.relu_second_moment(30, 2.0) == pytest.approx(2.0)
    q, chis = theory.propagate(30, 2.0, 0.0, "relu")
    assert q == pytest.approx([2.0] * 30) and chis == pytest.approx([1.0] * 30)


def test_residual_variance_doubles_and_branch_scaling_cures_it():
    assert theory.residual_variance(10) == 2**10
    for depth in (10, 100, 1000):
        assert theory.residual_variance(depth, depth**-0.5) < math.e
    assert theory.residual_variance(1000, 1000**-0.5) == pytest.approx(math.e, rel=1e-3)


@pytest.mark.parametrize("scale", [1.0, 20**-0.5], ids=["unscaled", "scaled"])
def test_residual_variance_matches_a_measured_network(scale):
    # linear branches with variance-preserving (LeCun) weights, uncorrelated with the stream
    growth = []
    for seed in range(8):
        spec = NetSpec(
            depth=21,
            width=512,
            in_features=512,
            activation="identity",
            init="lecun_normal",
            skip="residual",
            residual_scale=scale,
        )
        net = build(spec, torch.Generator().manual_seed(seed))
        x = torch.randn(64, 512, generator=torch.Generator().manual_seed(50 + seed))
        # the stream after block k is the input of block k+1: read it from the linear layers' inputs
        report = probe(net, x, layers="block??")
        first = report.records[0].act_second_moment  # block01's output: the stream's start
        streams = [first]
        for record in report.records[1:]:  # blocks 02..21: the branches
            streams.append(streams[-1] + scale**2 * record.act_second_moment)
        growth.append(streams[-1] / first)
    assert statistics.mean(growth) == pytest.approx(theory.residual_variance(20, scale), rel=0.1)


def test_mlp_prediction_validates():
    with pytest.raises(ValueError, match="L \\+ 1 >= 2"):
        theory.mlp_prediction([1.0], [0.0], "tanh")


@pytest.mark.parametrize("q", [1e-4, 233.0, 5e3])
def test_moments_stay_accurate_where_the_activation_turns_sharp(q):
    # at q* = 233 (a chaotic tanh net) tanh(sqrt(q) z) switches within |z| < 0.07
    s = math.sqrt(q)

    def quad(fn):
        return integrate.quad(lambda z: fn(z) * stats.norm.pdf(z), -12, 12, points=[0.0], limit=500, epsabs=1e-13)[0]

    m = theory.moments("tanh", q)
    assert m.phi2 == pytest.approx(quad(lambda z: math.tanh(s * z) ** 2), rel=1e-7)
    assert m.dphi2 == pytest.approx(quad(lambda z: (1 - math.tanh(s * z) ** 2) ** 2), rel=1e-7)
