"""Initialize a whole model: every weight layer (Linear, ConvNd, RNN/LSTM/GRU, HF Conv1D, embeddings and
unregistered modules owning a weight matrix), matched to its activation; tied parameters once."""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass
from functools import partial

import torch
from torch import nn

from steadygrad import kinds
from steadygrad.init.fans import NONLINEARITIES, fans
from steadygrad.init.registry import Initializer, get

__all__ = ["InitRecords", "InitSkip", "LayerInit", "init_model", "mean_field_", "next_activation"]

# The families the scheme initializes: the affine layers and recurrent ones. Embeddings have their own rule.
_INITIALIZED = ("dense", "conv", "recurrent")
_GATES = {nn.LSTM: 4, nn.GRU: 3}


@dataclass(frozen=True)
class LayerInit:
    """What ``init_model`` did to one parameter."""

    layer: str  # module name in model.named_modules()
    kind: str  # module class, e.g. "Linear"
    param: str  # parameter name, e.g. "weight" or "weight_hh_l0"
    shape: tuple[int, ...]
    fan_in: int | None  # per gate for recurrent weights; the true fans for transposed layouts; None for biases
    fan_out: int | None
    nonlinearity: str | None  # passed to the scheme; None: the scheme's default (or it takes none)
    std: float  # measured after initialization
    rule: str = "scheme"  # "scheme", "embedding", "generic" (an unregistered module's weight) or "bias"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class InitSkip:
    """A parameter ``init_model`` left as it was, and why."""

    layer: str
    kind: str
    param: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


class InitRecords(list):
    """The ``LayerInit`` of every initialized parameter, in model order (a list, as before), and in
    ``skipped`` the ``InitSkip`` of every parameter left as it was."""

    def __init__(self, records=(), skipped=()):
        super().__init__(records)
        self.skipped: list[InitSkip] = list(skipped)


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


def _rule_of(module: nn.Module) -> str | None:
    """Which rule initializes a module's own parameters: "scheme" (a registered dense, conv or recurrent
    layer), "embedding", "generic" (an unregistered module owning a ``*weight`` of >= 2 dims), or None."""
    family = kinds.weight_family(module)
    if family in _INITIALIZED:
        return "scheme"
    if family == "embedding":
        return "embedding"
    if kinds.norm_family(module) is None and any(_is_generic_weight(n, p) for n, p in _own(module)):
        return "generic"
    return None


def _own(module: nn.Module):
    return module.named_parameters(recurse=False)


def _is_generic_weight(name: str, param: torch.Tensor) -> bool:
    return kinds.parameter_role(name) == "weight" and param.dim() >= 2


def _is_bias(name: str) -> bool:
    return kinds.parameter_role(name) == "bias"


def _draw(fn: Initializer, param: torch.Tensor, kwargs: dict, n_gates: int, layout: str) -> torch.Tensor:
    """Run the scheme on ``param`` seen in nn.Linear's layout (out, in, *kernel); returns that view's tensor,
    whose fans are the true ones.

    ``layout``: "standard" (already so: drawn in place, gate by gate), "transposed" (stored (in, out), as HF's
    Conv1D: drawn as (out, in), then transposed back) or "dense" (any shape, drawn as (shape[0],
    prod(shape[1:])): fan_in = prod(shape[1:]), fan_out = shape[0]).
    """
    if layout == "standard":
        for gate in param.chunk(n_gates, dim=0):
            fn(gate, **kwargs)
        return param
    if layout == "transposed":
        shape = (param.size(1), param.size(0), *param.shape[2:])
    else:
        shape = (param.size(0), param[0].numel())
    work = torch.empty(shape, dtype=param.dtype, device=param.device)
    fn(work, **kwargs)
    param.copy_(work.transpose(0, 1) if layout == "transposed" else work.reshape(param.shape))
    return work


def _embedding_(module: nn.Module, weight: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    """N(0, std^2), then the padding row (``padding_idx``) zeroed as torch's nn.Embedding does."""
    weight.normal_(0.0, std, generator=generator)
    padding = getattr(module, "padding_idx", None)
    if padding is not None:
        weight[padding].fill_(0.0)


@torch.no_grad()
def init_model(
    model: nn.Module,
    scheme: str | Initializer,
    nonlinearity: str = "auto",
    *,
    bias: float | None = 0.0,
    recurrent: str | Initializer | None = None,
    embedding: float | None = 1.0,
    generator: torch.Generator | None = None,
) -> InitRecords:
    """Initialize every weight layer of ``model`` in place, each parameter once.

    The rules, by module (``steadygrad.kinds`` tells the kinds apart):

    - **Linear, ConvNd, RNN/LSTM/GRU and HF transformers' Conv1D** (GPT-2's projections): ``scheme``, with
      the true fans. Conv1D stores its weight (in_features, out_features), the transpose of nn.Linear's, so
      its fan_in is ``weight.shape[0]`` (``kinds.weight_transposed``): the scheme draws the (out, in) matrix
      and it is stored transposed.
    - **Embeddings** (nn.Embedding, nn.EmbeddingBag): w ~ N(0, ``embedding``^2), 1 by default, and the
      ``padding_idx`` row zeroed. A lookup is a linear layer applied to a one-hot input: fan_in = 1, so
      every fan_in variance-preserving scheme (LeCun 1998; He et al. 2015 with a linear gain) gives Var = 1,
      which is also torch's own nn.Embedding default. GPT-2 and BERT draw N(0, 0.02^2) instead (their
      ``initializer_range``): pass ``embedding=0.02`` for that. ``None`` leaves embeddings as they are.
    - **Any other module owning a parameter named ``*weight`` of >= 2 dims** (not a normalization): treated
      as dense, the weight seen as (shape[0], prod(shape[1:])), so fan_in = prod(shape[1:]) and fan_out =
      shape[0] (nn.Bilinear's (out, in1, in2) has fan_in = in1 x in2, the products each output sums; a
      stacked projection such as MultiheadAttention's in_proj_weight (3d, d) keeps fan_in = d). Register
      such a layer in ``kinds`` when its fans differ.
    - **Biases** of those layers are set to ``bias``. Everything else (normalization parameters, 1-d or
      non-``weight`` parameters such as a positional table named ``pos_embedding``) is left as it is.

    A parameter shared by several modules (GPT-2's ``lm_head.weight is transformer.wte.weight``) is
    initialized once, by the rule of the first module owning it in ``model.named_modules()`` order (there,
    the embedding), and never drawn again by the others.

    Args:
        model: any module.
        scheme: a registry name (``steadygrad.init.available()``), a callable or a partial.
        nonlinearity: passed to schemes that take one (He). ``"auto"`` uses the activation that follows
            each layer (``next_activation``), ``"linear"`` for a layer followed by none (the output layer);
            in a model with no activation modules at all (functional activations) the scheme's own
            default is kept. Any name of ``NONLINEARITIES`` applies that one to every layer.
        bias: value for every bias of those layers (0 by default); ``None`` leaves biases untouched.
        recurrent: scheme for RNN hidden-to-hidden weights (e.g. ``"orthogonal"``); default ``scheme``.
            Gates stacked in one recurrent weight (LSTM: 4, GRU: 3) are initialized one gate at a time,
            each with its own fans.
        embedding: the std of embedding weights; ``None`` leaves them untouched.
        generator: random source, for a reproducible initialization.

    Returns:
        ``InitRecords``: a list with one ``LayerInit`` per initialized parameter, in model order, and in
        ``.skipped`` one ``InitSkip`` (with its reason) per parameter left as it was.

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
    if embedding is not None and not (math.isfinite(embedding) and embedding >= 0):
        raise ValueError(f"embedding is the std of embedding weights, a finite number >= 0; got {embedding!r}.")

    plan = _Plan(fn, fn_recurrent, detected, bias, embedding, generator)
    records = InitRecords()
    owners: dict[int, tuple[str, bool]] = {}  # id(parameter) -> ("layer.param" of its first owner, initialized)
    for name, module in model.named_modules():
        rule = _rule_of(module)
        for param_name, param in _own(module):
            if id(param) in owners:
                owner, done = owners[id(param)]
                outcome = f"tied to {owner}, " + ("initialized there once" if done else "left as it is there too")
            else:
                outcome = _init_param(plan, name, module, rule, param_name, param)
                owners[id(param)] = (f"{name}.{param_name}" if name else param_name, not isinstance(outcome, str))
            if isinstance(outcome, str):
                records.skipped.append(InitSkip(name, type(module).__name__, param_name, outcome))
            else:
                records.append(outcome)
    return records


@dataclass(frozen=True)
class _Plan:
    """init_model's arguments, resolved."""

    fn: Initializer
    fn_recurrent: Initializer
    detected: dict[str, tuple[str, float | None]]
    bias: float | None
    embedding: float | None
    generator: torch.Generator | None


def _init_param(
    plan: _Plan, name: str, module: nn.Module, rule: str | None, param_name: str, param: nn.Parameter
) -> LayerInit | str:
    """Initialize one parameter by its module's rule: its LayerInit, or why it was left as it is."""
    if rule is None:
        return _reason_left(module, param_name, param)
    if rule == "embedding":
        if plan.embedding is None:
            return "embedding=None: embeddings left as they are"
        if param.dim() != 2:
            return f"no embedding rule for a parameter of {param.dim()} dims"
        _embedding_(module, param, plan.embedding, plan.generator)
        return _record(name, module, param_name, param, 1, param.size(1), None, "embedding")  # a lookup: fan_in 1
    if _is_bias(param_name):
        if plan.bias is None:
            return "bias=None: biases left as they are"
        param.fill_(plan.bias)
        return _record(name, module, param_name, param, None, None, None, "bias")
    if rule == "generic" and not _is_generic_weight(param_name, param):
        return f"no rule for a parameter named {param_name!r} of {param.dim()} dims (only *weight of >= 2 dims)"
    act, act_param = plan.detected.get(name, (None, None))
    fn = plan.fn_recurrent if param_name.startswith("weight_hh") else plan.fn
    kwargs = _scheme_kwargs(fn, act, act_param, plan.generator)
    # weight_hr (LSTM projection) holds one matrix, not stacked gates
    stacked = rule == "scheme" and param_name.startswith(("weight_ih", "weight_hh"))
    n_gates = _GATES.get(type(module), 1) if stacked else 1
    layout = "transposed" if kinds.weight_transposed(module) else "dense" if rule == "generic" else "standard"
    fan_in, fan_out = fans(_draw(fn, param, kwargs, n_gates, layout), gates=n_gates)
    return _record(name, module, param_name, param, fan_in, fan_out, kwargs.get("nonlinearity"), rule)


def _record(name, module, param_name, param, fan_in, fan_out, nonlinearity, rule) -> LayerInit:
    std = float(param.std()) if param.numel() > 1 else 0.0
    kind = type(module).__name__
    return LayerInit(name, kind, param_name, tuple(param.shape), fan_in, fan_out, nonlinearity, std, rule)


def _scheme_kwargs(fn: Initializer, act: str | None, act_param, generator: torch.Generator | None) -> dict:
    kwargs = {}
    if act is not None and _accepts(fn, "nonlinearity"):
        kwargs["nonlinearity"] = act
        if act_param is not None and _accepts(fn, "param"):
            kwargs["param"] = act_param
    if generator is not None and _accepts(fn, "generator"):
        kwargs["generator"] = generator
    return kwargs


def _reason_left(module: nn.Module, param_name: str, param: torch.Tensor) -> str:
    if kinds.norm_family(module) is not None:
        return "a normalization's parameter: left as it is"
    return f"no rule for a parameter named {param_name!r} of {param.dim()} dims (only *weight of >= 2 dims)"


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
