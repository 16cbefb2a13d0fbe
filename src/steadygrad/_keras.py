"""Keras 3 models on the torch backend: everything steadygrad knows about Keras, in one place.

Under ``KERAS_BACKEND=torch`` a Keras layer is an ``nn.Module`` (``keras.src.backend.torch.layer.TorchLayer``), so
hooks, ``model.parameters()``, ``loss.backward()`` and ``copy.deepcopy`` work on it. But Keras keeps its own layer
tree: a model's layers are not torch children (``named_modules`` sees only a ``ParameterDict`` of every variable
under path names), and a layer's parameters are Keras variables named ``kernel``, ``bias``, ``gamma``... whose
``.value`` is the torch ``Parameter`` the forward uses (and whose ``.grad`` the backward fills). So the
instruments ask this module for a Keras model's layers (by Keras' names: ``dense``, ``dense_1``, and
``inner/dense`` inside a nested model), a layer's own parameters, and the activation a layer applies inside
itself (``Dense(..., activation="sigmoid")``).

steadygrad never imports keras: a Keras object is recognised only once ``keras`` is in ``sys.modules`` (it must
have been imported for the object to exist).
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
from collections.abc import Callable

import torch
from torch import nn

from steadygrad import kinds

__all__ = [
    "FIX_ADVICE",
    "applied_activation",
    "backend_hint",
    "call_kwargs",
    "default_layers",
    "enter_mode",
    "is_keras_layer",
    "is_stand_in",
    "kernel_and_fan_in",
    "layers_below",
    "named_layers",
    "own_parameters",
    "primary_sublayer",
    "seeded",
    "why_not",
]

# Keras' activation layers that carry no ``activation`` attribute, by class name -> steadygrad's activation name
_ACTIVATION_LAYERS = {"ReLU": "relu", "LeakyReLU": "leaky_relu", "PReLU": "prelu", "ELU": "elu"}
# Keras' activation function names that steadygrad's table spells otherwise
_ALIASES = {
    "hard_sigmoid": "hardsigmoid",
    "hard_silu": "hardswish",
    "hard_swish": "hardswish",
    "swish": "silu",
    "tanh_shrink": "tanhshrink",
    "hard_tanh": "hardtanh",
}


def _keras():
    return sys.modules.get("keras")


def is_keras_layer(obj) -> bool:
    """Whether ``obj`` is a Keras layer (a model included), without importing keras."""
    keras = _keras()
    return keras is not None and isinstance(obj, keras.layers.Layer)


def backend_hint(obj) -> str:
    """What to add to "needs an nn.Module" when ``obj`` is a Keras layer on another backend: "" otherwise."""
    if isinstance(obj, nn.Module) or not is_keras_layer(obj):
        return ""
    return " A Keras model is a torch module only on the torch backend: set KERAS_BACKEND=torch before importing keras."


def is_stand_in(output) -> bool:
    """Whether a forward hook's ``output`` is a shape-only stand-in rather than data: Keras infers shapes by running
    a layer's forward on meta tensors (a subclassed model's first call, ``fit``) or on ``KerasTensor``s (building a
    Sequential), and torch.compile traces with FakeTensors. Recording one would crash at the host copy, or count a
    call that never ran."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif isinstance(output, dict) and output:
        output = next(iter(output.values()))
    if isinstance(output, torch.Tensor):
        return output.is_meta or isinstance(output, torch._subclasses.FakeTensor)
    keras = _keras()
    return keras is not None and isinstance(output, keras.KerasTensor)


def _sublayers(layer) -> list:
    """A layer's direct sublayers, in Keras' order: a model's public ``layers`` (without its ``InputLayer``s);
    for any other layer the one-level ``_flatten_layers`` Keras itself uses to walk a layer (no public API)."""
    keras = _keras()
    if isinstance(layer, keras.Model):
        found = layer.layers
    else:
        found = layer._flatten_layers(include_self=False, recursive=False)
    return [s for s in found if not isinstance(s, keras.layers.InputLayer)]


def named_layers(model) -> list[tuple[str, nn.Module]]:
    """Every layer below ``model`` (nested ones included, containers too) as (name, layer), depth first: the Keras
    name, joined by "/" below a nested model or layer (``block/dense_3``). A layer reached twice is listed once.
    A model without sublayers is its own only layer.

    Raises:
        ValueError: the model is not built (its layers have no weights yet, and what they are cannot be told).
    """
    if not model.built:
        raise ValueError(
            f"The Keras layer {model.name!r} is not built yet, so its layers have no weights to record: start it "
            "with keras.Input(shape), or call it once on a batch (model(x)), before steadygrad looks at it."
        )
    found: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def walk(layer, prefix: str) -> None:
        for sub in _sublayers(layer):
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            name = f"{prefix}/{sub.name}" if prefix else sub.name
            found.append((name, sub))
            walk(sub, name)

    walk(model, "")
    return found or [(model.name, model)]


def own_parameters(layer) -> list[tuple[str, torch.Tensor]]:
    """A layer's own weights (not its sublayers') as (Keras name, torch Parameter): ``kernel``, ``bias``,
    ``gamma``, ``moving_mean``... (``kinds.parameter_role`` says which is a weight and which a bias)."""
    inner = {id(v) for sub in _sublayers(layer) for v in sub.weights}
    return [(v.name, v.value) for v in layer.weights if id(v) not in inner]


def kernel_and_fan_in(layer) -> tuple[torch.Tensor, int] | None:
    """A ``Dense`` or ``Conv`` layer's ``kernel`` and the inputs each output sums over. Keras stores kernels
    inputs-first, outputs last ((in, out); (kh, kw, in, out)), so fan_in is the product of every dimension but
    the last. None for a layer without a ``kernel`` of two or more dimensions (a depthwise or recurrent kernel
    scales otherwise)."""
    kernel = dict(own_parameters(layer)).get("kernel")
    if kernel is None or kernel.dim() < 2:
        return None
    return kernel, math.prod(kernel.shape[:-1])


def _owns_weight(layer) -> bool:
    return any(kinds.parameter_role(n) == "weight" and p.dim() >= 2 for n, p in own_parameters(layer))


def primary_sublayer(layer):
    """The first layer at or below ``layer`` owning a weight of two or more dimensions (an LSTM's cell), or None."""
    if _owns_weight(layer):
        return layer
    return next((sub for _, sub in named_layers(layer) if sub is not layer and _owns_weight(sub)), None)


def applied_activation(layer) -> kinds.ActivationKind | None:
    """The activation a Keras layer applies to its own output, from steadygrad's table: an ``Activation`` layer's
    or a ``Dense``/``Conv``'s ``activation`` (a Keras activation function, by its name), or the activation
    layers ``ReLU``, ``LeakyReLU``, ``PReLU``, ``ELU``. None for anything else (a custom function included)."""
    if not is_keras_layer(layer):
        return None
    for cls in type(layer).__mro__:
        if cls.__module__.startswith("keras.") and cls.__name__ in _ACTIVATION_LAYERS:
            return kinds.activation(_ACTIVATION_LAYERS[cls.__name__])
    function = getattr(layer, "activation", None)
    if isinstance(function, nn.Module):
        return kinds.activation(function)
    name = getattr(function, "__name__", None)
    if name is None or not (getattr(function, "__module__", None) or "").startswith("keras."):
        return None
    return kinds.activation(_ALIASES.get(name, name))


def _is_recurrent(layer) -> bool:
    return isinstance(layer, _keras().layers.RNN)


def _is_adapted(layer) -> bool:
    """A preprocessing layer that takes its statistics from the data before training (``adapt``: ``Normalization``,
    ``Discretization``, the lookups): it learns nothing."""
    return callable(getattr(layer, "adapt", None))


def _is_norm(layer) -> bool:
    """A leaf whose class name ends in Normalization, but for a preprocessing layer adapted to the data:
    ``keras.layers.Normalization`` standardizes the features with a given or adapted mean and variance (no gamma or
    beta, often no variable at all), a fixed step before the network rather than a normalization inside it."""
    return type(layer).__name__.endswith("Normalization") and not _sublayers(layer) and not _is_adapted(layer)


def _is_activation_layer(layer) -> bool:
    kind = applied_activation(layer)
    return kind is not None and kind.family != "linear" and not _owns_weight(layer)


def _recorded(layer) -> bool:
    return _owns_weight(layer) or _is_recurrent(layer) or _is_norm(layer) or _is_activation_layer(layer)


def default_layers(model) -> list[tuple[str, nn.Module]]:
    """What the instruments record of a Keras model by default, as ``steadygrad.measure.layers`` does for torch:
    every layer owning a weight of two or more dimensions (``Dense``, convolutions, ``Embedding``, ``EinsumDense``),
    every recurrent layer whole (``LSTM``: its cell runs once per time step), every ``*Normalization`` layer but the
    preprocessing ``Normalization`` (``_is_norm``), and every activation layer (``Activation``, ``ReLU``...).
    Containers (nested models) are walked, not recorded."""
    inside_recurrent: set[int] = set()
    chosen = []
    for name, layer in named_layers(model):
        if id(layer) in inside_recurrent:
            continue
        if _recorded(layer):
            chosen.append((name, layer))
        if _is_recurrent(layer):
            inside_recurrent.update(id(sub) for _, sub in named_layers(layer) if sub is not layer)
    return chosen


def layers_below(layer) -> list:
    """``layer`` and every layer below it (nested ones included)."""
    return [layer, *(sub for _, sub in named_layers(layer) if sub is not layer)]


def why_not(layer) -> str:
    """Why the default selection does not record ``layer`` (``steadygrad.measure.layers.skipped_modules`` asks)."""
    if _sublayers(layer):
        return "a container of layers none of which is recorded"
    kind = applied_activation(layer)
    if kind is not None and kind.family == "linear":
        return "an identity: it passes its input on unchanged"
    if _is_adapted(layer):
        return "a preprocessing layer: its statistics are taken from the data (adapt), nothing in it is learned"
    if own_parameters(layer):
        return "owns only one-dimensional parameters (a scale or a bias) and is not a normalization"
    return "no weight, and neither a normalization nor an activation steadygrad knows"


# What each of ``steadygrad.diagnose``'s fix actions is in Keras: the doctor cannot apply those that rewrite torch
# modules (``steadygrad.fixes``) to a Keras model's layers, and says this instead
FIX_ADVICE = {
    "reinit": "in Keras: kernel_initializer='he_normal' before ReLU, 'glorot_uniform' before tanh or sigmoid",
    "add_norm": "in Keras: a keras.layers.BatchNormalization() (or LayerNormalization()) after each Dense or Conv",
    "add_skips": "in Keras: residual connections, keras.layers.Add()([x, f(x)]), in a functional model",
    "swap_activation": "in Keras: activation='relu' with kernel_initializer='he_normal' in place of sigmoid or tanh",
    "standardize_inputs": "in Keras: standardize x before fit, or start with a keras.layers.Normalization() adapted "
    "to x_train",
    "remove_bias": "in Keras: use_bias=False on the layers before each BatchNormalization",
}


@contextlib.contextmanager
def seeded(seed: int):
    """Build Keras layers reproducibly inside: Keras' initializers draw their seeds from Python's ``random`` (through
    Keras' global SeedGenerator), not from torch's generator, so ``torch.manual_seed`` alone gives a model factory
    new weights at each call. ``keras.utils.set_random_seed`` fixes them; Python's and numpy's random states and
    Keras' global seed state are put back on leaving (torch's is the caller's to fork). Nothing happens before
    keras is imported."""
    keras = _keras()
    if keras is None:
        yield
        return
    import numpy as np
    from keras.src.backend.common import global_state  # no public getter for the seed state set_random_seed sets

    names = ("global_seed_generator", "global_random_seed")
    saved = [global_state.get_global_attribute(name) for name in names]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    keras.utils.set_random_seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        for name, value in zip(names, saved, strict=True):
            global_state.set_global_attribute(name, value)


def call_kwargs(model, mode: str | None) -> dict:
    """The keyword that puts a Keras model in the probe's ``mode``: Keras layers take ``training=`` at each call (and
    default to inference), torch's ``model.train()`` does not reach them. {} for anything else, or mode None."""
    if mode is None or not is_keras_layer(model):
        return {}
    return {"training": mode == "train"}


def _noise_switches(layer) -> list[tuple[str, float]]:
    """The attributes that make a layer random in training: a dropout's ``rate`` (``Dropout``, ``SpatialDropout*``,
    ``GaussianDropout``, ``AlphaDropout``...), a noise layer's ``stddev`` (``GaussianNoise``), with their values."""
    name = type(layer).__name__
    attribute = "rate" if "Dropout" in name else "stddev" if "Noise" in name else None
    value = getattr(layer, attribute, None) if attribute else None
    return [(attribute, value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def _global_seed_state():
    """Keras' global SeedGenerator's state variable (random ops given no seed of their own draw from it), or None
    before anything made it."""
    from keras.src.backend.common import global_state  # no public getter

    generator = global_state.get_global_attribute("global_seed_generator")
    return None if generator is None else generator.state


def enter_mode(model, mode: str | None) -> tuple[Callable[[], None], int]:
    """The probe's ``_enter_mode`` for a Keras model: in ``"train"`` each dropout layer's ``rate`` and each noise
    layer's ``stddev`` (``GaussianNoise``) is set to 0 (the probe measures the deterministic network); in every mode
    the non-trainable variables (``BatchNormalization``'s moving statistics, and the state of every SeedGenerator
    of the model's layers and Keras' global one, torch tensors that ``training=True`` updates in place) are kept
    to be put back, so the model is left as found and a second probe draws what the first drew. Returns the
    function that restores all of it, and how many dropout and noise layers were switched off."""
    switched = []
    if mode == "train":
        for _, layer in named_layers(model):
            for attribute, value in _noise_switches(layer):
                switched.append((layer, attribute, value))
                setattr(layer, attribute, 0.0)
    variables = list(model.non_trainable_variables)  # SeedGenerator states too (non_trainable_weights has none)
    global_seed = _global_seed_state()
    if global_seed is not None:
        variables.append(global_seed)
    state = [(v.value, v.value.detach().clone()) for v in variables]

    def restore() -> None:
        for layer, attribute, value in switched:
            setattr(layer, attribute, value)
        with torch.no_grad():
            for value, saved in state:
                value.copy_(saved)

    return restore, len({id(layer) for layer, _, _ in switched})
