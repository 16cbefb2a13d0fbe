"""Initialize a whole model: every Linear, ConvNd and RNN/LSTM/GRU weight, matched to its activation."""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from functools import partial

import torch
from torch import nn

from steadygrad import kinds
from steadygrad.init.fans import NONLINEARITIES, fans
from steadygrad.init.registry import Initializer, get

__all__ = ["LayerInit", "init_model", "mean_field_", "next_activation"]

# What init_model initializes: the affine layers and recurrent ones (embeddings keep their own schemes)
_INITIALIZED = ("dense", "conv", "recurrent")
_GATES = {nn.LSTM: 4, nn.GRU: 3}


@dataclass(frozen=True)
class LayerInit:
    """What ``init_model`` did to one parameter."""

    layer: str  # module name in model.named_modules()
    kind: str  # module class, e.g. "Linear"
    param: str  # parameter name, e.g. "weight" or "weight_hh_l0"
    shape: tuple[int, ...]
    fan_in: int | None  # per gate for recurrent weights; None for biases
    fan_out: int | None
    nonlinearity: str | None  # passed to the scheme; None: the scheme's default (or it takes none)
    std: float  # measured after initialization

    def to_dict(self) -> dict:
        return asdict(self)


def _accepts(fn: Initializer, name: str) -> bool:
    if isinstance(fn, partial) and name in fn.keywords:
        return False  # the user fixed it in the partial: keep their choice
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def next_activation(model: nn.Module) -> dict[str, tuple[str, float | None]]:
    """For each weight layer, the activation that follows it in registration order.

    A heuristic over ``model.named_modules()`` (which follows the order modules were assigned, the order
    of execution in ``nn.Sequential`` and in most hand-written models): the first activation module met
    after a layer, skipping normalizations and dropout; ``("linear", None)`` when another weight layer or
    the end comes first. Activations applied functionally in ``forward`` (``F.relu``) are invisible to it.
    """
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children()) or isinstance(m, nn.RNNBase)]
    found: dict[str, tuple[str, float | None]] = {}
    for index, (name, module) in enumerate(leaves):
        if not kinds.is_weight_layer(module, *_INITIALIZED):
            continue
        if isinstance(module, nn.RNNBase):
            found[name] = (getattr(module, "nonlinearity", "tanh"), None)  # LSTM/GRU candidates use tanh
            continue
        found[name] = ("linear", None)
        for _, after in leaves[index + 1 :]:
            if kinds.is_weight_layer(after, *_INITIALIZED):
                break
            gain = _gain_of(after)
            if gain is not None:
                found[name] = gain
                break
    return found


def _gain_of(module: nn.Module) -> tuple[str, float | None] | None:
    """(nonlinearity, parameter) of an activation whose gain calculate_gain knows; None for anything else."""
    kind = kinds.activation(module)
    return None if kind is None else kind.gain_of(module)


def _has_activation_modules(model: nn.Module) -> bool:
    return any(_gain_of(m) is not None and kinds.activation(m).family != "linear" for m in model.modules())


@torch.no_grad()
def init_model(
    model: nn.Module,
    scheme: str | Initializer,
    nonlinearity: str = "auto",
    *,
    bias: float | None = 0.0,
    recurrent: str | Initializer | None = None,
    generator: torch.Generator | None = None,
) -> list[LayerInit]:
    """Initialize every Linear, ConvNd and RNN/LSTM/GRU weight of ``model`` in place.

    Args:
        model: any module; other parameters (norms, embeddings, custom ones) are left as they are.
        scheme: a registry name (``steadygrad.init.available()``), a callable or a partial.
        nonlinearity: passed to schemes that take one (He). ``"auto"`` uses the activation that follows
            each layer (``next_activation``), ``"linear"`` for a layer followed by none (the output layer);
            in a model with no activation modules at all (functional activations) the scheme's own
            default is kept. Any name of ``NONLINEARITIES`` applies that one to every layer.
        bias: value for every bias of those layers (0 by default); ``None`` leaves biases untouched.
        recurrent: scheme for RNN hidden-to-hidden weights (e.g. ``"orthogonal"``); default ``scheme``.
            Gates stacked in one recurrent weight (LSTM: 4, GRU: 3) are initialized one gate at a time,
            each with its own fans.
        generator: random source, for a reproducible initialization.

    Returns:
        One ``LayerInit`` per initialized parameter, in model order.

    Example:
        >>> net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
        >>> [r.nonlinearity for r in init_model(net, "he_normal") if r.param == "weight"]
        ['relu', 'linear']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"init_model needs an nn.Module; got {type(model).__name__}.")
    fn = get(scheme)
    fn_recurrent = fn if recurrent is None else get(recurrent)
    if nonlinearity == "auto":
        detected = next_activation(model) if _has_activation_modules(model) else {}
    elif nonlinearity in NONLINEARITIES:
        detected = {name: (nonlinearity, None) for name, _ in model.named_modules()}
    else:
        raise ValueError(f"Unknown nonlinearity {nonlinearity!r}. Accepted: auto, {', '.join(NONLINEARITIES)}.")

    records: list[LayerInit] = []
    for name, module in model.named_modules():
        if not kinds.is_weight_layer(module, *_INITIALIZED):
            continue
        act, act_param = detected.get(name, (None, None))
        gates = _GATES.get(type(module), 1)
        for param_name, param in module.named_parameters(recurse=False):
            if param_name.startswith("bias"):
                if bias is not None:
                    param.fill_(bias)
                    records.append(
                        LayerInit(
                            name,
                            type(module).__name__,
                            param_name,
                            tuple(param.shape),
                            None,
                            None,
                            None,
                            float(param.std()) if param.numel() > 1 else 0.0,
                        )
                    )
                continue
            this_fn = fn_recurrent if param_name.startswith("weight_hh") else fn
            # weight_hr (LSTM projection) holds one matrix, not stacked gates
            n_gates = gates if param_name.startswith(("weight_ih", "weight_hh")) else 1
            kwargs = {}
            if act is not None and _accepts(this_fn, "nonlinearity"):
                kwargs["nonlinearity"] = act
                if act_param is not None and _accepts(this_fn, "param"):
                    kwargs["param"] = act_param
            if generator is not None and _accepts(this_fn, "generator"):
                kwargs["generator"] = generator
            for gate in param.chunk(n_gates, dim=0):
                this_fn(gate, **kwargs)
            fan_in, fan_out = fans(param, gates=n_gates)
            records.append(
                LayerInit(
                    name,
                    type(module).__name__,
                    param_name,
                    tuple(param.shape),
                    fan_in,
                    fan_out,
                    kwargs.get("nonlinearity"),
                    float(param.std()),
                )
            )
    return records


@torch.no_grad()
def mean_field_(
    model: nn.Module, sigma_w2: float, sigma_b2: float = 0.0, generator: torch.Generator | None = None
) -> nn.Module:
    """The mean-field papers' parametrization: every Linear weight ~ N(0, sigma_w^2 / fan_in) and bias
    ~ N(0, sigma_b^2) (Poole et al. 2016; Schoenholz et al. 2017), so ``steadygrad.theory`` applies.

    Example: ``mean_field_(net, theory.critical_sigma_w2(0.05, "tanh"), 0.05)`` puts a tanh MLP at the edge
    of chaos.
    """
    if sigma_w2 < 0 or sigma_b2 < 0:
        raise ValueError(f"sigma_w2 and sigma_b2 are variances, >= 0; got {sigma_w2} and {sigma_b2}.")
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, (sigma_w2 / module.in_features) ** 0.5, generator=generator)
            if module.bias is not None:
                module.bias.normal_(0.0, sigma_b2**0.5, generator=generator)
    return model
