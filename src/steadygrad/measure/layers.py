"""Which modules the instruments record: the same selection for the probe and the Monitor.

By default (``layers=None``) a network that describes itself (``steadygrad.structure``) is recorded by its
blocks. Any other model is recorded by what its modules are, not by a list of classes, so that a library's own
layers are seen without being named here:

- every module that owns a weight parameter of two or more dimensions (``nn.Linear``, convolutions, recurrent
  layers, Hugging Face's ``Conv1D``, a custom projection) and every ``nn.Embedding``;
- every normalization: the registered ones (torch's, steadygrad's, ``nn.RMSNorm``) and, by structure, a leaf
  module whose class name says ``Norm`` and whose parameters are all one-dimensional (T5's ``T5LayerNorm``,
  Llama's ``LlamaRMSNorm``);
- every activation module (``steadygrad.kinds``' table, Hugging Face's classes once ``transformers`` is
  imported, and a parameterless leaf whose class name ends in ``Activation``), so that saturation and dead
  units are measured wherever the activation is a module of its own.

``skipped_modules`` says which module classes were left out and why, for the report.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from steadygrad import _keras, kinds
from steadygrad.measure.compiled import is_compile_wrapper
from steadygrad.structure import describe

__all__ = ["LayerSelector", "default_layer_types", "is_recorded_by_default", "select_layers", "skipped_modules"]


def default_layer_types() -> tuple[type[nn.Module], ...]:
    """The registered classes the default selection always records: weight layers, norms and activations
    (besides what it recognises by structure, see ``is_recorded_by_default``), from ``steadygrad.kinds`` at call
    time, so a kind registered later is recorded too."""
    activations = tuple(t for t in kinds.activation_types() if not kinds.is_activation(t, "linear"))
    return kinds.weight_layer_types() + kinds.norm_types() + activations


def _own_parameters(module: nn.Module) -> list:
    return list(module.parameters(recurse=False))


def _owns_a_weight(module: nn.Module) -> bool:
    """A parameter of 2+ dims of its own: any, for a leaf (a custom projection ``self.W``); for a module with
    children, one named as a weight (``kinds.parameter_role``), since a block's own tables (ViT's ``cls_token``
    and ``position_embeddings``, ConvNeXt's ``layer_scale``) are not a layer, and recording the block would
    give it its first child's weight statistics."""
    own = [(name, p) for name, p in module.named_parameters(recurse=False) if p.dim() >= 2]
    if next(module.children(), None) is None:
        return bool(own)
    return any(kinds.parameter_role(name) == "weight" for name, _ in own)


def _looks_like_norm(module: nn.Module) -> bool:
    """A normalization no table knows, by its structure: a leaf whose class name says Norm and whose own
    parameters (a gain, perhaps a bias) are all one-dimensional."""
    own = _own_parameters(module)
    leaf = next(module.children(), None) is None
    return leaf and "norm" in type(module).__name__.lower() and all(p.dim() <= 1 for p in own)


def _looks_like_activation(module: nn.Module) -> bool:
    """An activation no table knows: a parameterless leaf whose class name ends in Activation (the
    convention of Hugging Face's and many codebases' activation classes)."""
    leaf = next(module.children(), None) is None
    return leaf and not _own_parameters(module) and type(module).__name__.endswith("Activation")


def is_recorded_by_default(module: nn.Module) -> bool:
    """Whether the default selection records ``module`` (see the module docstring)."""
    if kinds.is_activation(module, "linear"):
        return False
    if isinstance(module, default_layer_types()):
        return True
    if _owns_a_weight(module):
        return True
    return _looks_like_norm(module) or _looks_like_activation(module)


def _repeated_blocks(model: nn.Module) -> set[int]:
    """The ids of a stack's residual blocks: ``kinds.is_block`` modules in a ``ModuleList`` or ``Sequential`` that
    holds two or more of the same class (GPT-2's ``transformer.h``, BERT's ``encoder.layer``, a ResNet stage).
    Their records are the residual stream, block by block, beside the records of the layers inside them."""
    ids = set()
    for container in model.modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(container.children())
        for child in children:
            if kinds.is_block(child) and sum(type(c) is type(child) for c in children) >= 2:
                ids.add(id(child))
    return ids


def _why_not(module: nn.Module) -> str:
    if next(module.children(), None) is not None:
        return "a container of modules none of which is recorded"
    if kinds.is_activation(module, "linear"):
        return "an identity: it passes its input on unchanged"
    if "dropout" in type(module).__name__.lower():
        return "dropout: no weight; it zeroes inputs at random, and the probe's default mode switches it off"
    if _own_parameters(module):
        return "owns only one-dimensional parameters (a scale or a bias) and is not a normalization"
    return "no weight, and neither a normalization nor an activation steadygrad knows"


def skipped_modules(model: nn.Module, selected: Sequence[tuple[str, nn.Module]]) -> dict[str, str]:
    """For each module class of ``model`` of which no module was recorded: why. A container is listed only when
    nothing inside it is recorded either (a block whose layers are recorded is not missing anything)."""
    if _keras.is_keras_layer(model):  # Keras' layers are not torch children: its own layer tree, the same rule
        named, below, why_not = _keras.named_layers(model), _keras.layers_below, _keras.why_not
    else:
        named, below, why_not = [(n, m) for n, m in model.named_modules() if n], nn.Module.modules, _why_not
    chosen = {id(module) for _, module in selected}
    inside = {id(m) for _, module in selected for m in below(module)}
    classes: dict[str, str] = {}
    recorded_classes = {type(module).__name__ for _, module in selected}
    for _, module in named:
        cls = type(module).__name__
        if id(module) in chosen or id(module) in inside or cls in recorded_classes:
            continue
        if any(id(m) in chosen for m in below(module)):
            continue  # a container of recorded layers
        classes.setdefault(cls, why_not(module))
    return classes


LayerSelector = type | tuple[type, ...] | str | Sequence[str] | None


def _torch_named(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``named_modules`` without the root, under the names a person wrote: a ``torch.compile`` wrapper nested in
    the model is left out and its ``_orig_mod`` step dropped (``block.0``, not ``block._orig_mod.0``), so name
    patterns match what the records show. A model with no submodules is its own only layer, named after its
    class."""
    named = []
    for name, module in model.named_modules():
        if not name or is_compile_wrapper(module):
            continue
        named.append((".".join(part for part in name.split(".") if part != "_orig_mod") or name, module))
    return named or [(type(model).__name__, model)]


def select_layers(model: nn.Module, layers: LayerSelector = None) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs a probe records, in ``named_modules`` order.

    - ``None``: a built network's blocks and head; otherwise what the module docstring lists.
    - a class or tuple of classes: every module of those types.
    - a glob pattern or list of them, matched against module names (``"block*"``, ``"*.linear"``).
    """
    if _keras.is_keras_layer(model):  # Keras' layers are not torch children: its own layer tree, Keras' names
        named = _keras.named_layers(model)
        if layers is None:
            return _keras.default_layers(model)
    else:  # a model with no submodules is its own only layer, named after its class
        named = _torch_named(model)
    if layers is None:
        structure = describe(model)
        if structure is not None and structure.blocks:
            return list(structure.blocks)
        blocks = _repeated_blocks(model)
        return [(n, m) for n, m in named if is_recorded_by_default(m) or id(m) in blocks]
    if isinstance(layers, type) or (isinstance(layers, tuple) and all(isinstance(t, type) for t in layers)):
        return [(n, m) for n, m in named if isinstance(m, layers)]
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError("layers= takes a module class, a tuple of classes, or name patterns (strings).")
    return [(n, m) for n, m in named if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
