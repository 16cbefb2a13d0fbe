"""One loss resolution for the probe, the doctor and the trainer.

Which loss a step takes, in order:

1. an explicit ``loss=`` callable: ``loss(output, targets)``, or ``loss(output)`` without targets;
2. with targets, the task's loss on the model's (first floating-point) output:
   - classification (integer targets, or ``task="classification"``): cross-entropy; logits (N, C) with
     targets (N,), or (N, C, d1, ...) with (N, d1, ...) as ``F.cross_entropy`` takes them;
   - regression (floating targets, or ``task="regression"``): mean squared error, the targets reshaped to the
     output's shape when they hold as many values, else broadcast to it;
3. without targets, a fixed random projection of every output, L = sum_i(r_i * y_i) / N with r ~ N(0, 1)
   drawn from ``seed``: its gradient dL/dy = r / N has the same scale whatever the output's, so the
   per-layer gradients show the backward pass alone.

Issue 11's rules (the model's own ``.loss``, sequence cross-entropy) are added here, once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

__all__ = ["TASKS", "first_tensor", "projection_loss", "resolve_loss", "task_loss", "tensors"]

TASKS = ("classification", "regression")


def tensors(obj) -> list[torch.Tensor]:
    """Every tensor in a (nested) tensor, tuple, list or dict, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in tensors(item)]
    return []


def first_tensor(output) -> torch.Tensor | None:
    """The first floating-point tensor in a module's output (tensor, tuple, list or dict), or None."""
    return next((t for t in tensors(output) if t.is_floating_point()), None)


def task_loss(output, targets: torch.Tensor, task: str | None = None) -> torch.Tensor:
    """Cross-entropy or mean squared error of the model's first floating-point output against ``targets``.

    Args:
        output: what the model returned (a tensor, or a tuple/list/dict holding one).
        targets: class indices (integer) or values (floating point).
        task: ``"classification"``, ``"regression"``, or None to infer it from the targets' dtype.
    """
    if task is None:
        task = "regression" if targets.is_floating_point() else "classification"
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}.")
    y = first_tensor(output)
    if y is None:
        raise ValueError("The model's output holds no floating-point tensor to compute a loss on.")
    if task == "classification":
        if targets.is_floating_point():
            raise ValueError(
                f"Classification needs integer class indices as targets; got {targets.dtype}. "
                "Pass integer targets, or use the regression task to fit values."
            )
        if y.dim() < 2 or targets.shape != (y.shape[0], *y.shape[2:]):
            raise ValueError(
                f"For classification the model's (first) output must be (N, classes) logits with targets (N,), "
                f"or (N, classes, d1, ...) with (N, d1, ...); got output {tuple(y.shape)} and targets "
                f"{tuple(targets.shape)}. Use the regression task to fit the outputs instead."
            )
        return F.cross_entropy(y, targets)
    targets = targets.to(y.dtype)
    return F.mse_loss(y, targets.reshape(y.shape) if targets.numel() == y.numel() else targets.expand_as(y))


def projection_loss(output, seed: int = 0) -> torch.Tensor:
    """L = sum over every floating output y that requires grad of sum(r * y) / N, r ~ N(0, 1) from ``seed``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    first = first_tensor(output)
    if first is None:
        raise ValueError("The model returned no floating-point tensor to take a loss of.")
    total = torch.zeros((), device=first.device)
    for y in tensors(output):
        if y.is_floating_point() and y.requires_grad:
            r = torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device)
            total = total + (y * r).sum() / max(y.shape[0] if y.dim() else 1, 1)
    return total


def resolve_loss(
    output,
    targets: torch.Tensor | None = None,
    loss: Callable | None = None,
    task: str | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """The loss of one step, by the order in this module's docstring."""
    if loss is not None:
        return loss(output) if targets is None else loss(output, targets)
    if targets is not None:
        return task_loss(output, targets, task)
    return projection_loss(output, seed)
