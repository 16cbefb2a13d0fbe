"""Mean-field signal propagation: what depth, activation and weight scale predict, before measuring.

For a deep fully connected network with weights W_ij ~ N(0, sigma_w^2 / fan_in) and biases
b_i ~ N(0, sigma_b^2), in the limit of wide layers (Poole et al. 2016, "Exponential expressivity in deep
neural networks through transient chaos"; Schoenholz et al. 2017, "Deep Information Propagation"):

- the length map: q_l = sigma_w^2 E[phi(sqrt(q_{l-1}) z)^2] + sigma_b^2, z ~ N(0, 1), where q_l is the
  second moment of a pre-activation h_l; it converges to a fixed point q*;
- the gradient factor per layer: chi_l = sigma_w^2 E[phi'(sqrt(q_l) z)^2], so that
  ||dL/dh_l||^2 ~= chi_l ||dL/dh_{l+1}||^2 and across layers the gradient norm ratio is
  sqrt(prod_l chi_l);
- chi_1 = chi at q*: < 1 is the ordered phase (gradients vanish), > 1 the chaotic phase (they explode),
  = 1 the edge of chaos; the depth scales xi_q = -1/ln(chi_1 + sigma_w^2 E[phi''(sqrt(q*) z) phi(sqrt(q*) z)])
  and xi_c = -1/ln(chi_1) bound how deep a network can be and still train.

Expectations over z are trapezoid sums on a grid scaled to the activation's sharpness (``_grid``),
derivatives come from autograd, so any elementwise activation works; ReLU, leaky ReLU and the
identity use their closed forms (quadrature converges slowly on kinks): E[relu(sqrt(q) z)^2] = q/2
and E[relu'^2] = 1/2, so the second moment scales by sigma_w^2 / 2 per layer (He et al. 2015).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from steadygrad._checks import check_choice, check_positive

__all__ = [
    "ACTIVATION_FUNCTIONS",
    "DepthScales",
    "Moments",
    "chi",
    "critical_sigma_w2",
    "depth_scales",
    "fixed_point",
    "gradient_ratio",
    "length_map",
    "mlp_prediction",
    "moments",
    "post_ln_gradient",
    "pre_ln_stream",
    "propagate",
    "relu_second_moment",
    "residual_variance",
]

Activation = str | Callable[[torch.Tensor], torch.Tensor]

ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "leaky_relu": F.leaky_relu,
    "gelu": F.gelu,
    "selu": torch.selu,
    "silu": F.silu,
    "identity": lambda x: x,
    "linear": lambda x: x,
}


@dataclass(frozen=True)
class Moments:
    """Gaussian moments of an activation at pre-activation second moment q."""

    phi2: float  # E[phi(sqrt(q) z)^2]
    dphi2: float  # E[phi'(sqrt(q) z)^2]
    d2phi_phi: float  # E[phi''(sqrt(q) z) phi(sqrt(q) z)]


def _closed_form(name: str, q: float) -> Moments | None:
    slope = {"relu": 0.0, "leaky_relu": 0.01, "identity": 1.0, "linear": 1.0}.get(name)
    if slope is None:
        return None
    half = (1.0 + slope**2) / 2.0  # E[phi'^2]: 1 on the positive half, slope^2 on the negative
    return Moments(phi2=half * q, dphi2=half, d2phi_phi=0.0)


def _grid(q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes z_k = k h on [-12, 12] and trapezoid weights h * pdf(z_k), with h = min(0.5, 0.25 / sqrt(q)).

    The trapezoid rule on the real line converges exponentially for analytic integrands: with tanh's
    poles at z = i pi / (2 sqrt(q)) the error is about exp(-pi^2 / (h sqrt(q))) = exp(-4 pi^2). Scaling h
    with 1/sqrt(q) keeps that accuracy where phi(sqrt(q) z) turns sharp (q* = 233 in a chaotic tanh net),
    which a fixed set of Gauss-Hermite nodes cannot resolve. The grid holds z = 0, where kinked
    activations bend, so those still converge as h^2.
    """
    h = min(0.5, 0.25 / math.sqrt(q)) if q > 0 else 0.5
    k = math.ceil(12.0 / h)
    z = torch.arange(-k, k + 1, dtype=torch.float64) * h
    weights = h * torch.exp(-0.5 * z.square()) / math.sqrt(2 * math.pi)
    return z, weights


def moments(activation: Activation, q: float) -> Moments:
    """E[phi^2], E[phi'^2] and E[phi'' phi] at sqrt(q) z, z ~ N(0, 1).

    Args:
        activation: a name of ``ACTIVATION_FUNCTIONS`` or any elementwise torch function.
        q: the pre-activation's second moment, >= 0.
    """
    q = check_positive("q", q, allow_zero=True)
    if isinstance(activation, str):
        name = check_choice("activation", activation, ACTIVATION_FUNCTIONS)
        closed = _closed_form(name, q)
        if closed is not None:
            return closed
        phi = ACTIVATION_FUNCTIONS[name]
    else:
        phi = activation
    z, w = _grid(q)
    x = (math.sqrt(q) * z).requires_grad_(True)
    y = phi(x)
    (d1,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x, allow_unused=True) if d1.requires_grad else (None,)
    d2 = torch.zeros_like(x) if d2 is None else d2
    y, d1 = y.detach(), d1.detach()
    return Moments(phi2=float(w @ y.square()), dphi2=float(w @ d1.square()), d2phi_phi=float(w @ (d2 * y)))


def length_map(q: float, sigma_w2: float, sigma_b2: float, activation: Activation) -> float:
    """q_l = sigma_w^2 E[phi(sqrt(q_{l-1}) z)^2] + sigma_b^2 (Poole et al. 2016, eq. 3)."""
    return sigma_w2 * moments(activation, q).phi2 + sigma_b2


def chi(q: float, sigma_w2: float, activation: Activation) -> float:
    """The squared gradient's factor across one layer at second moment q: sigma_w^2 E[phi'(sqrt(q) z)^2]."""
    return sigma_w2 * moments(activation, q).dphi2


def fixed_point(sigma_w2: float, sigma_b2: float, activation: Activation, q0: float = 1.0) -> float:
    """q* = length_map(q*), the second moment deep pre-activations settle at.

    Solved as a root of f(q) = length_map(q) - q rather than by iterating the map, which crawls near
    the edge of chaos (like 1/l at sigma_w^2 = 1 for tanh). Near 0, f(q) ~= (sigma_w^2 E[phi'(0)^2] - 1) q
    + sigma_b^2: with sigma_b^2 = 0 and sigma_w^2 E[phi'(0)^2] <= 1 the fixed point is q* = 0 exactly;
    otherwise f > 0 near 0 and the root is bracketed and bisected. An unbounded activation whose map
    grows at least linearly (ReLU with sigma_w^2 > 2) has no finite fixed point, and this raises;
    ReLU at exactly sigma_w^2 = 2, sigma_b^2 = 0 keeps any q, and q0 is returned.
    """

    def f(q: float) -> float:
        return length_map(q, sigma_w2, sigma_b2, activation) - q

    if sigma_b2 == 0 and sigma_w2 * moments(activation, 0.0).dphi2 <= 1 + 1e-12:
        return q0 if abs(f(q0)) <= 1e-12 * q0 else 0.0
    low, high = 1e-12, max(q0, 1.0)
    while f(high) > 0:
        high *= 4.0
        if high > 1e12:
            raise ValueError(
                f"The length map of {activation} at sigma_w^2={sigma_w2:.4g}, sigma_b^2={sigma_b2:.4g} "
                "has no finite fixed point: the second moment grows without bound with depth. "
                "Use propagate() for the layer-by-layer second moments."
            )
    for _ in range(200):  # bisection on a log scale: q* may be anywhere from 1e-12 to 1e12
        mid = math.sqrt(low * high)
        if f(mid) > 0:
            low = mid
        else:
            high = mid
        if high - low <= 1e-13 * high:
            break
    return math.sqrt(low * high)


@dataclass(frozen=True)
class DepthScales:
    """Fixed point and depth scales of a (sigma_w^2, sigma_b^2, activation) network."""

    q_star: float
    chi_1: float  # < 1 ordered (vanishing), > 1 chaotic (exploding), = 1 critical
    xi_q: float  # depth over which the second moment approaches q*
    xi_c: float  # depth over which correlations between inputs approach their fixed point (inf at criticality)


def depth_scales(sigma_w2: float, sigma_b2: float, activation: Activation) -> DepthScales:
    """q*, chi_1, xi_q and xi_c (Schoenholz et al. 2017, eqs. 6-9)."""
    q_star = fixed_point(sigma_w2, sigma_b2, activation)
    m = moments(activation, q_star)
    chi_1 = sigma_w2 * m.dphi2
    rate_q = chi_1 + sigma_w2 * m.d2phi_phi
    xi_q = -1.0 / math.log(rate_q) if 0 < rate_q < 1 else math.inf
    xi_c = -1.0 / math.log(chi_1) if chi_1 > 0 and chi_1 != 1 else math.inf
    return DepthScales(q_star=q_star, chi_1=chi_1, xi_q=xi_q, xi_c=abs(xi_c))


def critical_sigma_w2(sigma_b2: float, activation: Activation, low: float = 1e-3, high: float = 100.0) -> float:
    """The sigma_w^2 at which chi_1 = 1 (the edge of chaos) for a given sigma_b^2, by bisection.

    For tanh with sigma_b^2 = 0.05 it is about 1.76 (Schoenholz et al. 2017, fig. 1)."""

    def excess(sigma_w2: float) -> float:
        return depth_scales(sigma_w2, sigma_b2, activation).chi_1 - 1.0

    if excess(low) * excess(high) > 0:
        raise ValueError(f"chi_1 - 1 does not change sign on sigma_w^2 in [{low}, {high}] for {activation}.")
    for _ in range(60):
        mid = 0.5 * (low + high)
        if excess(low) * excess(mid) <= 0:
            high = mid
        else:
            low = mid
    return 0.5 * (low + high)


def propagate(
    depth: int,
    sigma_w2: float | list[float],
    sigma_b2: float | list[float],
    activation: Activation,
    input_second_moment: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Second moments q_1..q_L of the pre-activations of a depth-L network and the gradient factors
    chi_1..chi_L, layer by layer from the input (not assuming the fixed point).

    q_1 = sigma_w^2 * E[x^2] + sigma_b^2 (the first layer sees the input itself); sigma_w2 and sigma_b2 may
    be per-layer lists (e.g. measured from a built network: Var[W] * fan_in).
    """
    sw = [sigma_w2] * depth if np.isscalar(sigma_w2) else list(sigma_w2)
    sb = [sigma_b2] * depth if np.isscalar(sigma_b2) else list(sigma_b2)
    if len(sw) != depth or len(sb) != depth:
        raise ValueError(f"Per-layer sigma_w2 and sigma_b2 need {depth} values; got {len(sw)} and {len(sb)}.")
    q = np.empty(depth)
    chis = np.empty(depth)
    q[0] = sw[0] * input_second_moment + sb[0]
    for layer in range(depth):
        if layer:
            q[layer] = length_map(q[layer - 1], sw[layer], sb[layer], activation)
        # chi_l is the factor from dL/dh_{l+1} to dL/dh_l: W_{l+1}'s scale times phi' at h_l
        next_sw = sw[layer + 1] if layer + 1 < depth else sw[layer]
        chis[layer] = chi(q[layer], next_sw, activation)
    return q, chis


def gradient_ratio(
    depth: int, sigma_w2: float, sigma_b2: float, activation: Activation, input_second_moment: float = 1.0
) -> float:
    """Predicted ||dL/dh_1|| / ||dL/dh_L|| across the pre-activations of a depth-L network:
    sqrt(prod_{l=1}^{L-1} chi_l), with chi_l = sigma_w^2 E[phi'(sqrt(q_l) z)^2]."""
    _, chis = propagate(depth, sigma_w2, sigma_b2, activation, input_second_moment)
    return float(np.sqrt(np.prod(chis[:-1])))


def relu_second_moment(depth: int, sigma_w2: float, input_second_moment: float = 1.0) -> float:
    """Closed form for ReLU, no bias: q_L = sigma_w^2 E[x^2] (sigma_w^2 / 2)^(L-1) (He et al. 2015, eq. 9).

    He init (sigma_w^2 = 2) keeps it at 2 E[x^2]; Glorot with fan_in = fan_out (sigma_w^2 = 1) halves it
    per layer: 2^-29 ~= 1.9e-9 at depth 30."""
    return sigma_w2 * input_second_moment * (sigma_w2 / 2.0) ** (depth - 1)


def residual_variance(depth: int, branch_scale: float = 1.0) -> float:
    """Variance growth over ``depth`` residual blocks x <- x + s f(x) without normalization, where each
    branch f preserves variance and is uncorrelated with x: Var_L / Var_0 = (1 + s^2)^L.

    s = 1 doubles the variance per block (2^L); s = L^-1/2 bounds it by e (Zhang et al. 2019, "Fixup";
    Hanin & Rolnick 2018)."""
    return (1.0 + branch_scale**2) ** depth


def mlp_prediction(
    sigma_w2: Sequence[float],
    sigma_b2: Sequence[float],
    activation: Activation,
    input_second_moment: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per hidden layer k of an MLP (L hidden layers, then a linear head): the predicted second moment
    of its output E[y_k^2] = E[phi(sqrt(q_k) z)^2], and its predicted gradient norm ||dL/dy_k|| relative
    to the last hidden layer's (1 at k = L), from

        ||dL/dy_k||^2 = sigma_w,k+1^2 E[phi'(sqrt(q_{k+1}) z)^2] ||dL/dy_{k+1}||^2.

    Args:
        sigma_w2, sigma_b2: L + 1 values each, the hidden layers' then the head's (Var[W] * fan_in, Var[b]).
        activation: the hidden layers' activation.
        input_second_moment: E[x^2] of the input.
    """
    depth = len(sigma_w2) - 1
    if depth < 1 or len(sigma_b2) != depth + 1:
        raise ValueError("mlp_prediction needs L + 1 >= 2 values of sigma_w2 and as many of sigma_b2.")
    q, _ = propagate(depth, list(sigma_w2[:depth]), list(sigma_b2[:depth]), activation, input_second_moment)
    second_moments = np.array([moments(activation, qk).phi2 for qk in q])
    relative = np.ones(depth)
    for k in range(depth - 2, -1, -1):
        relative[k] = relative[k + 1] * math.sqrt(sigma_w2[k + 1] * moments(activation, q[k + 1]).dphi2)
    return second_moments, relative


def _check_depth(depth: int) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive integer (the number of blocks); got {depth!r}.")
    return depth


def pre_ln_stream(depth: int, embedding_second_moment: float, branch_second_moment: float) -> np.ndarray:
    """E[x_l^2] for l = 0..depth along the residual stream of a pre-LN transformer, x_{l+1} = x_l + F_l(LN(x_l)).

    LN hands every branch a unit-RMS input whatever the stream's size, so at initialization each block adds a
    branch of the same second moment c, uncorrelated with the stream: q_l = q_0 + l c. The stream grows linearly
    in depth (RMS like sqrt(l)); each later block changes it relatively less, and the gradient through the final
    norm into the top blocks shrinks like q_L^(-1/2) ~ L^(-1/2) (Xiong et al. 2020, "On Layer Normalization in the
    Transformer Architecture", Lemma 2 and Theorem 1). Linear growth is the healthy pre-LN profile; growth that
    compounds per block means the branches grow with the stream, which LN should have prevented.

    Args:
        depth: blocks L.
        embedding_second_moment: q_0 = E[x_0^2] of the embeddings entering block 1.
        branch_second_moment: c = E[F(LN(x))^2] summed over a block's sublayers (attention and MLP).

    Returns:
        q_0 .. q_L: depth + 1 values, the embeddings' first.
    """
    depth = _check_depth(depth)
    q0 = check_positive("embedding_second_moment", embedding_second_moment, allow_zero=True)
    c = check_positive("branch_second_moment", branch_second_moment, allow_zero=True)
    return q0 + c * np.arange(depth + 1, dtype=float)


def post_ln_gradient(forward_gains: Sequence[Sequence[float]], backward_gains: Sequence[Sequence[float]]) -> np.ndarray:
    """||dL/dx_l|| / ||dL/dx_L|| for l = 0..L along a post-LN stack of L blocks, x <- LN(x + F(x)) per sublayer.

    For a sublayer whose branch has forward gain v = E[F(x)^2] / E[x^2] and backward gain
    g = E[(J_F^T u)^2] / E[u^2] (J_F its Jacobian, u a gradient arriving at its output), x + F(x) has second
    moment (1 + v) E[x^2], which the norm divides out, and the gradient passes back as u + J_F^T u: the squared
    gradient is multiplied by (1 + g) / (1 + v) (the mean-field composition; the norm's projection off the mean
    and the radial direction removes O(1/width) more). Block l, with sublayer gains (v_ls, g_ls), scales the
    gradient by rho_l = prod_s sqrt((1 + g_ls) / (1 + v_ls)), and x_(l-1) receives prod_(k >= l) rho_k of the
    top's.

    A linear branch (g = v) leaves the gradient flat. Trained at a full learning rate, post-LN's branches grow
    (v >> 1) faster than their gradient paths (g stays below 1), so every norm divides the gradient and the bottom
    blocks receive exponentially little of it: why a deep post-LN stack needs warmup, and pre-LN (whose identity
    path skips the norms) does not (Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture";
    Liu et al. 2020, "Understanding the Difficulty of Training Transformers").

    Args:
        forward_gains, backward_gains: per block, bottom to top, its sublayers' v and g (shape (L, sublayers)).
            Measure them on a model with autograd: v from a sublayer's output over its input, g from
            ``torch.autograd.grad(F(x), x, u)`` with a random u (the lab's claim 20 does, ``lab._lm``).

    Returns:
        L + 1 ratios for x_0 (the embeddings, into block 1) .. x_L (after the last block, 1.0).
    """
    v, g = np.asarray(forward_gains, dtype=float), np.asarray(backward_gains, dtype=float)
    if v.ndim != 2 or v.shape != g.shape or not v.size:
        raise ValueError(
            "post_ln_gradient takes, per block, one forward and one backward gain per sublayer: two arrays of the "
            f"same shape (blocks, sublayers); got shapes {v.shape} and {g.shape}."
        )
    if (v < 0).any() or (g < 0).any() or not (np.isfinite(v).all() and np.isfinite(g).all()):
        raise ValueError(
            "post_ln_gradient's gains are ratios of second moments: finite and >= 0; got forward "
            f"{v.tolist()} and backward {g.tolist()}."
        )
    rho = np.sqrt(np.prod((1.0 + g) / (1.0 + v), axis=1))
    # x_L gets 1; x_(l-1) gets rho_l ... rho_L
    return np.append(np.cumprod(rho[::-1])[::-1], 1.0)
