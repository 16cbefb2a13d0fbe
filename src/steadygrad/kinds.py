"""One table per concept: the kinds of layer steadygrad tells apart, consulted everywhere.

Three tables, each keyed by module class and resolved through the class's MRO (so a subclass of
``nn.ReLU`` is a rectifier, and ``nn.ReLU6``, which torch derives from ``nn.Hardtanh``, is a rectifier
and not a saturating unit because its own entry comes first):

- **weight-bearing layers**, by family: ``dense`` (y = W x + b), ``conv`` (every ``_ConvNd``, the transposed
  ones too), ``recurrent`` (``RNNBase``), ``bilinear``, ``embedding``;
- **activations**: family (``saturating``, ``rectifier``, ``smooth``, ``linear``), the nonlinearity name
  whose gain ``steadygrad.init.calculate_gain`` knows (None: no standard gain), and for saturating units
  which saturation test applies;
- **normalizations**, by family: ``batch``, ``instance``, ``layer``, ``group``, ``rms``.

Other libraries' layers are registered by ``register_known_libraries()`` when that library is already imported
(steadygrad never imports it): Hugging Face's ``Conv1D`` (GPT-2's projections) and its activation classes.

Names, classes and instances are resolved at the edges (``activation("tanh")``, ``activation(nn.Tanh)``,
``activation(module)``), as timm's ``create_act`` does; inside the library objects are passed. Adding a
kind from another library is one line::

    steadygrad.kinds.register_weight_layer(transformers.pytorch_utils.Conv1D, "dense", transposed=True)

HF transformers' ``Conv1D`` (GPT-2's projections) is known without importing transformers: it is adopted,
transposed, as soon as ``transformers.pytorch_utils`` is in ``sys.modules`` (``_KNOWN_ELSEWHERE``).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = [
    "ACTIVATION_FAMILIES",
    "AFFINE",
    "NORM_FAMILIES",
    "WEIGHT_FAMILIES",
    "ActivationKind",
    "activation",
    "activation_types",
    "is_activation",
    "is_block",
    "is_weight_layer",
    "norm_family",
    "norm_types",
    "parameter_role",
    "register_activation",
    "register_known_libraries",
    "register_norm",
    "register_weight_layer",
    "weight_family",
    "weight_layer_types",
    "weight_transposed",
]

WEIGHT_FAMILIES = ("dense", "conv", "recurrent", "bilinear", "embedding")
ACTIVATION_FAMILIES = ("saturating", "rectifier", "smooth", "linear")
NORM_FAMILIES = ("batch", "instance", "layer", "group", "rms")

# The families whose layers compute y = W x (+ b) with fans: what variance-scaling schemes, Fixup, LSUV and
# the rules on weights (symmetric units, bias before a norm) apply to.
AFFINE: tuple[str, ...] = ("dense", "conv")


@dataclass(frozen=True)
class ActivationKind:
    """One activation: its name, class, family, init gain and saturation test."""

    name: str
    module: type[nn.Module]
    family: str
    gain: str | None = None  # nonlinearity name for calculate_gain; None: no standard gain
    saturation: str | None = None  # "tanh" (|y| > 0.99) or "sigmoid" (y outside [0.01, 0.99])
    gain_param: Callable[[nn.Module], float | None] = lambda module: None  # e.g. LeakyReLU's slope
    # a unit that is off passes no gradient (relu(x) = 0 and relu'(x) = 0 for x < 0): only such a unit can be
    # dead. A leaky ReLU, PReLU or ELU that is negative on every sample still passes gradient: not dead.
    dies: bool = False

    def gain_of(self, module: nn.Module) -> tuple[str, float | None] | None:
        """(nonlinearity, its parameter) for ``calculate_gain``, or None when no standard gain applies."""
        return None if self.gain is None else (self.gain, self.gain_param(module))


_WEIGHT_LAYERS: dict[type[nn.Module], str] = {}
_TRANSPOSED: dict[type[nn.Module], bool] = {}  # weight stored (in, out): the transpose of nn.Linear's (out, in)
# Weight layers of libraries steadygrad does not import: (module, class name, family, transposed), adopted on
# the first query after that module is loaded (a model built from it must have loaded it). HF's Conv1D computes
# y = x W + b with W of shape (in_features, out_features), so its fan_in is weight.shape[0].
_KNOWN_ELSEWHERE = [("transformers.pytorch_utils", "Conv1D", "dense", True)]
_ACTIVATIONS: dict[type[nn.Module], ActivationKind] = {}
_ACTIVATIONS_BY_NAME: dict[str, ActivationKind] = {}
_NORMS: dict[type[nn.Module], str] = {}


def _check(value: str, accepted: tuple[str, ...], what: str) -> None:
    if value not in accepted:
        raise ValueError(f"Unknown {what} {value!r}: accepted are {', '.join(accepted)}.")


# Keras' names for a layer's weights (``Dense``'s kernel, an LSTM cell's recurrent_kernel, ``Embedding``'s
# embeddings, a norm's gamma or RMSNormalization's scale) and for its biases (a norm's beta)
_WEIGHT_NAMES = ("embeddings", "gamma", "scale")
_BIAS_NAMES = ("beta",)


def parameter_role(name: str) -> str | None:
    """ "weight", "bias" or None for the name of a layer's own parameter: what the records' weight variance,
    weight- and bias-gradient norms and update ratio count. torch's names (every ``weight*``/``bias*``: an LSTM's
    ``weight_ih_l0`` and ``weight_hh_l0``; and ``*weight``/``*bias``: ``nn.MultiheadAttention``'s
    ``in_proj_weight``) and Keras' (``kernel``, ``recurrent_kernel``, ``depthwise_kernel``,
    ``embeddings``, ``gamma``, ``scale``; ``bias``, ``beta``); a norm's running statistics and anything else: None."""
    if name.startswith("weight") or name.endswith(("kernel", "weight")) or name in _WEIGHT_NAMES:
        return "weight"
    if name.startswith("bias") or name.endswith("bias") or name in _BIAS_NAMES:
        return "bias"
    return None


def register_weight_layer(module: type[nn.Module], family: str, *, transposed: bool = False) -> None:
    """Make ``module`` (and its subclasses) a weight-bearing layer of ``family``; ``transposed``: its weight
    is stored (in_features, out_features, ...), the transpose of nn.Linear's (out_features, in_features)."""
    _check(family, WEIGHT_FAMILIES, "weight-layer family")
    _WEIGHT_LAYERS[module] = family
    _TRANSPOSED[module] = transposed


_HF_ACTIVATIONS = "transformers.activations"
_pending_libraries = {_HF_ACTIVATIONS}  # the libraries' activation tables not adopted yet


def _adopt_loaded() -> None:
    """Adopt the layers of the libraries loaded since the last call (steadygrad imports none of them): the weight
    layers of ``_KNOWN_ELSEWHERE`` and Hugging Face's activation classes (``_adopt_hf_activations``). Every lookup
    calls it, so what a table answers never depends on which function asked first; after both are adopted it is
    two emptiness checks."""
    for entry in list(_KNOWN_ELSEWHERE):
        cls = getattr(sys.modules.get(entry[0]), entry[1], None)
        if cls is not None:
            _KNOWN_ELSEWHERE.remove(entry)
            if cls not in _WEIGHT_LAYERS:  # a user's own registration wins
                register_weight_layer(cls, entry[2], transposed=entry[3])
    if _pending_libraries and _HF_ACTIVATIONS in sys.modules:
        _pending_libraries.discard(_HF_ACTIVATIONS)
        _adopt_hf_activations(sys.modules[_HF_ACTIVATIONS])


def _activation_family(name: str) -> str | None:
    """The family of a Hugging Face activation by its ``ACT2CLS`` name (``gelu_new``, ``relu2``, ``swish``, ...)."""
    if name == "linear":
        return "linear"
    if "relu" in name:
        return "rectifier"
    if any(part in name for part in ("gelu", "silu", "swish", "mish", "laplace", "softplus", "xielu")):
        return "smooth"
    return None


def _adopt_hf_activations(activations) -> None:
    """The classes of ``transformers.activations.ACT2CLS`` get the family their name says (a GELU is smooth,
    ``relu2`` a rectifier); classes torch already has, or a user registered, keep their entry."""
    for name, entry in getattr(activations, "ACT2CLS", {}).items():
        cls = entry[0] if isinstance(entry, tuple) else entry
        family = _activation_family(name)
        if family is None or not isinstance(cls, type) or _lookup(_ACTIVATIONS, cls) is not None:
            continue
        dies = family == "rectifier" and "leaky" not in name  # relu2 = relu(x)^2: off below zero, like relu
        register_activation(ActivationKind(f"hf_{name}", cls, family, dies=dies))


def register_known_libraries() -> None:
    """Adopt the layers of the libraries the process has loaded (HF's ``Conv1D``, transposed, and its activation
    classes). Every lookup of this module does it by itself; call it to fill the tables before reading them
    directly. Idempotent and cheap."""
    _adopt_loaded()


def register_activation(kind: ActivationKind) -> None:
    """Make ``kind.module`` (and its subclasses) an activation; ``kind.name`` resolves to it."""
    _check(kind.family, ACTIVATION_FAMILIES, "activation family")
    _ACTIVATIONS[kind.module] = kind
    _ACTIVATIONS_BY_NAME.setdefault(kind.name, kind)


def register_norm(module: type[nn.Module], family: str) -> None:
    """Make ``module`` (and its subclasses) a normalization layer of ``family``."""
    _check(family, NORM_FAMILIES, "normalization family")
    _NORMS[module] = family


def _lookup(table: dict, module: nn.Module | type[nn.Module]):
    cls = module if isinstance(module, type) else type(module)
    return next((table[base] for base in cls.__mro__ if base in table), None)


def weight_family(module: nn.Module | type[nn.Module]) -> str | None:
    """The weight-layer family of a module or class, or None when it is not a registered weight layer."""
    _adopt_loaded()
    return _lookup(_WEIGHT_LAYERS, module)


def weight_transposed(module: nn.Module | type[nn.Module]) -> bool:
    """Whether a weight layer stores its weight (in, out, ...) rather than (out, in, ...): HF's Conv1D does,
    so its fan_in is ``weight.shape[0]``. False for anything that is not a registered weight layer."""
    _adopt_loaded()
    return bool(_lookup(_TRANSPOSED, module))


def is_weight_layer(module: nn.Module | type[nn.Module], *families: str) -> bool:
    """Whether ``module`` is a registered weight layer of one of ``families`` (of any family when none is given)."""
    family = weight_family(module)
    return family is not None and (not families or family in families)


def is_activation(module: nn.Module | type[nn.Module], *families: str) -> bool:
    """Whether ``module`` is a registered activation of one of ``families`` (of any when none is given)."""
    kind = activation(module)
    return kind is not None and (not families or kind.family in families)


# A residual block by the naming convention of torch (TransformerEncoderLayer), Hugging Face (GPT2Block,
# BertLayer, LlamaDecoderLayer, ViTLayer), timm (Block) and torchvision (BasicBlock): its output is the stream.
_BLOCK_NAME = re.compile(r"(Block|Layer)$")


def is_block(module: nn.Module | type[nn.Module] | str) -> bool:
    """Whether a module (class, or class name) is a residual block of a stack: a container class named ``*Block``
    or ``*Layer``, whose output is the residual stream after it. A leaf module is never one."""
    if isinstance(module, str):
        return bool(_BLOCK_NAME.search(module))
    if isinstance(module, nn.Module) and next(module.children(), None) is None:
        return False
    cls = module if isinstance(module, type) else type(module)
    return bool(_BLOCK_NAME.search(cls.__name__))


def weight_layer_types(*families: str) -> tuple[type[nn.Module], ...]:
    """The registered weight-layer classes of ``families`` (all families when none is given), for isinstance.
    Subclasses of a class registered under another family resolve to that family, so check with
    ``weight_family`` where the distinction matters."""
    for family in families:
        _check(family, WEIGHT_FAMILIES, "weight-layer family")
    _adopt_loaded()
    wanted = families or WEIGHT_FAMILIES
    return tuple(cls for cls, family in _WEIGHT_LAYERS.items() if family in wanted)


def activation(which: str | nn.Module | type[nn.Module]) -> ActivationKind | None:
    """The activation kind of a name, class or module, or None when it is not a registered activation."""
    _adopt_loaded()
    if isinstance(which, str):
        return _ACTIVATIONS_BY_NAME.get(which)
    return _lookup(_ACTIVATIONS, which)


def activation_types(*families: str) -> tuple[type[nn.Module], ...]:
    """The registered activation classes of ``families`` (all when none is given)."""
    for family in families:
        _check(family, ACTIVATION_FAMILIES, "activation family")
    _adopt_loaded()
    wanted = families or ACTIVATION_FAMILIES
    return tuple(cls for cls, kind in _ACTIVATIONS.items() if kind.family in wanted)


def norm_family(module: nn.Module | type[nn.Module]) -> str | None:
    """The normalization family of a module or class, or None when it is not a registered norm."""
    return _lookup(_NORMS, module)


def norm_types(*families: str) -> tuple[type[nn.Module], ...]:
    """The registered normalization classes of ``families`` (all when none is given)."""
    for family in families:
        _check(family, NORM_FAMILIES, "normalization family")
    wanted = families or NORM_FAMILIES
    return tuple(cls for cls, family in _NORMS.items() if family in wanted)


for _cls, _family in (
    (nn.Linear, "dense"),
    (nn.modules.conv._ConvNd, "conv"),
    (nn.RNNBase, "recurrent"),
    (nn.Bilinear, "bilinear"),
    (nn.Embedding, "embedding"),
    (nn.EmbeddingBag, "embedding"),  # not a subclass of nn.Embedding
):
    register_weight_layer(_cls, _family)

for _kind in (
    ActivationKind("sigmoid", nn.Sigmoid, "saturating", "sigmoid", saturation="sigmoid"),
    ActivationKind("tanh", nn.Tanh, "saturating", "tanh", saturation="tanh"),
    ActivationKind("hardtanh", nn.Hardtanh, "saturating", saturation="tanh"),
    ActivationKind("relu", nn.ReLU, "rectifier", "relu", dies=True),
    ActivationKind("relu6", nn.ReLU6, "rectifier", "relu", dies=True),
    ActivationKind("leaky_relu", nn.LeakyReLU, "rectifier", "leaky_relu", gain_param=lambda m: m.negative_slope),
    ActivationKind("prelu", nn.PReLU, "rectifier"),
    ActivationKind("rrelu", nn.RReLU, "rectifier"),
    ActivationKind("elu", nn.ELU, "rectifier"),
    ActivationKind("selu", nn.SELU, "rectifier", "selu"),
    ActivationKind("celu", nn.CELU, "rectifier"),
    ActivationKind("gelu", nn.GELU, "smooth", "gelu"),
    ActivationKind("silu", nn.SiLU, "smooth", "silu"),
    ActivationKind("mish", nn.Mish, "smooth"),
    ActivationKind("hardswish", nn.Hardswish, "smooth"),
    ActivationKind("softplus", nn.Softplus, "smooth"),
    ActivationKind("tanhshrink", nn.Tanhshrink, "smooth"),
    ActivationKind("hardsigmoid", nn.Hardsigmoid, "saturating", saturation="sigmoid"),
    ActivationKind("softsign", nn.Softsign, "saturating", saturation="tanh"),
    ActivationKind("identity", nn.Identity, "linear", "linear"),
):
    register_activation(_kind)

for _cls, _family in (
    (nn.modules.batchnorm._BatchNorm, "batch"),
    (nn.modules.instancenorm._InstanceNorm, "instance"),
    (nn.LayerNorm, "layer"),
    (nn.GroupNorm, "group"),
    (nn.RMSNorm, "rms"),
):
    register_norm(_cls, _family)
