"""The rules that read the model or the inputs: symmetric units, a bias before a BatchNorm, non-centred inputs,
and the structural rules (a deep plain stack, an exposed tanh, the gradient along time)."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from steadygrad import kinds
from steadygrad.diagnose._core import (
    DEEP_WITHOUT_SKIPS,
    EXPLODING_OVER_TIME,
    NONCENTERED_NOISE,
    NONCENTERED_RATIO,
    SYMMETRY_TOLERANCE,
    Finding,
    Fix,
    vanishing_in_time,
)
from steadygrad.losses import tensors
from steadygrad.structure import describe


def _units(module: nn.Module) -> torch.Tensor:
    """The layer's weight as (units, inputs per unit); Hugging Face's ``Conv1D`` stores (in, out)."""
    weight = module.weight.detach().double()
    if weight.dim() == 2 and kinds.weight_transposed(module):
        weight = weight.T
    return weight.reshape(weight.shape[0], -1)


def _identical(rows: torch.Tensor) -> bool:
    spread = (rows - rows[:1]).abs().max()
    return float(spread) <= SYMMETRY_TOLERANCE * max(float(rows.abs().max()), 1e-12)


def _outgoing(module: nn.Module, units: int) -> torch.Tensor | None:
    """The next layer's weights grouped by the unit they read, (units, weights), when its input is ``units`` wide."""
    weight = _units(module)  # (out, in * kernel)
    groups = getattr(module, "groups", 1)
    if groups != 1 or weight.shape[1] % units:
        return None
    per_unit = weight.reshape(weight.shape[0], units, -1)  # (out, in, kernel)
    if per_unit.shape[1] != units:
        return None
    return per_unit.transpose(0, 1).reshape(units, -1)


def symmetric(model: nn.Module) -> list[Finding]:
    """Units that can never become different: identical incoming weights *and* identical outgoing weights.

    Two units get different gradients as soon as what flows back into them differs, and what flows back into
    unit j is the next layer's column j times the gradient of its outputs. So identical rows alone are not a
    symmetry: a zero-initialized output head has identical (zero) rows, yet row i gets output i's gradient,
    which differs per output; a zero or constant hidden layer followed by a random layer gets a different
    gradient per unit too. Only when the next layer also treats the units alike (its columns identical, as
    after an all-constant init, or two zero layers in a row) do they compute and learn the same thing forever.
    A layer whose next layer cannot be matched to its units (another width, grouped) is not reported.
    """
    layers = [(n, m) for n, m in model.named_modules() if kinds.is_weight_layer(m, *kinds.AFFINE)]
    layers = [(n, m) for n, m in layers if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2]
    identical = []
    for (name, module), (_, after) in itertools.pairwise(layers):
        rows = _units(module)
        if rows.shape[0] < 2 or not _identical(rows):
            continue
        outgoing = _outgoing(after, rows.shape[0])
        if outgoing is not None and _identical(outgoing):
            identical.append(name)
    if not identical:
        return []
    return [
        Finding(
            "symmetric_units",
            "critical",
            identical,
            {"layers_with_identical_rows": len(identical)},
            f"Every unit of {', '.join(identical)} has the same incoming and outgoing weights: they compute the same "
            "function and get the same gradient, so training can never tell them apart.",
            [Fix("reinit", {"scheme": "he_normal"}, "random weights break the symmetry")],
        )
    ]


def bias_before_norm(model: nn.Module) -> list[Finding]:
    redundant = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (name, layer), (_, after) in itertools.pairwise(children):
            is_bn = isinstance(after, nn.modules.batchnorm._BatchNorm) or "BatchNorm" in type(after).__name__
            has_bias = kinds.is_weight_layer(layer, *kinds.AFFINE) and layer.bias is not None
            if is_bn and has_bias:
                redundant.append(f"{parent_name}.{name}" if parent_name else name)
    if not redundant:
        return []
    return [
        Finding(
            "bias_before_batchnorm",
            "info",
            redundant,
            {"layers": len(redundant)},
            f"{', '.join(redundant)} add a bias that the BatchNorm right after subtracts again with the batch mean: "
            "it gets zero gradient and can be dropped (bias=False); BatchNorm's beta takes its role.",
            [Fix("remove_bias", {"layers": redundant})],
        )
    ]


CENTRING_MIN_BATCH = 4  # fewer samples than this: the centring rule does not run


def _noncentred_tensor(inputs: torch.Tensor, name: str = "input") -> list[Finding]:
    """LeCun et al. 1998: with inputs of one sign, a first-layer unit's weight updates all share the sign of its
    gradient, so the weights zig-zag to their target. Mean |mean_j| / std_j over the features measures it; a
    zero-mean feature shows sqrt(2 / (pi n)) of it by chance alone on n samples, so the threshold is at least 3x
    that (a batch of 4 standard-normal images reads about 0.4)."""
    if inputs.shape[0] < CENTRING_MIN_BATCH or not inputs.numel():
        return []  # |mean| / std of 2 or 3 samples is heavy-tailed (Cauchy-like at 2): it says nothing
    x = inputs.detach().double().reshape(inputs.shape[0], -1)
    if bool(((x == 0) | (x == 1)).all()):
        return []  # a 0/1 mask (attention or padding) selects, it is not multiplied by a weight
    mean, std = x.mean(0), x.std(0)
    varying = std > 1e-8 * float(std.max().clamp(min=1e-300))  # constant features (blank pixels) say nothing
    if not bool(varying.any()):
        return []
    ratio = float((mean[varying].abs() / std[varying]).mean())
    chance = math.sqrt(2 / (math.pi * x.shape[0]))
    all_positive = bool((x >= 0).all())
    if ratio <= max(NONCENTERED_RATIO, NONCENTERED_NOISE * chance) and not all_positive:
        return []
    return [
        Finding(
            "noncentred_inputs",
            "warning",
            [name],
            {"mean_abs_mean_over_std": ratio, "all_non_negative": all_positive},
            f"The {'inputs are' if name == 'input' else f'input {name!r} is'} not zero-centred (mean |mean|/std "
            f"over features: {ratio:.2g}"
            f"{'; every value is >= 0' if all_positive else ''}): the first layer's weight updates then share a "
            "sign and zig-zag (LeCun et al. 1998).",
            [Fix("standardize_inputs")],
        )
    ]


def noncentred(inputs) -> list[Finding]:
    """The centring rule on every floating-point tensor of ``inputs`` (a tensor, tuple or dict). Integer inputs
    (token ids, class indices) are indices into an embedding, not values a weight multiplies: their mean says
    nothing, so they get no input-statistics finding; nor do 0/1 masks, nor batches under ``CENTRING_MIN_BATCH``.
    Only the first floating-point tensor that is not a mask is read: it is the features a first layer multiplies
    (``x`` of ``model(x, adjacency)``, a ViT's ``pixel_values``); the ones after it condition the computation
    (an adjacency or attention-bias matrix, positions) and are no weight's input. A mapping's tensors are named
    by their key in the finding."""
    named = inputs.items() if isinstance(inputs, Mapping) else [("input", t) for t in tensors(inputs)]
    for name, tensor in named:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.dim() >= 1:
            if tensor.numel() and bool(((tensor == 0) | (tensor == 1)).all()):
                continue  # a 0/1 mask selects: the features come after it
            return _noncentred_tensor(tensor, name)  # the features: the first floating-point input
    return []


def architecture_findings(model: nn.Module) -> list[Finding]:
    """Findings the records cannot show, read from the model's structure: a plain stack of at least
    ``DEEP_WITHOUT_SKIPS`` weight layers (each multiplies the gradient once more: He et al. 2016), and
    sigmoid/tanh modules fed directly by an unnormalized weight layer (nothing keeps their inputs out of
    the flat tails: Ioffe & Szegedy 2015)."""
    findings = []
    weight_layers = [name for name, m in model.named_modules() if kinds.is_weight_layer(m, *kinds.AFFINE)]
    structure = describe(model)
    # a model that describes itself is believed; otherwise only an nn.Sequential is known to have no skips
    plain = structure.skip == "none" if structure is not None else isinstance(model, nn.Sequential)
    if plain and len(weight_layers) >= DEEP_WITHOUT_SKIPS:
        findings.append(
            Finding(
                "deep_without_skips",
                "warning",
                weight_layers[:1] + weight_layers[-1:],
                {"weight_layers": len(weight_layers)},
                f"{len(weight_layers)} weight layers in a plain stack with no skip connection: every layer "
                "multiplies the "
                "gradient once more on its way down.",
                [Fix("add_skips", {"kind": "residual"}), Fix("add_norm", {"kind": "batch"})],
            )
        )
    exposed = []
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for (_, layer), (after_name, after) in itertools.pairwise(children):
            if kinds.is_weight_layer(layer, *kinds.AFFINE) and kinds.is_activation(after, "saturating"):
                exposed.append(f"{parent_name}.{after_name}" if parent_name else after_name)
    if exposed:
        findings.append(
            Finding(
                "saturating_without_norm",
                "info",
                exposed,
                {"activations": len(exposed)},
                f"{len(exposed)} sigmoid/tanh activation(s) take an unnormalized layer's output directly: "
                "nothing keeps "
                "their inputs out of the flat tails.",
                [Fix("add_norm", {"kind": "batch"}), Fix("swap_activation", {"to": "relu"})],
            )
        )
    return findings


def recurrent_findings(model: nn.Module, inputs: torch.Tensor, loss: Callable[[object], torch.Tensor]) -> list[Finding]:
    """For a model with a recurrent layer on (N, T, F) inputs: how the gradient reaching input step t changes
    along time, ||dL/dx_1|| / ||dL/dx_T||: a recurrent net is T layers deep in time (Bengio et al. 1994).

    Args:
        model: not modified; the backward pass runs on a deep copy.
        inputs: a batch, (N, T, F); other shapes (or T < 2, or no ``nn.RNNBase``) give no finding.
        loss: the model's output -> a scalar loss (the doctor passes its training loss on this batch).
    """
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        return []
    if inputs.dim() != 3 or inputs.shape[1] < 2 or not any(isinstance(m, nn.RNNBase) for m in model.modules()):
        return []
    copy_ = copy.deepcopy(model)
    x = inputs.detach().clone().requires_grad_(True)
    loss(copy_(x)).backward()
    per_step = x.grad.norm(dim=(0, 2))
    ratio = float(per_step[0] / per_step[-1]) if float(per_step[-1]) > 0 else math.inf
    evidence = {"first_to_last_step_ratio": ratio, "steps": inputs.shape[1]}
    recurrent = [n for n, m in model.named_modules() if isinstance(m, nn.RNNBase)]
    if not math.isfinite(ratio) or ratio > EXPLODING_OVER_TIME:
        return [
            Finding(
                "exploding_over_time",
                "warning",
                recurrent,
                evidence,
                f"The gradient grows {ratio:.2g}x going back {inputs.shape[1]} time steps: the recurrence explodes.",
                [
                    Fix("clip", {"mode": "norm"}),
                    Fix("reinit", {"scheme": "orthogonal"}),
                    Fix("lower_lr", {"factor": 0.1}),
                ],
            )
        ]
    if vanishing_in_time(ratio, inputs.shape[1]):
        return [
            Finding(
                "vanishing_over_time",
                "warning",
                recurrent,
                evidence,
                f"The gradient reaching the first of {inputs.shape[1]} time steps is {ratio:.2g} of the last's: "
                "early inputs barely affect learning.",
                [Fix("reinit", {"scheme": "orthogonal"})],
            )
        ]
    return []
