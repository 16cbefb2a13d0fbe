"""Fixup: train deep residual networks without normalization (Zhang, Dauphin, Ma 2019).

With L residual branches of m weight layers each, initialized so that the network starts close to the
identity and each branch's update has the right size:

1. the classification layer and the last weight layer of every residual branch start at 0;
2. the other weight layers of a branch get a standard (He) init scaled by L^(-1 / (2m - 2));
3. biases start at 0.

(The paper also adds scalar biases before each layer and a scalar multiplier per branch; they speed
training up but the network trains without them, and this function leaves the architecture alone.)
"""

from __future__ import annotations

import torch
from torch import nn

from steadygrad import kinds
from steadygrad.init.schemes import he_normal_
from steadygrad.structure import describe

__all__ = ["fixup_"]


@torch.no_grad()
def fixup_(
    model: nn.Module,
    branches: list[nn.Module] | None = None,
    head: nn.Module | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Fixup-initialize ``model`` in place and return it.

    Args:
        model: a residual network. For a ``steadygrad.build`` network with ``skip="residual"``, or any model
            that describes itself (``steadygrad.structure``), the branches and the head are found automatically.
        branches: the residual branches (modules whose output is added to the stream), in any other model.
        head: the final classification layer, zero-initialized (default: ``model.head`` if present).
        generator: random source for the He draws.

    Raises:
        ValueError: when the branches cannot be found, or a branch has no weight layer.
    """
    structure = describe(model)
    if branches is None:
        if structure is None or structure.skip != "residual":
            raise ValueError(
                "fixup_ needs the residual branches: pass branches=[...], use a steadygrad.build "
                "network with skip='residual', or implement steadygrad_structure() (steadygrad.structure)."
            )
        branches = structure.branches
    if head is None:
        head = structure.head if structure is not None else getattr(model, "head", None)
    count = len(branches)
    for branch in branches:
        layers = [m for m in branch.modules() if kinds.is_weight_layer(m, *kinds.AFFINE)]
        if not layers:
            raise ValueError(f"A residual branch has no Linear or convolution layer: {type(branch).__name__}.")
        m = len(layers)
        scale = count ** (-1.0 / (2 * m - 2)) if m > 1 else 1.0
        for layer in layers[:-1]:
            he_normal_(layer.weight, generator=generator).mul_(scale)
        layers[-1].weight.zero_()
        for layer in layers:
            if layer.bias is not None:
                layer.bias.zero_()
    if head is not None:
        for layer in [m for m in head.modules() if kinds.is_weight_layer(m, *kinds.AFFINE)][-1:]:
            layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.zero_()
    return model
