"""Fan-in, fan-out and the gain of each nonlinearity: the two numbers every variance-scaling init needs."""

from __future__ import annotations

import math
from functools import cache
from typing import NamedTuple

import torch

from steadygrad._checks import check_choice
from steadygrad._gauss import gaussian_expectation

__all__ = ["NONLINEARITIES", "Fans", "calculate_gain", "fans"]


class Fans(NamedTuple):
    """Number of inputs and outputs each unit of a weight tensor is connected to."""

    fan_in: int
    fan_out: int


def fans(tensor: torch.Tensor, gates: int = 1) -> Fans:
    """Fan-in and fan-out of a weight tensor.

    - Linear ``(out, in)``: fan_in = in, fan_out = out.
    - ConvNd ``(C_out, C_in / groups, *kernel)``: fan_in = C_in/groups x prod(kernel),
      fan_out = C_out x prod(kernel) (each input reaches prod(kernel) positions of each output map).
    - Recurrent weights stack their gates along dim 0 (LSTM: 4 x hidden, GRU: 3 x hidden): pass
      ``gates`` to get the fans of one gate, fan_out = size(0) / gates, the matrix each gate really is.

    Args:
        tensor: a weight with at least 2 dimensions.
        gates: how many gate matrices are stacked along dim 0.

    Example:
        >>> fans(torch.empty(32, 10))
        Fans(fan_in=10, fan_out=32)
        >>> fans(torch.empty(4 * 20, 10), gates=4)
        Fans(fan_in=10, fan_out=20)
    """
    if tensor.dim() < 2:
        raise ValueError(
            "Fan-based initialization needs a weight with at least 2 dimensions "
            f"(out_features, in_features, *kernel); got shape {tuple(tensor.shape)}. "
            "A bias or a normalization weight has no fan: set it with constant_ instead."
        )
    if not isinstance(gates, int) or gates < 1 or tensor.size(0) % gates:
        raise ValueError(
            f"gates must be a positive integer dividing the first dimension ({tensor.size(0)}); got {gates!r}."
        )
    receptive_field = math.prod(tensor.shape[2:])
    return Fans(fan_in=tensor.size(1) * receptive_field, fan_out=tensor.size(0) // gates * receptive_field)


@cache
def _second_moment_gain(nonlinearity: str) -> float:
    """gain = 1 / sqrt(E[phi(z)^2]) for z ~ N(0, 1): the scale that keeps the pre-activation second
    moment at 1 from layer to layer. For ReLU this is He et al.'s sqrt(2) exactly (E[relu(z)^2] = 1/2)."""
    phi = {"gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu}[nonlinearity]

    def second_moment(z):
        return phi(torch.as_tensor(z, dtype=torch.float64)).pow(2).numpy()

    return 1.0 / math.sqrt(gaussian_expectation(second_moment))


def _gain_linear(param):
    return 1.0


def _gain_tanh(param):
    return 5.0 / 3.0


def _gain_relu(param):
    return math.sqrt(2.0)


def _gain_leaky_relu(param):
    slope = 0.01 if param is None else param
    if isinstance(slope, bool) or not isinstance(slope, (int, float)) or not math.isfinite(slope):
        raise ValueError(f"leaky_relu's negative slope must be a finite number; got {param!r}.")
    return math.sqrt(2.0 / (1.0 + slope**2))


def _gain_selu(param):
    return 3.0 / 4.0


# name -> gain(param). Sources:
#   linear, identity, conv*: 1, the layer is linear (LeCun et al. 1998, "Efficient BackProp").
#   sigmoid: 1, torch.nn.init's convention (Glorot & Bengio 2010 assume the linear regime).
#   tanh: 5/3, torch.nn.init's value; close to 1/sqrt(E[tanh(z)^2]) ~= 1.59 for z ~ N(0, 1).
#   relu: sqrt(2), He et al. 2015, eq. 10: half the units are zero, so double the variance.
#   leaky_relu(a): sqrt(2 / (1 + a^2)), He et al. 2015, eq. 15 (default slope 0.01, as torch.nn.LeakyReLU).
#   selu: 3/4, torch.nn.init's value; Klambauer et al. 2017's self-normalizing fixed point wants gain 1
#         with LeCun-normal weights: use lecun_normal_ for a self-normalizing network.
#   gelu, silu: 1/sqrt(E[phi(z)^2]) by Gauss-Hermite quadrature (torch has no gain for these); the same
#         second-moment argument that gives He's sqrt(2) for ReLU.
_GAINS = {
    "linear": _gain_linear,
    "identity": _gain_linear,
    "conv1d": _gain_linear,
    "conv2d": _gain_linear,
    "conv3d": _gain_linear,
    "conv_transpose1d": _gain_linear,
    "conv_transpose2d": _gain_linear,
    "conv_transpose3d": _gain_linear,
    "sigmoid": _gain_linear,
    "tanh": _gain_tanh,
    "relu": _gain_relu,
    "leaky_relu": _gain_leaky_relu,
    "selu": _gain_selu,
    "gelu": lambda param: _second_moment_gain("gelu"),
    "silu": lambda param: _second_moment_gain("silu"),
}

NONLINEARITIES: tuple[str, ...] = tuple(_GAINS)


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """The recommended gain g for a nonlinearity: weights get variance g^2 / fan.

    Values equal ``torch.nn.init.calculate_gain`` wherever torch defines one; the source of each is
    listed beside ``_GAINS`` in this module.

    Args:
        nonlinearity: one of ``NONLINEARITIES`` (case-insensitive; ``-`` or ``_``).
        param: leaky_relu's negative slope (default 0.01).

    Example:
        >>> round(calculate_gain("relu") ** 2, 6)
        2.0
    """
    key = check_choice("nonlinearity", nonlinearity, _GAINS)
    return _GAINS[key](param)
