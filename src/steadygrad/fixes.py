"""Model transformations the doctor tries, and that a user can apply directly.

Each returns a new model (or re-initializes in place, for ``init_matched``); steadygrad's own norm modules
are used where a normalization is inserted.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from steadygrad import kinds
from steadygrad.init import init_model, next_activation
from steadygrad.norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, LayerNorm

__all__ = ["init_matched", "insert_norm", "standardize_inputs", "swap_activation"]

_BATCH_NORMS = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}  # by the convolution's spatial dimensions


@torch.no_grad()
def init_matched(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Re-initialize each Linear/Conv/RNN for the activation after it: He for the ReLU family, Glorot for
    tanh and sigmoid, LeCun for SELU and for layers followed by none (He et al. 2015; Glorot & Bengio 2010;
    Klambauer et al. 2017). Biases to zero. In place; returns the model."""
    following = next_activation(model)
    schemes = {
        "relu": "he_normal",
        "leaky_relu": "he_normal",
        "gelu": "he_normal",
        "silu": "he_normal",
        "tanh": "glorot_normal",
        "sigmoid": "glorot_normal",
        "selu": "lecun_normal",
        "linear": "lecun_normal",
    }
    for name, module in model.named_modules():
        if name in following or (not name and isinstance(module, nn.RNNBase)):
            activation, _ = following.get(name, ("tanh", None))
            sub = nn.ModuleDict({"m": module})  # init_model walks children: wrap to reach this one module alone
            init_model(sub, schemes.get(activation, "lecun_normal"), generator=generator)
    return model


def _replace(
    model: nn.Module,
    predicate: Callable[[nn.Module], bool],
    make: Callable[[nn.Module], nn.Module],
    skip: set[int] | None = None,
) -> int:
    """Replace every submodule matching ``predicate`` by ``make(old)``; returns how many were replaced."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if predicate(child) and (skip is None or id(child) not in skip):
                setattr(parent, name, make(child))
                count += 1
    return count


def _output_layer(model: nn.Module) -> nn.Module | None:
    layers = [m for m in model.modules() if kinds.is_weight_layer(m, *kinds.AFFINE)]
    return layers[-1] if layers else None


def insert_norm(model: nn.Module, kind: str = "batch") -> nn.Module:
    """A copy of ``model`` with a normalization after every Linear and convolution but the last (the output
    layer): ``"batch"`` puts BatchNorm after convolutions and Linear layers, ``"layer"`` LayerNorm after Linear
    layers (any input shape) and BatchNorm after convolutions. steadygrad's own norm modules are used."""
    model = copy.deepcopy(model)
    last = _output_layer(model)

    def wrap(layer: nn.Module) -> nn.Module:
        if isinstance(layer, nn.Linear):
            norm = LayerNorm(layer.out_features) if kind == "layer" else BatchNorm1d(layer.out_features)
        else:
            norm = _BATCH_NORMS[layer.weight.dim() - 2](layer.out_channels)  # transposed convolutions too
        return nn.Sequential(layer, norm)

    count = _replace(
        model, lambda m: kinds.is_weight_layer(m, *kinds.AFFINE), wrap, skip={id(last)} if last is not None else None
    )
    if count == 0:
        raise ValueError("insert_norm found no Linear or convolution layer (besides the output layer) to follow.")
    return model


def swap_activation(model: nn.Module, to: str = "relu") -> nn.Module:
    """A copy of ``model`` with its activations swapped: sigmoid and tanh become ``to`` (``"relu"`` or
    ``"leaky_relu"``); with ``"leaky_relu"`` plain ReLUs become leaky too, so dead units can come back."""
    model = copy.deepcopy(model)
    make = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.1)}[to]

    def target(m: nn.Module) -> bool:
        return kinds.is_activation(m, "saturating") or (to == "leaky_relu" and type(m) is nn.ReLU)

    if _replace(model, target, lambda m: make()) == 0:
        names = "Sigmoid or Tanh (or other saturating)" + (" or ReLU" if to == "leaky_relu" else "")
        raise ValueError(
            f"swap_activation found no {names} module to replace (activations called in forward cannot be swapped)."
        )
    return model


class _Standardize(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x):
        return (x - self.mean) / self.std


class _Chain(nn.Module):
    def __init__(self, first: nn.Module, model: nn.Module) -> None:
        super().__init__()
        self.standardize, self.model = first, model

    def forward(self, x, *args, **kwargs):
        return self.model(self.standardize(x), *args, **kwargs)


def standardize_inputs(model: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """``model`` behind a layer that standardizes its first input per feature with the statistics of
    ``inputs`` (zero mean, unit variance; constant features are only centred)."""
    mean = inputs.mean(0, keepdim=True)
    std = inputs.std(0, keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return _Chain(_Standardize(mean, std), copy.deepcopy(model))
