"""In-place weight initializers: variance scaling (He, Glorot, LeCun), orthogonal, and the bad choices.

Each function fills ``tensor`` in place under ``torch.no_grad()`` and returns it. Every random draw
takes ``generator=`` so that a run is reproducible without touching the global RNG.

Variance scaling in one line: draw w with Var[w] = gain^2 / fan, either as N(0, gain^2 / fan) or as
U(-b, b) with b = gain * sqrt(3 / fan) (a uniform on [-b, b] has variance b^2 / 3).
"""

from __future__ import annotations

import math

import torch

from steadygrad._checks import check_choice, check_positive
from steadygrad.init.fans import calculate_gain, fans

__all__ = [
    "constant_",
    "glorot_normal_",
    "glorot_uniform_",
    "he_normal_",
    "he_uniform_",
    "identical_",
    "lecun_normal_",
    "lecun_uniform_",
    "orthogonal_",
    "scaled_normal_",
]

_MODES = ("fan_in", "fan_out")


def _fan(tensor: torch.Tensor, mode: str) -> int:
    mode = check_choice("mode", mode, _MODES, "fan_in preserves the forward signal, fan_out the gradient.")
    return getattr(fans(tensor), mode)


@torch.no_grad()
def _uniform_(tensor: torch.Tensor, std: float, generator: torch.Generator | None) -> torch.Tensor:
    bound = math.sqrt(3.0) * std  # U(-b, b) has variance b^2 / 3
    return tensor.uniform_(-bound, bound, generator=generator)


@torch.no_grad()
def _normal_(tensor: torch.Tensor, std: float, generator: torch.Generator | None) -> torch.Tensor:
    return tensor.normal_(0.0, std, generator=generator)


def he_uniform_(
    tensor: torch.Tensor,
    mode: str = "fan_in",
    nonlinearity: str = "relu",
    param: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """He (Kaiming) uniform: U(-b, b) with b = gain * sqrt(3 / fan), so Var[w] = gain^2 / fan.

    For ReLU (gain sqrt(2)) and mode fan_in the limit is sqrt(6 / fan_in) and Var[w] = 2 / fan_in.
    He, Zhang, Ren, Sun 2015, "Delving Deep into Rectifiers", eq. 10.

    Args:
        tensor: weight with at least 2 dimensions.
        mode: ``fan_in`` keeps the forward activations' variance; ``fan_out`` the backward gradients'.
        nonlinearity: the activation that follows the layer (see ``calculate_gain``).
        param: leaky_relu's negative slope.
        generator: random source for reproducible draws.

    Example:
        >>> w = he_uniform_(torch.empty(32, 10), generator=torch.Generator().manual_seed(0))
        >>> bool(w.abs().max() <= (6 / 10) ** 0.5)
        True
    """
    std = calculate_gain(nonlinearity, param) / math.sqrt(_fan(tensor, mode))
    return _uniform_(tensor, std, generator)


def he_normal_(
    tensor: torch.Tensor,
    mode: str = "fan_in",
    nonlinearity: str = "relu",
    param: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """He (Kaiming) normal: N(0, gain^2 / fan); for ReLU with fan_in, std = sqrt(2 / fan_in).

    He et al. 2015, eq. 10. Arguments as ``he_uniform_``.
    """
    std = calculate_gain(nonlinearity, param) / math.sqrt(_fan(tensor, mode))
    return _normal_(tensor, std, generator)


def _glorot_std(tensor: torch.Tensor, gain: float) -> float:
    fan_in, fan_out = fans(tensor)
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def glorot_uniform_(tensor: torch.Tensor, gain: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Glorot (Xavier) uniform: U(-b, b) with b = gain * sqrt(6 / (fan_in + fan_out)).

    Var[w] = 2 gain^2 / (fan_in + fan_out).

    The compromise between keeping the forward (1/fan_in) and backward (1/fan_out) variance, derived for
    activations in their linear regime. Glorot & Bengio 2010, "Understanding the difficulty of training
    deep feedforward neural networks", eq. 16.
    """
    return _uniform_(tensor, _glorot_std(tensor, gain), generator)


def glorot_normal_(tensor: torch.Tensor, gain: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Glorot (Xavier) normal: N(0, 2 gain^2 / (fan_in + fan_out)). Glorot & Bengio 2010."""
    return _normal_(tensor, _glorot_std(tensor, gain), generator)


def lecun_uniform_(tensor: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """LeCun uniform: U(-sqrt(3 / fan_in), sqrt(3 / fan_in)), Var = 1 / fan_in.

    LeCun, Bottou, Orr, Müller 1998, "Efficient BackProp", section 4.6.
    """
    return _uniform_(tensor, 1.0 / math.sqrt(fans(tensor).fan_in), generator)


def lecun_normal_(tensor: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """LeCun normal: N(0, 1 / fan_in) (not truncated), the init of self-normalizing SELU networks.

    LeCun et al. 1998; Klambauer, Unterthiner, Mayr, Hochreiter 2017, "Self-Normalizing Neural Networks".
    """
    return _normal_(tensor, 1.0 / math.sqrt(fans(tensor).fan_in), generator)


@torch.no_grad()
def orthogonal_(tensor: torch.Tensor, gain: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """A (semi-)orthogonal matrix times ``gain``, drawn uniformly (Haar measure).

    The tensor is viewed as (size(0), numel / size(0)). Q from the QR decomposition of a Gaussian matrix,
    with the signs of R's diagonal folded into Q so the draw is uniform over orthogonal matrices
    (Mezzadri 2007). A deep linear net with such weights preserves every singular value: gradients
    neither vanish nor explode (Saxe, McClelland, Ganguli 2014).
    """
    if tensor.dim() < 2:
        raise ValueError(f"orthogonal_ needs a tensor with at least 2 dimensions; got shape {tuple(tensor.shape)}.")
    rows = tensor.size(0)
    cols = tensor.numel() // rows
    # QR in float32 at least: half-precision QR is not supported and would lose orthogonality.
    compute_dtype = torch.promote_types(tensor.dtype, torch.float32)
    gaussian = torch.randn(
        max(rows, cols), min(rows, cols), generator=generator, dtype=compute_dtype, device=tensor.device
    )
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    if rows < cols:
        q = q.T
    tensor.copy_(q.reshape(tensor.shape).to(tensor.dtype)).mul_(gain)
    return tensor


@torch.no_grad()
def constant_(tensor: torch.Tensor, value: float) -> torch.Tensor:
    """Fill with one value. As a weight init this never breaks symmetry: every unit computes the same
    function and receives the same gradient, forever."""
    return tensor.fill_(value)


@torch.no_grad()
def identical_(
    tensor: torch.Tensor, std: float | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Every unit gets the same random weights: one kernel k ~ N(0, std^2), std = 1/sqrt(fan_in) by
    default, shared by every (output unit, input channel) pair; for a Linear layer, one random value.

    A bad choice kept to show it failing: symmetry is never broken. If every layer is initialized so,
    the units of a hidden layer have identical incoming weights (so identical outputs) and identical
    outgoing weights (so identical back-propagated gradients, dL/dh_j = sum_k W[k, j] delta_k), hence
    identical updates, forever. (Sharing one random *row* across units is not enough: the next layer's
    columns would differ, and so would the gradients its inputs receive.)
    """
    fan_in = fans(tensor).fan_in
    std = 1.0 / math.sqrt(fan_in) if std is None else check_positive("std", std, allow_zero=True)
    kernel = torch.empty(tensor.shape[2:], dtype=tensor.dtype, device=tensor.device)
    kernel.normal_(0.0, std, generator=generator)
    return tensor.copy_(kernel.expand_as(tensor))


@torch.no_grad()
def scaled_normal_(
    tensor: torch.Tensor, std: float, mean: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """N(mean, std^2) with a fixed std, independent of the fans: too small a std makes signals and
    gradients vanish with depth, too large makes them explode or saturate the activations."""
    std = check_positive("std", std, allow_zero=True)
    return tensor.normal_(mean, std, generator=generator)
