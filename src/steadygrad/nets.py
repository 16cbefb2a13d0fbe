"""Deep networks from a typed spec: the depth x activation x init x norm x skip grid in one dataclass.

    net = build(NetSpec(kind="mlp", depth=50, width=256, activation="tanh", init="glorot_uniform"))

``build`` returns a plain ``nn.Module`` whose blocks are named in depth order (``block01``,
``block02``, ..., ``head``), so every measurement labels layers by depth.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
import typing
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from steadygrad import kinds
from steadygrad._checks import check_choice
from steadygrad.attention import CausalSelfAttention
from steadygrad.init import get as get_init
from steadygrad.init import init_model
from steadygrad.norm import BatchNorm1d, BatchNorm2d, GroupNorm, InstanceNorm2d, LayerNorm, RMSNorm
from steadygrad.structure import Structure

__all__ = [
    "ACTIVATIONS",
    "CELLS",
    "KINDS",
    "NORMS",
    "NORM_POSITIONS",
    "PARAMETRIZATIONS",
    "RESIDUALS",
    "SKIPS",
    "SPEC_OPTIONS",
    "TRANSFORMER_INITS",
    "DeepNet",
    "NetSpec",
    "SpecOption",
    "TransformerBlock",
    "TransformerNet",
    "build",
    "expand_specs",
    "spec_cli_options",
    "spec_options",
]

KINDS = ("mlp", "cnn", "rnn", "transformer")
CELLS = ("rnn", "lstm", "gru")
NORMS = ("none", "batch", "layer", "group", "instance", "rms")
# before/after the activation (mlp, cnn, rnn); pre/post the residual addition (transformer)
NORM_POSITIONS = ("before", "after", "pre", "post")
SKIPS = ("none", "residual", "dense")
# How a transformer block adds its sublayers to the stream (see TransformerBlock)
RESIDUALS = ("plain", "deepnorm", "rezero", "skipinit")
# Initializations that are whole-transformer recipes rather than per-layer schemes (see _transformer_init)
TRANSFORMER_INITS = ("t_fixup", "small_init")
PARAMETRIZATIONS = ("standard", "mup")
# The activations a built net offers, by name; their classes, families and gains come from steadygrad.kinds.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    name: kinds.activation(name).module
    for name in ("sigmoid", "tanh", "relu", "leaky_relu", "gelu", "selu", "identity")
}


# NetSpec fields whose None default is resolved from the others (kind, residual, init)
_PER_KIND_DEFAULTS = ("activation", "norm", "norm_position", "init")


@dataclass(frozen=True)
class SpecOption:
    """How a NetSpec field is typed on the command line (``steadygrad probe``, ``train`` and ``sweep --grid``):
    the one declaration the CLI generates its network options from. Stored as ``field.metadata["option"]``.

    Attributes:
        help: what the field means, for ``--help`` (a sentence without its final period).
        name: the option's name without ``--`` (``act`` for ``activation``); "" means the field's name with
            ``-`` for ``_``.
        choices: the accepted values, listed in the help; NetSpec checks them on creation.
        shown_default: the default as the help states it, when the field's default alone would mislead.
        from_data: ``train`` takes this size from its data, so it offers no option for it.
    """

    help: str
    name: str = ""
    choices: tuple[str, ...] = ()
    shown_default: str = ""
    from_data: bool = False


def _cli(help: str, **option) -> dict:
    """A NetSpec field's metadata: its command-line declaration (see SpecOption)."""
    return {"option": SpecOption(help, **option)}


@dataclass(frozen=True)
class NetSpec:
    """What to build. Every field is checked on creation; a bad value raises ``ValueError`` naming the
    field and the accepted values."""

    kind: str = dataclasses.field(
        default="mlp",
        metadata=_cli(
            "Network kind (mlp: Linear blocks; cnn: 3x3 convolution blocks, on image data; rnn: stacked recurrent "
            "layers; transformer: a causal language model of attention + MLP blocks, on token sequences)",
            choices=KINDS,
        ),
    )
    depth: int = dataclasses.field(default=10, metadata=_cli("Hidden blocks (weight layers before the head)"))
    width: int = dataclasses.field(
        default=64, metadata=_cli("Units (mlp, rnn), channels (cnn) or model width d (transformer) per block")
    )
    in_features: int = dataclasses.field(
        default=64,
        metadata=_cli("Input features (mlp; rnn: per time step), or input channels for cnn", from_data=True),
    )
    out_features: int = dataclasses.field(
        default=10, metadata=_cli("Outputs (classes) of the linear head", from_data=True)
    )
    # None: relu, tanh for rnn, gelu for transformer
    activation: str | None = dataclasses.field(
        default=None,
        metadata=_cli(
            "Activation (for rnn: the cell's nonlinearity; for transformer: the MLP's)",
            name="act",
            choices=tuple(ACTIVATIONS),
            shown_default="relu; tanh for kind rnn; gelu for kind transformer",
        ),
    )
    # an init registry name (the bad ones included), a transformer recipe, or in Python a callable; None: per kind
    init: str | Callable | None = dataclasses.field(
        default=None,
        metadata=_cli(
            "Initialization scheme (see `steadygrad inits`; for kind transformer also t_fixup or small_init)",
            shown_default="he_uniform; glorot_uniform for kind transformer",
        ),
    )
    # None: per kind (see __post_init__)
    norm: str | None = dataclasses.field(
        default=None,
        metadata=_cli(
            "Normalization in every block (rms: RMSNorm; instance needs cnn)",
            choices=NORMS,
            shown_default="none; layer for kind transformer (none with residual rezero or init t_fixup)",
        ),
    )
    norm_position: str | None = dataclasses.field(
        default=None,
        metadata=_cli(
            "The norm before or after the activation (mlp, cnn), or for a transformer pre (on each sublayer's "
            "input, as GPT-2) or post (on the stream after each addition, as the original Transformer)",
            choices=NORM_POSITIONS,
            shown_default="before; pre for kind transformer, post with residual deepnorm",
        ),
    )
    skip: str = dataclasses.field(
        default="none",
        metadata=_cli(
            "Skip connections (residual: x + scale * block(x); dense: each block sees all earlier outputs)",
            choices=SKIPS,
        ),
    )
    bias: bool = dataclasses.field(
        default=True, metadata=_cli("Biases in the weight layers (redundant right before a norm): yes or no")
    )
    residual_scale: float = dataclasses.field(
        default=1.0, metadata=_cli("Residual branch multiplier (depth ** -0.5 cures the variance growth)")
    )
    branch_layers: int = dataclasses.field(
        default=1,
        metadata=_cli(
            "Weight layers per residual branch; 2 or more make pre-activation branches, as Fixup needs "
            "(needs skip residual, kind mlp or cnn)"
        ),
    )
    cell: str = dataclasses.field(
        default="rnn", metadata=_cli("Recurrent cell for kind rnn (rnn: Elman, tanh or relu)", choices=CELLS)
    )
    seq_len: int = dataclasses.field(
        default=20,
        metadata=_cli(
            "Sequence length: time steps for kind rnn, tokens for kind transformer (and for probe --model with "
            "--input-dtype long)",
            from_data=True,
        ),
    )
    image_size: int = dataclasses.field(default=8, metadata=_cli("Input height and width for kind cnn", from_data=True))
    norm_groups: int = dataclasses.field(default=8, metadata=_cli("Groups for group norm (must divide the width)"))
    heads: int = dataclasses.field(default=4, metadata=_cli("Attention heads for kind transformer (divide the width)"))
    vocab: int = dataclasses.field(
        default=64,
        metadata=_cli(
            "Token vocabulary (inputs and outputs) for kind transformer (and for probe --model with --input-dtype "
            "long)",
            from_data=True,
        ),
    )
    residual: str = dataclasses.field(
        default="plain",
        metadata=_cli(
            "How a transformer block adds its sublayers to the stream (plain: x + f(x); deepnorm: "
            "LN(alpha x + f(x)), Wang et al. 2022; rezero: x + g f(x) with a zero-initialized gate g and no norm, "
            "Bachlechner et al. 2020; skipinit: the same gate keeping the norm, De and Smith 2020)",
            choices=RESIDUALS,
        ),
    )
    parametrization: str = dataclasses.field(
        default="standard",
        metadata=_cli(
            "standard, or mup (kind mlp or transformer): the maximal-update parametrization for Adam (Yang et al. "
            "2021, Table 3: a zero-initialized head, learning rate lr * base_width / width for the hidden layers and "
            "the head, and for a transformer attention logits scaled by 1/head_dim)",
            choices=PARAMETRIZATIONS,
        ),
    )
    base_width: int = dataclasses.field(
        default=64, metadata=_cli("mup's base width: where its learning rates equal the standard ones")
    )
    qk_norm: bool = dataclasses.field(
        default=False,
        metadata=_cli("Normalize queries and keys per head before attention (Dehghani et al. 2023): yes or no"),
    )

    def __post_init__(self) -> None:
        def choose(field: str, accepted) -> None:
            object.__setattr__(self, field, check_choice(f"NetSpec.{field}", getattr(self, field), accepted))

        choose("kind", KINDS)
        transformer = self.kind == "transformer"
        if self.activation is None:
            object.__setattr__(self, "activation", {"rnn": "tanh", "transformer": "gelu"}.get(self.kind, "relu"))
        choose("activation", ACTIVATIONS)
        choose("residual", RESIDUALS)
        if self.init is None:
            object.__setattr__(self, "init", "glorot_uniform" if transformer else "he_uniform")
        if self.norm is None:
            unnormalized = self.residual == "rezero" or self.init == "t_fixup"
            object.__setattr__(self, "norm", "layer" if transformer and not unnormalized else "none")
        if self.norm_position is None:
            position = ("post" if self.residual == "deepnorm" else "pre") if transformer else "before"
            object.__setattr__(self, "norm_position", position)
        choose("norm", NORMS)
        choose("norm_position", NORM_POSITIONS)
        choose("skip", SKIPS)
        choose("cell", CELLS)
        choose("parametrization", PARAMETRIZATIONS)
        if self.parametrization == "mup" and (self.kind not in ("mlp", "transformer") or self.skip == "dense"):
            raise ValueError(
                "NetSpec.parametrization='mup' is built for kind 'mlp' (without dense skips) and 'transformer'; for "
                "other kinds use the standard parametrization."
            )
        for field in (
            "depth",
            "width",
            "in_features",
            "out_features",
            "seq_len",
            "image_size",
            "norm_groups",
            "branch_layers",
            "heads",
            "vocab",
            "base_width",
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NetSpec.{field} must be a positive integer; got {value!r}.")
        if not isinstance(self.bias, bool):
            raise ValueError(f"NetSpec.bias must be True or False; got {self.bias!r}.")
        if not (isinstance(self.residual_scale, (int, float)) and math.isfinite(self.residual_scale)):
            raise ValueError(f"NetSpec.residual_scale must be a finite number; got {self.residual_scale!r}.")
        if not isinstance(self.qk_norm, bool):
            raise ValueError(f"NetSpec.qk_norm must be True or False; got {self.qk_norm!r}.")
        if transformer:
            self._check_transformer()
        else:
            self._check_not_transformer()
        if self.init not in TRANSFORMER_INITS:
            get_init(self.init)  # raises, listing the registry's names, on an unknown scheme
        if self.norm == "group" and self.width % self.norm_groups:
            raise ValueError(
                f"NetSpec.norm_groups ({self.norm_groups}) must divide NetSpec.width ({self.width}) for group norm."
            )
        if self.kind == "mlp" and self.norm == "instance":
            raise ValueError(
                "NetSpec.norm='instance' needs spatial positions to average over; an mlp has none. "
                "Use kind='cnn', or norm='layer' or 'batch'."
            )
        if self.branch_layers > 1 and (self.skip != "residual" or self.kind == "rnn"):
            raise ValueError(
                "NetSpec.branch_layers > 1 describes residual branches: "
                "it needs skip='residual' and kind 'mlp' or 'cnn'."
            )
        if self.kind == "rnn":
            if self.norm not in ("none", "layer"):
                raise ValueError(f"NetSpec.norm for kind='rnn' must be none or layer; got {self.norm!r}.")
            accepted = ("tanh", "relu") if self.cell == "rnn" else ("tanh",)
            if self.activation not in accepted:
                raise ValueError(
                    f"NetSpec.activation for the {self.cell} cell must be one of {', '.join(accepted)} "
                    f"(LSTM and GRU have fixed sigmoid gates and tanh candidates); got {self.activation!r}."
                )

    def _check_transformer(self) -> None:
        if self.norm not in ("none", "layer", "rms"):
            raise ValueError(f"NetSpec.norm for kind='transformer' must be none, layer or rms; got {self.norm!r}.")
        if self.norm_position not in ("pre", "post"):
            raise ValueError(
                f"NetSpec.norm_position for kind='transformer' is pre or post (the residual addition's side); "
                f"got {self.norm_position!r}."
            )
        if self.skip != "none" or self.branch_layers != 1:
            raise ValueError(
                "A transformer's blocks are residual by construction: leave NetSpec.skip and branch_layers at "
                "their defaults and choose NetSpec.residual (plain, deepnorm, rezero or skipinit)."
            )
        if self.width % self.heads:
            raise ValueError(f"NetSpec.heads ({self.heads}) must divide NetSpec.width ({self.width}).")
        if self.residual == "deepnorm" and (self.norm == "none" or self.norm_position != "post"):
            raise ValueError(
                "NetSpec.residual='deepnorm' is a post-norm recipe, x <- LN(alpha x + f(x)) (Wang et al. 2022): "
                "it needs norm layer or rms and norm_position post."
            )
        if self.init == "t_fixup" and (self.norm != "none" or self.residual != "plain"):
            raise ValueError(
                "NetSpec.init='t_fixup' replaces layer normalization (Huang et al. 2020): it needs norm none and "
                "residual plain."
            )

    def _check_not_transformer(self) -> None:
        if self.norm_position not in ("before", "after"):
            raise ValueError(
                f"NetSpec.norm_position for kind={self.kind!r} is before or after the activation; got "
                f"{self.norm_position!r} (pre and post are for kind transformer)."
            )
        if self.norm == "rms" and self.kind == "cnn":
            raise ValueError("NetSpec.norm='rms' normalizes features; for kind='cnn' use layer, group or batch.")
        for field, default in (("residual", "plain"), ("qk_norm", False)):
            if getattr(self, field) != default:
                raise ValueError(f"NetSpec.{field} is an option of kind='transformer'; got kind={self.kind!r}.")
        if self.init in TRANSFORMER_INITS:
            raise ValueError(
                f"NetSpec.init={self.init!r} is a transformer recipe; for kind={self.kind!r} use a registry scheme "
                "(see `steadygrad inits`)."
            )

    def example_batch(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A random (inputs, targets) batch of this network's shapes: N(0, 1) features and class targets, or for
        a transformer uniform token ids (N, seq_len) and next-token targets (the inputs shifted by one)."""
        if self.kind == "transformer":
            tokens = torch.randint(0, self.vocab, (batch, self.seq_len + 1), generator=generator)
            return tokens[:, :-1], tokens[:, 1:]
        x = torch.randn(batch, *self.input_shape, generator=generator)
        return x, torch.randint(0, self.out_features, (batch,), generator=generator)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example: (in_features,), (C, H, W), (seq_len, in_features) or (seq_len,) tokens."""
        if self.kind == "transformer":
            return (self.seq_len,)
        if self.kind == "cnn":
            return (self.in_features, self.image_size, self.image_size)
        if self.kind == "rnn":
            return (self.seq_len, self.in_features)
        return (self.in_features,)

    def replace(self, **changes) -> NetSpec:
        """A copy with some fields changed (validated again). A field whose default depends on others (activation,
        norm, norm_position, init) and that holds that default follows the copy's: a pre-LN transformer replaced
        with ``residual="deepnorm"`` becomes post-LN, with ``init="t_fixup"`` loses its norms."""
        following = {
            name: None
            for name in _PER_KIND_DEFAULTS
            if name not in changes and getattr(self, name) == getattr(dataclasses.replace(self, **{name: None}), name)
        }
        return dataclasses.replace(self, **following, **changes)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if not isinstance(self.init, str):
            out["init"] = getattr(self.init, "__name__", repr(self.init))
        return out

    def label(self) -> str:
        """A short human label: ``mlp-50x256 tanh glorot_uniform``, plus norm and skip when present."""
        init = self.init if isinstance(self.init, str) else getattr(self.init, "__name__", "custom")
        kind = self.kind if self.kind != "rnn" else f"{self.cell}-T{self.seq_len}"
        parts = [f"{kind}-{self.depth}x{self.width}", self.activation, init]
        if self.kind == "transformer":
            parts[0] += f"h{self.heads}"
            parts += [f"{self.norm}norm-{self.norm_position}" if self.norm != "none" else "nonorm"]
            parts += [self.residual] if self.residual != "plain" else []
            parts += ["qknorm"] if self.qk_norm else []
            return " ".join(parts)
        if self.norm != "none":
            parts.append(f"{self.norm}norm-{self.norm_position}")
        if self.skip != "none":
            parts.append(self.skip)
        return " ".join(parts)


class _Recurrent(nn.Module):
    """One recurrent layer returning only its output sequence (N, T, H), so it composes like a block."""

    def __init__(self, spec: NetSpec, in_features: int) -> None:
        super().__init__()
        kwargs = {
            "input_size": in_features,
            "hidden_size": spec.width,
            "bias": spec.bias,
            "batch_first": True,
        }
        if spec.cell == "rnn":
            self.rnn = nn.RNN(nonlinearity=spec.activation, **kwargs)
        else:
            self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[spec.cell](**kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


def _norm(spec: NetSpec) -> nn.Module:
    width = spec.width
    if spec.kind == "cnn":
        return {
            "batch": lambda: BatchNorm2d(width),
            "layer": lambda: GroupNorm(1, width),  # layer norm over (C, H, W), per-channel affine
            "group": lambda: GroupNorm(spec.norm_groups, width),
            "instance": lambda: InstanceNorm2d(width, affine=True),
        }[spec.norm]()
    return {
        "batch": lambda: BatchNorm1d(width),
        "layer": lambda: LayerNorm(width),
        "group": lambda: GroupNorm(spec.norm_groups, width),
        "rms": lambda: RMSNorm(width),
    }[spec.norm]()


def _weight_layer(spec: NetSpec, in_features: int) -> nn.Module:
    if spec.kind == "cnn":
        return nn.Conv2d(in_features, spec.width, 3, padding=1, bias=spec.bias)
    return nn.Linear(in_features, spec.width, bias=spec.bias)


def _preactivation_branch(spec: NetSpec) -> nn.Sequential:
    """(norm -> activation -> layer) x branch_layers: a branch that ends in a weight layer, as in the
    pre-activation ResNet (He et al. 2016), which is what Fixup's zero-initialized last layer needs."""
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    for i in range(1, spec.branch_layers + 1):
        if spec.norm != "none":
            parts[f"norm{i}"] = _norm(spec)
        parts[f"act{i}"] = ACTIVATIONS[spec.activation]()
        parts[f"linear{i}" if spec.kind == "mlp" else f"conv{i}"] = _weight_layer(spec, spec.width)
    return nn.Sequential(parts)


def _block(spec: NetSpec, in_features: int) -> nn.Sequential:
    """layer -> norm -> activation (norm_position "before") or layer -> activation -> norm ("after")."""
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    if spec.kind == "rnn":
        parts["rnn"] = _Recurrent(spec, in_features)
        if spec.norm != "none":
            parts["norm"] = _norm(spec)
        return nn.Sequential(parts)
    parts["conv" if spec.kind == "cnn" else "linear"] = _weight_layer(spec, in_features)
    activation = ("act", ACTIVATIONS[spec.activation]())
    norm = ("norm", _norm(spec)) if spec.norm != "none" else None
    ordered = [norm, activation] if spec.norm_position == "before" else [activation, norm]
    parts.update(item for item in ordered if item is not None)
    return nn.Sequential(parts)


def _mup_param_groups(net: nn.Module, lr: float, width_fan_in: list[nn.Parameter]) -> list[dict]:
    """Parameter groups at ``lr``, with μP's rates for Adam when ``net.spec.parametrization == "mup"``.

    μP (Yang et al. 2021, "Tensor Programs V", Table 3; microsoft/mup's ``MuAdam``): a weight whose fan-in grows
    with the width (hidden and output layers) learns at ``lr * base_width / width``, so that its update moves the
    next layer's pre-activations by O(1) at any width; input weights (fan-in fixed by the data or the vocabulary),
    biases and norm gains keep ``lr``. At ``width == base_width`` both groups equal the standard ``lr``.
    """
    trainable = [p for p in net.parameters() if p.requires_grad]
    if net.spec.parametrization != "mup":
        return [{"params": trainable, "lr": lr}]
    scaled_ids = {id(p) for p in width_fan_in if p.requires_grad}
    plain = [p for p in trainable if id(p) not in scaled_ids]
    scaled = [p for p in trainable if id(p) in scaled_ids]
    return [{"params": plain, "lr": lr}, {"params": scaled, "lr": lr * net.spec.base_width / net.spec.width}]


class DeepNet(nn.Module):
    """The network ``build`` returns: ``block01`` ... ``blockNN`` then ``head``.

    - skip "none": x -> block01 -> ... -> blockNN -> head.
    - skip "residual": block01 maps the input to ``width``; then x <- x + residual_scale * block(x). With
      ``branch_layers`` >= 2 each later block is a pre-activation branch (norm -> act -> layer) x m.
    - skip "dense" (DenseNet, Huang et al. 2017): each block, and the head, receives the concatenation
      of the input and every earlier block's output along the feature axis.
    """

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        self._cat_dim = -1 if spec.kind == "rnn" else 1
        digits = max(2, len(str(spec.depth)))  # block01 ... block50: names sort in depth order
        for i in range(spec.depth):
            if spec.skip == "dense":
                in_features = spec.in_features + i * spec.width
            else:
                in_features = spec.in_features if i == 0 else spec.width
            preactivation = spec.skip == "residual" and spec.branch_layers > 1 and i > 0
            block = _preactivation_branch(spec) if preactivation else _block(spec, in_features)
            self.add_module(f"block{i + 1:0{digits}d}", block)
        head_in = spec.in_features + spec.depth * spec.width if spec.skip == "dense" else spec.width
        head = nn.Linear(head_in, spec.out_features)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), head) if spec.kind == "cnn" else head

    @property
    def blocks(self) -> list[nn.Module]:
        return [m for name, m in self.named_children() if name.startswith("block")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.blocks
        if self.spec.skip == "dense":
            features = [x]
            for block in blocks:
                features.append(block(torch.cat(features, dim=self._cat_dim)))
            x = torch.cat(features, dim=self._cat_dim)
        elif self.spec.skip == "residual":
            x = blocks[0](x)
            for block in blocks[1:]:
                x = x + self.spec.residual_scale * block(x)
        else:
            for block in blocks:
                x = block(x)
        if self.spec.kind == "rnn":
            x = x[:, -1]  # the last time step
        return self.head(x)

    def steadygrad_param_groups(self, lr: float) -> list[dict]:
        """The optimizer's parameter groups at learning rate ``lr``: one group, or under ``parametrization="mup"``
        μP's per-layer rates for Adam (``_mup_param_groups``): the weights whose fan-in is the width (hidden layers
        and the head) at ``lr * base_width / width``; the input layer's weight, the biases and the norms' at ``lr``."""
        input_layer = {id(m) for m in self.blocks[0].modules()}  # its fan-in is the data's, not the width
        hidden = [
            m.weight
            for m in self.modules()
            if isinstance(m, nn.Linear) and m.in_features == self.spec.width and id(m) not in input_layer
        ]
        return _mup_param_groups(self, lr, hidden)

    def steadygrad_structure(self) -> Structure:
        """This network's description for the remedies and instruments (``steadygrad.structure``)."""
        spec, blocks = self.spec, self.blocks
        plain_mlp = spec.kind == "mlp" and spec.skip == "none"
        return Structure(
            label=spec.label(),
            kind=spec.kind,
            skip=spec.skip,
            normalized=spec.norm != "none",
            blocks=list(self.named_children()),
            branches=blocks[1:] if spec.skip == "residual" else [],
            chain=[(block.linear, block.act) for block in blocks] if plain_mlp else [],
            head=self.head,
            spec=spec,
        )

    def extra_repr(self) -> str:
        return f"spec: {self.spec.label()}"


class ResidualGate(nn.Module):
    """y = alpha * x with one learned scalar alpha, zero at initialization: the residual gate of ReZero
    (Bachlechner et al. 2020) and SkipInit (De and Smith 2020). At init every block is the identity, so the
    signal and the gradient pass through a stack of any depth unchanged, and each block grows into use."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * x


class TransformerBlock(nn.Module):
    """One decoder block: causal self-attention then an MLP (width -> 4 width -> width), each a residual sublayer.

    With f a sublayer (``attn`` or ``mlp``), by ``spec.residual`` and ``spec.norm_position``:

    - plain, pre-norm (GPT-2; Xiong et al. 2020): x <- x + f(norm(x));
    - plain, post-norm (Vaswani et al. 2017): x <- norm(x + f(x));
    - deepnorm (Wang et al. 2022): x <- norm(alpha x + f(x)), alpha = (2 N)^(1/4) for N blocks, with the
      weights of v, the output projection and the MLP scaled by beta = (8 N)^(-1/4) at initialization;
    - rezero / skipinit: x <- x + g f(x) (pre-norm: x + g f(norm(x)); post-norm: norm(x + g f(x))), g a
      ``ResidualGate`` starting at 0.

    Children: ``norm1``, ``attn``, ``norm2``, ``mlp`` (``fc1``, ``act``, ``fc2``), and with a gate
    ``attn_gate`` and ``mlp_gate``. Without normalization the norms are absent, not identities.
    """

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        width = spec.width
        self.pre = spec.norm_position == "pre"
        self.alpha = (2 * spec.depth) ** 0.25 if spec.residual == "deepnorm" else 1.0
        normed = spec.norm != "none"
        if normed:
            self.norm1 = _norm(spec)
        # μP scales the logits by 1/head_dim (q and k become correlated in training, so q.k grows like head_dim),
        # times sqrt(base head_dim) so that at the base width it equals the standard 1/sqrt(head_dim)
        head_dim, base_head_dim = width / spec.heads, spec.base_width / spec.heads
        scale = base_head_dim**0.5 / head_dim if spec.parametrization == "mup" else None
        self.attn = CausalSelfAttention(
            width,
            spec.heads,
            bias=spec.bias,
            qk_norm=spec.qk_norm and ("rms" if spec.norm == "rms" else "layer"),
            scale=scale,
        )
        if normed:
            self.norm2 = _norm(spec)
        self.mlp = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(width, 4 * width, bias=spec.bias),
                act=ACTIVATIONS[spec.activation](),
                fc2=nn.Linear(4 * width, width, bias=spec.bias),
            )
        )
        if spec.residual in ("rezero", "skipinit"):
            self.attn_gate, self.mlp_gate = ResidualGate(), ResidualGate()

    def _sublayer(self, x: torch.Tensor, f: nn.Module, norm: str, gate: str) -> torch.Tensor:
        norm, gate = getattr(self, norm, None), getattr(self, gate, None)
        if self.pre:
            branch = f(norm(x) if norm is not None else x)
            return x + (gate(branch) if gate is not None else branch)
        branch = f(x)
        out = self.alpha * x + (gate(branch) if gate is not None else branch)
        return norm(out) if norm is not None else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._sublayer(x, self.attn, "norm1", "attn_gate")
        return self._sublayer(x, self.mlp, "norm2", "mlp_gate")


class TransformerNet(nn.Module):
    """The causal language model ``build`` returns for ``kind="transformer"``: token ids (N, T) in, next-token
    logits (N, T, vocab) out.

    Children in forward order: ``embed`` (token embedding), ``pos_embed`` (learned positions), ``block01`` ...
    ``blockNN`` (``TransformerBlock``), ``norm`` (the final norm, pre-norm stacks only, as GPT-2's ``ln_f``),
    ``head`` (Linear to the vocabulary, untied).
    """

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab, spec.width)
        self.pos_embed = nn.Embedding(spec.seq_len, spec.width)
        digits = max(2, len(str(spec.depth)))
        for i in range(spec.depth):
            self.add_module(f"block{i + 1:0{digits}d}", TransformerBlock(spec))
        if spec.norm != "none" and spec.norm_position == "pre":
            self.norm = _norm(spec)
        self.head = nn.Linear(spec.width, spec.vocab)

    @property
    def blocks(self) -> list[nn.Module]:
        return [m for name, m in self.named_children() if name.startswith("block")]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError(
                f"A built transformer takes token ids of shape (batch, sequence), integers below vocab "
                f"{self.spec.vocab}; got a {tokens.dtype} tensor of shape {tuple(tokens.shape)}."
            )
        if tokens.shape[1] > self.spec.seq_len:
            raise ValueError(
                f"The sequence ({tokens.shape[1]} tokens) is longer than the positions the net was built for "
                f"(seq_len {self.spec.seq_len}); build it with a larger seq_len."
            )
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos_embed(positions)
        for block in self.blocks:
            x = block(x)
        norm = getattr(self, "norm", None)
        return self.head(norm(x) if norm is not None else x)

    def steadygrad_param_groups(self, lr: float) -> list[dict]:
        """The optimizer's parameter groups at ``lr``; under ``parametrization="mup"`` the attention and MLP matrices
        and the head learn at ``lr * base_width / width`` and the embeddings, biases and norms at ``lr``
        (``_mup_param_groups``)."""
        hidden = [
            layer.weight
            for b in self.blocks
            for layer in (b.attn.q_proj, b.attn.k_proj, b.attn.v_proj, b.attn.out_proj, b.mlp.fc1, b.mlp.fc2)
        ]
        return _mup_param_groups(self, lr, [*hidden, self.head.weight])

    def steadygrad_structure(self) -> Structure:
        """This network's description for the remedies and instruments (``steadygrad.structure``)."""
        spec = self.spec
        return Structure(
            label=spec.label(),
            kind="transformer",
            skip="residual",
            normalized=spec.norm != "none",
            blocks=list(self.named_children()),
            head=self.head,
            spec=spec,
        )

    def extra_repr(self) -> str:
        return f"spec: {self.spec.label()}"


def _scale_(weights, factor: float) -> None:
    with torch.no_grad():
        for weight in weights:
            weight.mul_(factor)


def _transformer_init(net: TransformerNet, generator: torch.Generator | None) -> None:
    """Initialize a built transformer by its spec: a registry scheme on every weight layer, or one of the recipes.

    - a registry scheme (``init_model``): embeddings N(0, 1), as torch's ``nn.Embedding``; then for deepnorm the
      weights of v, the output projection and both MLP layers are multiplied by beta = (8 N)^(-1/4) (Wang et al.
      2022, decoder-only; with ``glorot_normal`` this is the paper's ``xavier_normal_(w, gain=beta)``).
    - ``small_init`` (Nguyen and Salazar 2019, "Transformers without Tears"): every weight N(0, 2 / (5 d)), d the
      model width, embeddings included.
    - ``t_fixup`` (Huang et al. 2020, decoder): Xavier uniform on every linear layer, embeddings N(0, d^(-1/2));
      then v, the output projections, the MLP weights and the embeddings are scaled by (9 N)^(-1/4).
    """
    spec = net.spec
    blocks = net.blocks
    embeddings = [net.embed.weight, net.pos_embed.weight]
    scaled = [
        w for b in blocks for w in (b.attn.v_proj.weight, b.attn.out_proj.weight, b.mlp.fc1.weight, b.mlp.fc2.weight)
    ]
    if spec.init == "small_init":
        std = math.sqrt(2 / (5 * spec.width))
        init_model(net, functools.partial(nn.init.normal_, mean=0.0, std=std), generator=generator, embedding=std)
        return
    if spec.init == "t_fixup":
        init_model(net, "glorot_uniform", generator=generator, embedding=spec.width**-0.5)
        _scale_(scaled + embeddings, (9 * spec.depth) ** -0.25)
        return
    init_model(net, spec.init, generator=generator)
    if spec.residual == "deepnorm":
        _scale_(scaled, (8 * spec.depth) ** -0.25)


def build(spec: NetSpec, generator: torch.Generator | None = None) -> DeepNet | TransformerNet:
    """Build the network ``spec`` describes and initialize it with ``spec.init`` (biases zero).

    Args:
        spec: the network's description.
        generator: random source for the weights; a seeded generator makes the build reproducible.

    Example:
        >>> net = build(NetSpec(depth=4, width=32, in_features=10, activation="tanh", skip="dense"))
        >>> net(torch.randn(8, 10)).shape
        torch.Size([8, 10])
    """
    if not isinstance(spec, NetSpec):
        raise TypeError(f"build takes a NetSpec; got {type(spec).__name__}.")
    if spec.kind == "transformer":
        net = TransformerNet(spec)
        _transformer_init(net, generator)
    else:
        net = DeepNet(spec)
        init_model(net, spec.init, generator=generator)
    if spec.parametrization == "mup":
        with torch.no_grad():
            net.head.weight.zero_()  # μP's output layer starts at 0 (Yang et al. 2021, Table 3 and its D.2)
    return net


def spec_cli_options() -> list[tuple[str, dataclasses.Field, SpecOption]]:
    """(option name, field, its SpecOption) for every NetSpec field the command line offers, in field order."""
    out = []
    for f in dataclasses.fields(NetSpec):
        option = f.metadata.get("option")
        if option is not None:
            out.append((option.name or f.name.replace("_", "-"), f, option))
    return out


# option name -> NetSpec field; the option names users type (generated from the fields' SpecOption)
SPEC_OPTIONS = {name: f.name for name, f, _ in spec_cli_options()}
_OPTION_NAMES = {field: option for option, field in SPEC_OPTIONS.items()}
# the fields' real types (the module's annotations are strings: ``from __future__ import annotations``)
_FIELD_TYPES = typing.get_type_hints(NetSpec)
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _convert(option: str, text: str):
    """One comma-separated item of ``--option`` as the value its field's type needs (int, float, bool, str)."""
    kind = _FIELD_TYPES[SPEC_OPTIONS[option]]
    text = text.strip()
    if kind is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"--{option} takes yes or no (or true/false), comma-separated; got {text!r}.")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(
                f"--{option} takes {'integers' if kind is int else 'numbers'}, comma-separated; got {text!r}."
            ) from None
    return text


def spec_options(parameters: dict) -> dict[str, str | None]:
    """The spec options among a command's parameters (``locals()``), keyed by their option names:
    ``norm_position`` becomes ``norm-position``; parameters that are not spec options are left out."""
    options = {name.replace("_", "-"): value for name, value in parameters.items()}
    return {option: value for option, value in options.items() if option in SPEC_OPTIONS}


def expand_specs(values: dict[str, str | None]) -> list[NetSpec]:
    """Every combination of the comma-separated option values, as validated NetSpecs.

    ``values`` maps option names (``"act"``) to their raw text (``"relu,tanh"``) or None for the default.
    An unknown option name, a value of the wrong type or a spec NetSpec rejects raises ValueError naming
    the option as the user typed it.
    """
    unknown = [option for option in values if option not in SPEC_OPTIONS]
    if unknown:
        raise ValueError(
            f"Unknown network option {', '.join(repr(o) for o in unknown)}. Accepted: {', '.join(SPEC_OPTIONS)}."
        )
    axes = []
    for option, raw in values.items():
        if raw is None:
            continue
        items = [item for item in raw.split(",") if item.strip()]
        if not items:
            raise ValueError(f"--{option} got no value.")
        axes.append([(SPEC_OPTIONS[option], _convert(option, item)) for item in items])
    specs = []
    for combination in itertools.product(*axes):
        try:
            specs.append(NetSpec(**dict(combination)))
        except ValueError as error:
            # NetSpec names its fields (NetSpec.activation); the user typed options (--act)
            message = re.sub(r"NetSpec\.(\w+)", lambda m: f"--{_OPTION_NAMES.get(m[1], m[1])}", str(error))
            raise ValueError(message) from None
    return specs
