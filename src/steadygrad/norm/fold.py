"""Fold an eval-mode BatchNorm into the Linear or convolution before it, for inference.

The pairs are found in the executed graph, not in the order children were registered: by ``torch.fx``
symbolic tracing (a BatchNorm whose input is the output of a Linear/ConvNd that feeds nothing else), and,
when a model cannot be traced (control flow on tensor values), from the order of the calls recorded by
forward hooks on example inputs; without those, inside ``nn.Sequential`` containers only.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from steadygrad.norm.modules import _BatchNorm

__all__ = ["FoldResult", "fold_batchnorm", "fold_batchnorm_report"]

_BATCHNORMS = (nn.modules.batchnorm._BatchNorm, _BatchNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FOLDABLE = (nn.Linear, *_CONVS, *_TRANSPOSED)
_NOT_A_LAYER = "not from a Linear, ConvNd or ConvTransposeNd"


@dataclass
class FoldResult:
    """What ``fold_batchnorm_report`` did.

    ``model``: the folded copy; ``folded``: (layer, batchnorm) module names folded, in graph order;
    ``not_folded``: (batchnorm, reason) for each BatchNorm left in place; ``method``: how the pairs were
    found, ``"fx"``, ``"hooks"`` (the recorded call order) or ``"sequential"`` (nn.Sequential children).
    """

    model: nn.Module
    folded: list[tuple[str, str]] = field(default_factory=list)
    not_folded: list[tuple[str, str]] = field(default_factory=list)
    method: str = "fx"


@torch.no_grad()
def _fold_pair(layer: nn.Module, bn: nn.Module) -> None:
    """W' = W * s and b' = (b - mu) * s + beta, with s = gamma / sqrt(running_var + eps) per output unit.

    At inference BN is the fixed affine map y = s * (z - mu) + beta of z = W x + b; composing two affine
    maps gives one. Computed in float64, then cast back. A transposed convolution stores its weight
    (C_in, C_out / groups, *kernel): output channel g * C_out/groups + j of group g is column j of the
    group's rows, so s is laid out (groups, 1, C_out/groups) over that weight seen as (groups, C_in/groups, ...).
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
    kernel = (1,) * (weight.dim() - 2)
    if isinstance(layer, _TRANSPOSED):
        groups = layer.groups
        grouped = weight.double().reshape(groups, weight.size(0) // groups, *weight.shape[1:])
        weight.copy_((grouped * scale.reshape(groups, 1, -1, *kernel)).reshape(weight.shape))
    else:
        weight.copy_(weight.double() * scale.reshape(-1, 1, *kernel))
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(scale.numel(), dtype=weight.dtype, device=weight.device))
    layer.bias.copy_(layer.bias.double() * scale + shift)


def _out_units(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, (*_CONVS, *_TRANSPOSED)) else layer.out_features


def _refusal(layer_name: str, layer: nn.Module, bn: nn.Module) -> str | None:
    """Why ``bn`` cannot be folded into ``layer`` (the module whose output it takes), or None when it can."""
    if not isinstance(layer, _FOLDABLE):
        return f"its input comes from {layer_name} ({type(layer).__name__}), {_NOT_A_LAYER}"
    if bn.running_mean is None or bn.running_var is None:
        return "no running statistics (track_running_stats=False): in eval mode it uses the batch's"
    if _out_units(layer) != bn.num_features:
        return f"{layer_name} has {_out_units(layer)} output units, the BatchNorm {bn.num_features} features"
    return None


class _Tracer(fx.Tracer):
    """fx's tracer, keeping the layers and BatchNorms (steadygrad's too) as single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (*_FOLDABLE, *_BATCHNORMS)) or super().is_leaf_module(m, module_qualified_name)


def _describe(node: fx.Node) -> str:
    if node.op == "placeholder":
        return f"the model's input {node.target!r}"
    if node.op == "call_module":
        return str(node.target)
    return f"{getattr(node.target, '__name__', node.target)} ({node.op})"


def _pairs_fx(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(layer, bn) pairs of the traced graph, and {bn: reason} for the BatchNorms that are not foldable."""
    graph = _Tracer().trace(model)
    modules = [n for n in graph.nodes if n.op == "call_module"]
    calls = Counter(n.target for n in modules)
    pairs, refused = [], {}
    for node in modules:
        bn = model.get_submodule(node.target)
        if not isinstance(bn, _BATCHNORMS):
            continue
        source = node.args[0] if node.args else node.kwargs.get("input")
        if calls[node.target] > 1:
            refused[node.target] = f"called {calls[node.target]} times: one fold cannot serve every call"
        elif not isinstance(source, fx.Node):
            refused[node.target] = "its input is not a tensor of the traced graph"
        elif source.op != "call_module":
            refused[node.target] = f"its input comes from {_describe(source)}, {_NOT_A_LAYER}"
        else:
            layer = model.get_submodule(source.target)
            reason = _refusal(source.target, layer, bn)
            users = [_describe(u) for u in source.users if u is not node]
            if reason is None and calls[source.target] > 1:
                reason = f"{source.target} is called {calls[source.target]} times: folding would change every call"
            if reason is None and users:
                reason = f"the output of {source.target} also feeds {', '.join(users)}: folding would change it there"
            if reason is None:
                pairs.append((source.target, node.target))
            else:
                refused[node.target] = reason
    return pairs, refused


@dataclass
class _Call:
    name: str
    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    output: object


class _Uses(TorchFunctionMode):
    """Counts, for each watched tensor, the torch functions applied to it outside the hooked modules."""

    def __init__(self):
        super().__init__()
        self.watched: dict[int, list[str]] = {}  # id(layer output) -> who used it
        self.depth = 0  # > 0 inside a hooked module, whose own ops are that module's one use

    def use(self, tensors, by: str) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor) and id(t) in self.watched:
                self.watched[id(t)].append(by)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth == 0:
            self.use(tree_leaves((args, kwargs)), getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


def _record_calls(model: nn.Module, example_inputs: tuple) -> tuple[list[_Call], _Uses]:
    """Run ``model`` once under forward hooks on its layers and BatchNorms: their calls in order, and who
    used each layer's output (module calls and functional ops alike)."""
    calls: list[_Call] = []
    uses = _Uses()
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, (*_FOLDABLE, *_BATCHNORMS))}

    def before(module, args):
        uses.use(args, names[id(module)])
        uses.depth += 1

    def after(module, args, output):
        uses.depth -= 1
        calls.append(_Call(names[id(module)], module, tuple(args), output))
        if isinstance(output, torch.Tensor) and isinstance(module, _FOLDABLE):
            uses.watched[id(output)] = []

    handles = []
    for module in (m for m in model.modules() if id(m) in names):
        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        with torch.no_grad(), uses:
            model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls, uses


def _pairs_hooks(model: nn.Module, example_inputs: tuple) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(layer, bn) pairs from the recorded calls: a layer call immediately followed by a BatchNorm call whose
    input is that very output tensor (identity, so a skip connection in between is not misread), used by
    nothing else; {bn: reason} for the BatchNorms called that are not foldable."""
    calls, uses = _record_calls(model, example_inputs)
    count = Counter(c.name for c in calls)
    pairs, refused = [], {}
    for previous, call in itertools.pairwise([None, *calls]):
        if not isinstance(call.module, _BATCHNORMS):
            continue
        x = call.inputs[0] if call.inputs else None
        if count[call.name] > 1:
            reason = f"called {count[call.name]} times: one fold cannot serve every call"
        elif previous is None or previous.output is not x:
            reason = "its input is not the output of the layer called just before it (Linear, ConvNd, ConvTransposeNd)"
        else:
            reason = _refusal(previous.name, previous.module, call.module)
            others = [u for u in uses.watched.get(id(x), []) if u != call.name]
            if reason is None and isinstance(previous.module, nn.Linear) and x.dim() != 2:
                reason = f"{previous.name}'s output has {x.dim()} dims: BatchNorm1d normalizes dim 1, not its features"
            if reason is None and count[previous.name] > 1:
                reason = f"{previous.name} is called {count[previous.name]} times: folding would change every call"
            if reason is None and others:
                reason = f"the output of {previous.name} also feeds {', '.join(others)}: folding would change it there"
        if reason is None:
            pairs.append((previous.name, call.name))
        else:
            refused.setdefault(call.name, reason)
    return pairs, refused


def _pairs_sequential(model: nn.Module, why: str) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(layer, bn) pairs of consecutive children of plain nn.Sequential containers, where child order is the
    order of execution; every other BatchNorm is refused with ``why``."""
    pairs, refused = [], {}
    for prefix, module in model.named_modules():
        if type(module).forward is not nn.Sequential.forward:
            continue
        for first, second in itertools.pairwise(module._modules.items()):
            (layer_name, layer), (bn_name, bn) = first, second
            if isinstance(bn, _BATCHNORMS):
                layer_name, bn_name = (f"{prefix}.{n}" if prefix else n for n in (layer_name, bn_name))
                reason = _refusal(layer_name, layer, bn)
                if reason is None:
                    pairs.append((layer_name, bn_name))
                else:
                    refused[bn_name] = reason
    for name, module in model.named_modules():
        if isinstance(module, _BATCHNORMS) and name not in refused and all(name != bn for _, bn in pairs):
            refused[name] = why
    return pairs, refused


def _tied(model: nn.Module, pairs: list[tuple[str, str]]) -> dict[str, str]:
    """{bn: reason} for the pairs whose layer has a parameter that another module holds too (tied weights):
    the fold writes the layer's weight and bias in place, so it would change that module's outputs as well.
    A module registered under two names is one module here: only a parameter held by two modules is tied."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), []).append(name)
    tied = {}
    for layer_name, bn_name in pairs:
        for parameter_name, parameter in model.get_submodule(layer_name).named_parameters():
            others = [o for o in owners[id(parameter)] if o != layer_name]
            if others:
                tied[bn_name] = (
                    f"{layer_name}.{parameter_name} is shared with {', '.join(others)} (tied weights): "
                    "folding would change that layer too"
                )
                break
    return tied


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def fold_batchnorm_report(model: nn.Module, example_inputs=None) -> FoldResult:
    """``fold_batchnorm``, with what was folded and, for every BatchNorm left, why (a ``FoldResult``).

    Args:
        model: any module; it is copied, never modified.
        example_inputs: a tensor or a tuple of ``forward``'s arguments, used only when ``torch.fx`` cannot
            trace the model: the pairs are then read from the calls recorded on these inputs.
    """
    folded = copy.deepcopy(model).eval()
    try:
        pairs, refused = _pairs_fx(folded)
        method = "fx"
    except Exception as error:  # any failure of symbolic tracing (TraceError, TypeError, ...) means: fall back
        if example_inputs is not None:
            inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
            pairs, refused = _pairs_hooks(folded, inputs)
            method = "hooks"
        else:
            why = f"torch.fx cannot trace the model ({type(error).__name__}) and no example_inputs were given"
            pairs, refused = _pairs_sequential(folded, why + ": only nn.Sequential children are folded")
            method = "sequential"
    tied = _tied(folded, pairs)
    pairs = [pair for pair in pairs if pair[1] not in tied]
    refused.update(tied)
    for layer_name, bn_name in pairs:
        _fold_pair(folded.get_submodule(layer_name), folded.get_submodule(bn_name))
        _replace(folded, bn_name, nn.Identity())
    folded_names = {bn for _, bn in pairs}
    for name, module in folded.named_modules():
        if isinstance(module, _BATCHNORMS) and name not in refused and name not in folded_names:
            refused[name] = "not called by forward" + (" on the example inputs" if method == "hooks" else "")
    return FoldResult(folded, list(pairs), list(refused.items()), method)


def fold_batchnorm(model: nn.Module, example_inputs=None) -> nn.Module:
    """A copy of ``model`` in eval mode with every BatchNorm folded into the layer whose output it normalizes.

    A BatchNorm (torch's or steadygrad's) is folded into a Linear, Conv1d/2d/3d or ConvTranspose1d/2d/3d
    with matching output units when, in the executed graph, its input is that layer's output and nothing
    else uses that output (torch.fx symbolic tracing; for models fx cannot trace, the calls recorded on
    ``example_inputs``, or without them the children of ``nn.Sequential`` containers). The BatchNorm becomes
    ``nn.Identity`` and the layer gets the folded weight and a bias. Left in place: a BatchNorm after an
    addition or any other op, one whose layer output feeds something else too, modules called more than
    once, a layer whose weight or bias another module shares (tied weights), BatchNorms without running
    statistics. ``fold_batchnorm_report`` says which and why. The user's model is not modified.

    Symbolic tracing sees no shapes: a Linear is taken to feed its BatchNorm1d an (N, features) input (the
    check that its output units equal the BatchNorm's features catches most other cases; a Linear applied to
    (N, L, F) with L equal to its output units would be folded wrongly). The recorded calls check the shape.

    Outputs equal the unfolded model's in eval mode, up to rounding, and inference does one op less.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU()).eval()
        >>> folded = fold_batchnorm(net)
        >>> any(isinstance(m, nn.BatchNorm1d) for m in folded.modules())
        False
    """
    return fold_batchnorm_report(model, example_inputs).model
