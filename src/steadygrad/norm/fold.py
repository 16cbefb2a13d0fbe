"""Fold an eval-mode BatchNorm into the Linear or convolution before it, for inference."""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from steadygrad.norm.modules import _BatchNorm

__all__ = ["fold_batchnorm"]

_BATCHNORMS = (nn.modules.batchnorm._BatchNorm, _BatchNorm)
_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@torch.no_grad()
def _fold_pair(layer: nn.Module, bn: nn.Module) -> None:
    """W' = W * s and b' = (b - mu) * s + beta, with s = gamma / sqrt(running_var + eps) per output unit.

    At inference BN is the fixed affine map y = s * (z - mu) + beta of z = W x + b; composing two affine
    maps gives one. Computed in float64, then cast back.
    """
    var, mean = bn.running_var.double(), bn.running_mean.double()
    scale = torch.rsqrt(var + bn.eps)
    shift = -mean * scale
    if bn.weight is not None:
        scale = scale * bn.weight.double()
        shift = shift * bn.weight.double()
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    weight = layer.weight
    weight.copy_(weight.double() * scale.reshape((-1,) + (1,) * (weight.dim() - 1)))
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(weight.size(0), dtype=weight.dtype, device=weight.device))
    layer.bias.copy_(layer.bias.double() * scale + shift)


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(layer, _FOLDABLE)
        and isinstance(bn, _BATCHNORMS)
        and bn.running_mean is not None  # without running statistics eval mode uses the batch's
        and layer.weight.size(0) == bn.num_features
    )


def _fold_in(module: nn.Module) -> None:
    for child in module.children():
        _fold_in(child)
    if not isinstance(module, nn.Sequential):
        return
    for first, second in itertools.pairwise(list(module._modules)):
        layer, bn = module._modules[first], module._modules[second]
        if _foldable(layer, bn):
            _fold_pair(layer, bn)
            module._modules[second] = nn.Identity()


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every BatchNorm folded into the preceding Linear/ConvNd.

    Folds each BatchNorm (torch's or steadygrad's) that directly follows a Linear, Conv1d, Conv2d or
    Conv3d with matching output units inside an ``nn.Sequential``, where the order of the children is
    the order of execution; the BatchNorm becomes ``nn.Identity``. Pairs elsewhere, and BatchNorms
    without running statistics, are left as they are. The user's model is not modified.

    Outputs equal the unfolded model's in eval mode, up to rounding, and inference does one op less.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU()).eval()
        >>> folded = fold_batchnorm(net)
        >>> any(isinstance(m, nn.BatchNorm1d) for m in folded.modules())
        False
    """
    folded = copy.deepcopy(model).eval()
    _fold_in(folded)
    return folded
