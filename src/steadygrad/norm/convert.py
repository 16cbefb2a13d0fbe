"""Swap every normalization layer of a model between torch.nn and steadygrad, weights and buffers kept."""

from __future__ import annotations

import copy

from torch import nn

from steadygrad._checks import check_choice
from steadygrad.norm import modules as sg

__all__ = ["convert_norms", "convert_sync_batchnorm"]

# torch class <-> steadygrad class, with the constructor arguments to read off an instance
_PAIRS = [
    (nn.BatchNorm1d, sg.BatchNorm1d),
    (nn.BatchNorm2d, sg.BatchNorm2d),
    (nn.BatchNorm3d, sg.BatchNorm3d),
    (nn.InstanceNorm1d, sg.InstanceNorm1d),
    (nn.InstanceNorm2d, sg.InstanceNorm2d),
    (nn.InstanceNorm3d, sg.InstanceNorm3d),
    (nn.LayerNorm, sg.LayerNorm),
    (nn.GroupNorm, sg.GroupNorm),
    (nn.RMSNorm, sg.RMSNorm),
]


def _constructor_args(module: nn.Module) -> tuple[tuple, dict]:
    if isinstance(module, (nn.RMSNorm, sg.RMSNorm)):
        return (module.normalized_shape,), {"eps": module.eps, "elementwise_affine": module.elementwise_affine}
    # bias=False only when it matters: torch before 2.13 has no `bias` argument for BN, IN and GN
    no_bias = {"bias": False} if getattr(module, "weight", None) is not None and module.bias is None else {}
    if isinstance(module, (nn.LayerNorm, sg.LayerNorm)):
        return (module.normalized_shape,), {
            "eps": module.eps,
            "elementwise_affine": module.elementwise_affine,
            **no_bias,
        }
    if isinstance(module, (nn.GroupNorm, sg.GroupNorm)):
        return (module.num_groups, module.num_channels), {
            "eps": module.eps,
            "affine": module.affine,
            **no_bias,
        }
    return (module.num_features,), {
        "eps": module.eps,
        "momentum": module.momentum,
        "affine": module.affine,
        "track_running_stats": module.track_running_stats,
        **no_bias,
    }


def _convert_one(module: nn.Module, target: type[nn.Module]) -> nn.Module:
    args, kwargs = _constructor_args(module)
    floating = [t for t in module.state_dict().values() if t.is_floating_point()]
    factory = {"device": floating[0].device, "dtype": floating[0].dtype} if floating else {}
    converted = target(*args, **kwargs, **factory)
    converted.load_state_dict(module.state_dict())
    converted.train(module.training)
    return converted


def convert_norms(model: nn.Module, to: str = "steadygrad", inplace: bool = False) -> nn.Module:
    """Replace every batch, instance, layer, group and RMS norm of ``model`` by its counterpart.

    ``to="steadygrad"`` swaps torch.nn's norms for steadygrad's (hand-derived backward), ``to="torch"``
    the reverse. Weights, running statistics, ``num_batches_tracked`` and train/eval mode are kept, so
    outputs are unchanged. Only exact classes are swapped: a subclass may change behaviour, so it stays.

    Args:
        model: any module, or a single norm layer.
        to: ``"steadygrad"`` or ``"torch"``.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The converted model (a copy unless ``inplace``).
    """
    target = check_choice("conversion target", to, ("steadygrad", "torch"))
    mapping = {t: s for t, s in _PAIRS} if target == "steadygrad" else {s: t for t, s in _PAIRS}
    model = model if inplace else copy.deepcopy(model)
    if type(model) in mapping:
        return _convert_one(model, mapping[type(model)])
    for name, child in list(model.named_children()):
        if type(child) in mapping:
            setattr(model, name, _convert_one(child, mapping[type(child)]))
        else:
            convert_norms(child, to=target, inplace=True)
    return model


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Switch every steadygrad BatchNorm of ``model`` to synchronized statistics across ranks (in place;
    returns the model). torch's BatchNorms are converted to steadygrad's first (weights and buffers kept).
    Outside a multi-process run it changes nothing: with one rank the statistics are the local ones."""
    model = convert_norms(model, to="steadygrad", inplace=True)
    for module in model.modules():
        if isinstance(module, sg._BatchNorm):
            module.sync = True
            module.process_group = process_group
    return model
