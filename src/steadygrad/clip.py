"""Gradient clipping: by value, by norm (global or per layer, any p), and adaptive (AGC).

No function here synchronizes with the host unless asked (``error_if_nonfinite=True``): the clipping
coefficient is applied as ``min(coef, 1)`` on the device instead of ``if coef < 1:``, which would wait
for the GPU. Norms accumulate in float32 at least, so half-precision gradients do not overflow.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from steadygrad._checks import check_choice, check_positive

__all__ = [
    "CLIP_MODES",
    "adaptive_clip_grad_",
    "clip_grad_norm_",
    "clip_grad_norm_per_layer_",
    "clip_grad_value_",
    "clip_grads_",
    "grad_norm",
]

Params = torch.Tensor | Iterable[torch.Tensor]
_EPS = 1e-6  # keeps max_norm / (norm + eps) finite for all-zero gradients (as torch.nn.utils does)


def _grads(parameters: Params) -> list[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def _as_list(parameters: Params) -> list[torch.Tensor]:
    return [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)


def _norm_type(norm_type: float) -> float:
    p = float(norm_type)
    if not (p == float("inf") or p > 0):
        raise ValueError(f"norm_type must be > 0 or inf (1, 2 and inf are common); got {norm_type!r}.")
    return p


def _total_norm(tensors: list[torch.Tensor], p: float) -> torch.Tensor:
    """||concat(tensors)||_p, computed as the p-norm of the per-tensor p-norms (one kernel each)."""
    device = tensors[0].device
    norms = [torch.linalg.vector_norm(t, p, dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors]
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), p)


def grad_norm(parameters: Params, norm_type: float = 2.0) -> torch.Tensor:
    """The joint p-norm of all gradients (those that are not None), as a 0-d tensor; 0 when there are none.

    What ``clip_grad_norm_`` measures, without clipping: for logging, and for choosing a threshold."""
    grads = _grads(parameters)
    return _total_norm(grads, _norm_type(norm_type)) if grads else torch.tensor(0.0)


def clip_grad_value_(parameters: Params, clip_value: float) -> None:
    """Clamp every gradient element into [-clip_value, clip_value] in place (as ``np.clip`` does).

    Equals ``torch.nn.utils.clip_grad_value_``. Note that it changes the gradient's direction, unlike
    clipping by norm (Pascanu et al. 2013).
    """
    clip_value = check_positive("clip_value", clip_value)
    for grad in _grads(parameters):
        grad.clamp_(-clip_value, clip_value)


def clip_grad_norm_(
    parameters: Params, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
) -> torch.Tensor:
    """Rescale all gradients together so that their joint p-norm is at most ``max_norm``.

    g <- g * min(1, max_norm / (||g||_p + 1e-6)), with ||g||_p over every gradient concatenated
    (Pascanu, Mikolov, Bengio 2013, "On the difficulty of training recurrent neural networks", alg. 1).
    Equals ``torch.nn.utils.clip_grad_norm_``.

    Args:
        parameters: a tensor or an iterable of tensors; those whose ``.grad`` is None are skipped.
        max_norm: the largest allowed norm, > 0.
        norm_type: p, > 0 or ``inf``.
        error_if_nonfinite: raise if the total norm is NaN or Inf (this one check waits for the device).

    Returns:
        The total norm before clipping, as a 0-d tensor (no host synchronization).
    """
    max_norm = check_positive("max_norm", max_norm)
    p = _norm_type(norm_type)
    grads = _grads(parameters)
    if not grads:
        return torch.tensor(0.0)
    total = _total_norm(grads, p)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {p} of the gradients is non-finite ({total.item()}), so it cannot be "
            "clipped. Find where it first went non-finite with steadygrad.probe or a Monitor, or pass "
            "error_if_nonfinite=False to scale by it anyway."
        )
    coef = torch.clamp(max_norm / (total + _EPS), max=1.0)
    for grad in grads:
        grad.mul_(coef.to(grad.device, grad.dtype))
    return total


def _layer_groups(parameters: nn.Module | Params) -> list[list[torch.Tensor]]:
    if isinstance(parameters, nn.Module):
        groups = [list(m.parameters(recurse=False)) for m in parameters.modules()]
        return [g for g in groups if g]
    if isinstance(parameters, torch.Tensor):
        return [[parameters]]
    return [[p] for p in parameters]


def clip_grad_norm_per_layer_(parameters: nn.Module | Params, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip by norm layer by layer: each group's gradients are rescaled to norm at most ``max_norm``.

    Given a module, a group is the parameters one submodule owns directly (a Linear's weight and bias
    together); given tensors, each tensor is its own group. A layer with a large gradient is tamed
    without shrinking the others, unlike global norm clipping.

    Returns:
        The norm of each group before clipping, shape (groups,); 0 for a group with no gradient.
    """
    max_norm = check_positive("max_norm", max_norm)
    p = _norm_type(norm_type)
    groups = [_grads(group) for group in _layer_groups(parameters)]
    device = next((g[0].device for g in groups if g), torch.device("cpu"))
    norms = []
    for grads in groups:
        if not grads:
            norms.append(torch.zeros((), device=device))
            continue
        norm = _total_norm(grads, p)
        coef = torch.clamp(max_norm / (norm + _EPS), max=1.0)
        for grad in grads:
            grad.mul_(coef.to(grad.device, grad.dtype))
        norms.append(norm.to(device))
    return torch.stack(norms) if norms else torch.zeros(0)


def _unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """Norm of each output unit: rows of a weight (all dims but the first); a bias or scalar as a whole."""
    if x.dim() <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True)


@torch.no_grad()
def adaptive_clip_grad_(parameters: Params, clipping: float = 0.01, eps: float = 1e-3) -> torch.Tensor:
    """Unit-wise adaptive gradient clipping (AGC), Brock, De, Smith, Simonyan 2021 ("NFNets"), eq. 3.

    For each unit i (a row of a weight matrix, an output channel of a conv, a whole bias):

        G_i <- G_i * (clipping * max(||W_i||, eps) / ||G_i||)   if ||G_i|| / max(||W_i||, eps) > clipping

    so no update can be large relative to the weights it changes. The paper leaves the final classifier
    layer unclipped: pass the other parameters only to do the same.

    Returns:
        The fraction of units clipped, a 0-d tensor (no host synchronization).
    """
    clipping = check_positive("clipping", clipping)
    eps = check_positive("eps", eps)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clipped: torch.Tensor | None = None
    units = 0
    for p in parameters:
        if p.grad is None:
            continue
        max_norm = _unitwise_norm(p).clamp(min=eps) * clipping
        grad_norm = _unitwise_norm(p.grad)
        too_big = grad_norm > max_norm
        scale = torch.where(too_big, max_norm / grad_norm.clamp(min=_EPS), torch.ones_like(grad_norm))
        p.grad.mul_(scale.to(p.grad.dtype))
        count = too_big.sum()
        clipped = count if clipped is None else clipped + count.to(clipped.device)
        units += too_big.numel()
    return torch.zeros(()) if clipped is None else clipped / units


CLIP_MODES = ("norm", "value", "agc", "layer_norm")


def clip_grads_(parameters: nn.Module | Params, mode: str = "norm", threshold: float = 1.0, **options) -> torch.Tensor:
    """Clip gradients in place by one of ``CLIP_MODES``; ``threshold`` is the mode's main knob.

    ========== ================================ ==============================
    mode       function                          threshold is
    ========== ================================ ==============================
    norm       ``clip_grad_norm_``               max_norm (global)
    value      ``clip_grad_value_``              clip_value
    agc        ``adaptive_clip_grad_``           clipping (ratio ||G_i||/||W_i||)
    layer_norm ``clip_grad_norm_per_layer_``     max_norm (per layer)
    ========== ================================ ==============================

    ``options`` go to that function (``norm_type``, ``error_if_nonfinite``, ``eps``).

    Returns:
        Whatever the mode, one 0-d tensor: the total norm of all gradients *before* clipping, so that a
        training loop can log it and test it for NaN/Inf the same way in every mode (no host sync).

        - norm: ||concat(g)||_p with the ``norm_type`` p (2 by default), what ``clip_grad_norm_`` returns.
        - layer_norm: the same global p-norm, computed from the per-layer norms as ||(||g_l||_p)_l||_p
          (equal to ||concat(g)||_p for every p, inf included); call ``clip_grad_norm_per_layer_`` for the
          per-layer norms themselves.
        - value and agc: the global L2 norm ||concat(g)||_2, measured before the clamp or the unit-wise
          rescaling (these modes have no norm order); call ``adaptive_clip_grad_`` for the fraction of units
          AGC clipped.

        A NaN or Inf gradient before clipping gives a NaN or Inf norm, even where value clipping would clamp
        an Inf element to a finite one.
    """
    mode = check_choice("clipping mode", mode, CLIP_MODES)
    if mode == "layer_norm":
        norms = clip_grad_norm_per_layer_(parameters, threshold, **options)
        return torch.linalg.vector_norm(norms, _norm_type(options.get("norm_type", 2.0)))
    parameters = list(parameters.parameters() if isinstance(parameters, nn.Module) else _as_list(parameters))
    if mode == "norm":
        return clip_grad_norm_(parameters, threshold, **options)
    total = grad_norm(parameters)
    if mode == "value":
        clip_grad_value_(parameters, threshold, **options)
    else:
        adaptive_clip_grad_(parameters, threshold, **options)
    return total
