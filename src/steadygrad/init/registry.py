"""Initialization schemes by name: strings are resolved here, at the edge, and nowhere else."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from steadygrad._checks import normalize_name
from steadygrad.init import schemes
from steadygrad.init.fans import fans

__all__ = ["InitScheme", "available", "get", "register", "scheme_info"]

Initializer = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class InitScheme:
    """A named initializer, its closed-form weight variance and what it teaches."""

    name: str  # registry key, e.g. "he_uniform"
    fn: Initializer  # in-place: fn(tensor, generator=None) -> tensor
    formula: str  # the variance in words, e.g. "2 / fan_in"
    variance: Callable[[tuple[int, ...]], float] | None  # closed-form Var[w] for a weight shape
    summary: str  # one line for tables and --help
    bad: bool = False  # a choice kept to show it failing


def _fans_of(shape: tuple[int, ...]):
    return fans(torch.empty(shape, device="meta"))


def _orthogonal_variance(shape: tuple[int, ...]) -> float:
    # rows (or columns) of a semi-orthogonal (r, c) matrix are unit vectors: Var = 1 / max(r, c)
    rows, cols = shape[0], math.prod(shape[1:])
    return 1.0 / max(rows, cols)


def _zeros_(tensor: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return schemes.constant_(tensor, 0.0)


SMALL_STD = 0.01  # "too small": signals shrink by about std * sqrt(fan_in) per layer
LARGE_STD = 1.0  # "too large": signals grow by about std * sqrt(fan_in) per layer, or saturate

_REGISTRY: dict[str, InitScheme] = {}
_ALIASES = {
    "kaiming_uniform": "he_uniform",
    "kaiming_normal": "he_normal",
    "xavier_uniform": "glorot_uniform",
    "xavier_normal": "glorot_normal",
}


def register(scheme: InitScheme, *, overwrite: bool = False) -> InitScheme:
    """Add a scheme to the registry so that ``get(scheme.name)`` and the CLI find it."""
    key = normalize_name(scheme.name)
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"An initialization scheme named {key!r} exists; pass overwrite=True to replace it.")
    _REGISTRY[key] = scheme
    return scheme


def available(include_aliases: bool = False) -> list[str]:
    """Registered scheme names, in registration order."""
    return list(_REGISTRY) + (list(_ALIASES) if include_aliases else [])


def scheme_info(name: str) -> InitScheme:
    """The registry entry for ``name`` (aliases such as ``kaiming_normal`` resolve to ``he_normal``)."""
    if not isinstance(name, str):
        raise TypeError(f"scheme_info takes a scheme name; got {type(name).__name__}.")
    key = normalize_name(name)
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(
            f"Unknown initialization scheme {name!r}. "
            f"Accepted: {', '.join(available(include_aliases=True))}; "
            "or pass a callable fn(tensor, generator=None) that fills the tensor in place."
        )
    return _REGISTRY[key]


def get(scheme: str | Initializer) -> Initializer:
    """Resolve a scheme given as a name, a callable or a ``functools.partial`` to an in-place initializer.

    Example:
        >>> from functools import partial
        >>> get("he_uniform") is schemes.he_uniform_
        True
        >>> fn = get(partial(schemes.he_normal_, mode="fan_out"))
    """
    if isinstance(scheme, str):
        return scheme_info(scheme).fn
    if callable(scheme):
        return scheme
    raise TypeError(
        f"An initialization scheme is a name or a callable; got {type(scheme).__name__}. "
        f"Names: {', '.join(available())}."
    )


def _builtin() -> list[InitScheme]:
    def he(shape):
        return 2.0 / _fans_of(shape).fan_in

    def glorot(shape):
        f = _fans_of(shape)
        return 2.0 / (f.fan_in + f.fan_out)

    def lecun(shape):
        return 1.0 / _fans_of(shape).fan_in

    return [
        InitScheme(
            "he_uniform",
            schemes.he_uniform_,
            "2 / fan_in",
            he,
            "He et al. 2015, uniform: keeps ReLU activations' variance",
        ),
        InitScheme(
            "he_normal",
            schemes.he_normal_,
            "2 / fan_in",
            he,
            "He et al. 2015, normal: keeps ReLU activations' variance",
        ),
        InitScheme(
            "glorot_uniform",
            schemes.glorot_uniform_,
            "2 / (fan_in + fan_out)",
            glorot,
            "Glorot & Bengio 2010, uniform: for tanh/sigmoid in their linear regime",
        ),
        InitScheme(
            "glorot_normal",
            schemes.glorot_normal_,
            "2 / (fan_in + fan_out)",
            glorot,
            "Glorot & Bengio 2010, normal",
        ),
        InitScheme("lecun_uniform", schemes.lecun_uniform_, "1 / fan_in", lecun, "LeCun et al. 1998, uniform"),
        InitScheme(
            "lecun_normal",
            schemes.lecun_normal_,
            "1 / fan_in",
            lecun,
            "LeCun et al. 1998, normal: for self-normalizing SELU nets",
        ),
        InitScheme(
            "orthogonal",
            schemes.orthogonal_,
            "1 / max(rows, cols)",
            _orthogonal_variance,
            "Saxe et al. 2014: preserves every singular value of a linear net",
        ),
        InitScheme("zeros", _zeros_, "0", lambda shape: 0.0, "all weights zero: symmetry is never broken", bad=True),
        InitScheme(
            "identical",
            schemes.identical_,
            "one value c ~ N(0, 1/fan_in) for all",
            None,
            "every unit the same random vector: symmetry is never broken",
            bad=True,
        ),
        InitScheme(
            "small_normal",
            partial(schemes.scaled_normal_, std=SMALL_STD),
            f"{SMALL_STD**2:g}",
            lambda shape: SMALL_STD**2,
            f"N(0, {SMALL_STD}^2): too small, signals vanish",
            bad=True,
        ),
        InitScheme(
            "large_normal",
            partial(schemes.scaled_normal_, std=LARGE_STD),
            f"{LARGE_STD**2:g}",
            lambda shape: LARGE_STD**2,
            f"N(0, {LARGE_STD}^2): too large, signals explode or saturate",
            bad=True,
        ),
    ]


for _scheme in _builtin():
    register(_scheme)
