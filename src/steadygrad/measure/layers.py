"""Which modules the instruments record: the same selection for the probe and the Monitor."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from steadygrad import kinds
from steadygrad.structure import describe

__all__ = ["LayerSelector", "default_layer_types", "select_layers"]


def default_layer_types() -> tuple[type[nn.Module], ...]:
    """What the probe records when it is not told: the dense, conv and recurrent layers and every norm, from
    ``steadygrad.kinds`` at call time (a kind registered later is recorded too)."""
    return kinds.weight_layer_types("dense", "conv", "recurrent") + kinds.norm_types()


LayerSelector = type | tuple[type, ...] | str | Sequence[str] | None


def select_layers(model: nn.Module, layers: LayerSelector = None) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs a probe records.

    - ``None``: a built network's blocks and head; otherwise every leaf Linear, ConvNd, RNN/LSTM/GRU and
      normalization module.
    - a class or tuple of classes: every module of those types.
    - a glob pattern or list of them, matched against module names (``"block*"``, ``"*.linear"``).
    """
    # a model with no submodules is its own only layer, named after its class
    named = [(name, m) for name, m in model.named_modules() if name] or [(type(model).__name__, model)]
    if layers is None:
        structure = describe(model)
        if structure is not None and structure.blocks:
            return list(structure.blocks)
        return [(n, m) for n, m in named if isinstance(m, default_layer_types())]
    if isinstance(layers, type) or (isinstance(layers, tuple) and all(isinstance(t, type) for t in layers)):
        return [(n, m) for n, m in named if isinstance(m, layers)]
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError("layers= takes a module class, a tuple of classes, or name patterns (strings).")
    return [(n, m) for n, m in named if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
