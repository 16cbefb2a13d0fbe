"""One loss resolution for the probe, the doctor and the trainer.

Which loss a step takes, in order:

1. an explicit ``loss=`` callable: ``loss(output, targets)``, or ``loss(output)`` without targets;
2. the model's own loss: a scalar floating-point tensor at ``output.loss`` or ``output["loss"]``, as a
   Hugging Face model computes it when the inputs hold ``labels`` (it knows its own shift and masking);
3. with targets, the task's loss on the model's prediction (``logits`` when the output names them, else
   its first floating-point tensor that is not its ``loss``):
   - classification (integer targets, or ``task="classification"``): cross-entropy, ignoring targets equal
     to -100 as Hugging Face does; logits (N, C) with targets (N,), (N, T, C) sequence logits with (N, T)
     targets (per position, unshifted; the layout Hugging Face models return, preferred when (N, T, C) also
     reads as (N, C, d1) because C == T), or (N, C, d1, ...) with (N, d1, ...) as ``F.cross_entropy``
     takes them;
   - regression (floating targets, or ``task="regression"``): mean squared error, the targets reshaped to the
     output's shape when they hold as many values, else broadcast to it;
4. without targets, a fixed random projection of every output, L = sum_i(r_i * y_i) / N with r ~ N(0, 1)
   drawn from ``seed``: its gradient dL/dy = r / N has the same scale whatever the output's, so the
   per-layer gradients show the backward pass alone.

``resolve_loss`` returns the loss; ``resolve_loss_named`` returns ``(loss, name)``, the name in words
("cross-entropy (N, T, C) per position, ignore_index=-100", "the model's own loss (output.loss)", ...), so
that every report can say which loss it took (``FlowReport.loss_name``). Its first words are one of
``LOSS_KINDS``. Targets whose shape fits no rule raise a ValueError naming both shapes and the ``loss=``
remedy, never torch's own shape error.

Outputs may be tensors, tuples, lists, mappings (a dict, Hugging Face's ``ModelOutput``) or dataclasses,
nested; ``tensors`` and ``first_tensor`` walk them all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX",
    "LOSS_KINDS",
    "TASKS",
    "first_tensor",
    "own_loss",
    "projection_loss",
    "resolve_loss",
    "resolve_loss_named",
    "task_loss",
    "task_loss_named",
    "tensors",
]

TASKS = ("classification", "regression")
IGNORE_INDEX = -100  # the target Hugging Face's labels (and F.cross_entropy by default) leave out of the loss
# the first words of every loss name, one per rule of the module docstring
LOSS_KINDS = ("loss=", "the model's own loss", "cross-entropy", "mean squared error", "random projection")


def _named_fields(obj) -> list[tuple[str, object]] | None:
    """(name, value) pairs of a mapping or a dataclass instance, in order; None for anything else.

    A mapping first: Hugging Face's ``ModelOutput`` is both, and as a mapping it leaves out its None fields.
    """
    if isinstance(obj, Mapping):
        return list(obj.items())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    return None


def tensors(obj) -> list[torch.Tensor]:
    """Every tensor in a (nested) tensor, tuple, list, mapping or dataclass, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    fields = _named_fields(obj)
    if fields is not None:
        obj = [value for _, value in fields]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in tensors(item)]
    return []


def first_tensor(output) -> torch.Tensor | None:
    """The model's prediction in its output: the first floating-point tensor, or None.

    Where a mapping or dataclass names its fields, ``logits`` comes first and ``loss`` never counts: a
    causal LM's output starts with the loss it computed, and the prediction is its logits.
    """
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    fields = _named_fields(output)
    if fields is not None:
        named = dict(fields)
        logits = named.get("logits")
        if isinstance(logits, torch.Tensor) and logits.is_floating_point():
            return logits
        values = [value for name, value in fields if name != "loss"]
    elif isinstance(output, (list, tuple)):
        values = list(output)
    else:
        return None
    return next((t for t in map(first_tensor, values) if t is not None), None)


def own_loss(output) -> torch.Tensor | None:
    """The loss the model computed itself: a scalar floating tensor at ``output.loss`` / ``output["loss"]``.

    Only a scalar counts; a per-example loss is left to the other rules, which know how to reduce it.
    """
    if isinstance(output, torch.Tensor):
        return None
    value = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() == 0:
        return value
    return None


def _mismatch(y: torch.Tensor, targets: torch.Tensor, expected: str) -> ValueError:
    return ValueError(
        f"The model's output {tuple(y.shape)} does not fit the targets {tuple(targets.shape)}: {expected}. "
        "Pass loss=lambda output, targets: ... to say how they compare."
    )


def _cross_entropy(y: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Cross-entropy for (N, C), (N, T, C) or (N, C, d1, ...) logits; targets of -100 are left out."""
    suffix = f"ignore_index={IGNORE_INDEX}"
    targets = targets.long()  # int32 or uint8 labels (from numpy, say) mean the same classes; torch wants int64
    if y.dim() == 2 and targets.shape == y.shape[:1]:
        return F.cross_entropy(y, targets, ignore_index=IGNORE_INDEX), f"cross-entropy (N, C), {suffix}"
    if y.dim() == 3 and targets.shape == y.shape[:2]:
        # F.cross_entropy wants the classes second: (N, C, T)
        loss = F.cross_entropy(y.transpose(1, 2), targets, ignore_index=IGNORE_INDEX)
        return loss, f"cross-entropy (N, T, C) per position, {suffix}"
    if y.dim() >= 3 and targets.shape == (y.shape[0], *y.shape[2:]):
        return F.cross_entropy(y, targets, ignore_index=IGNORE_INDEX), f"cross-entropy (N, C, d1, ...), {suffix}"
    raise _mismatch(
        y,
        targets,
        "classification takes (N, C) logits with (N,) targets, (N, T, C) with (N, T), or (N, C, d1, ...) with "
        "(N, d1, ...)",
    )


def _mean_squared_error(y: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, str]:
    """MSE, the targets reshaped to the output when they hold as many values, else broadcast to it."""
    targets = targets.to(y.dtype)
    if targets.numel() == y.numel():
        return F.mse_loss(y, targets.reshape(y.shape)), "mean squared error"
    try:
        return F.mse_loss(y, targets.expand_as(y)), "mean squared error (targets broadcast)"
    except RuntimeError:  # torch's broadcast error names neither the remedy nor the rule
        raise _mismatch(
            y, targets, "regression takes as many target values as outputs, or targets that broadcast"
        ) from None


def task_loss_named(output, targets: torch.Tensor, task: str | None = None) -> tuple[torch.Tensor, str]:
    """``task_loss`` and its name in words."""
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
        return _cross_entropy(y, targets)
    return _mean_squared_error(y, targets)


def task_loss(output, targets: torch.Tensor, task: str | None = None) -> torch.Tensor:
    """Cross-entropy or mean squared error of the model's prediction (``first_tensor``) against ``targets``.

    Args:
        output: what the model returned (a tensor, or a tuple/list/mapping/dataclass holding one).
        targets: class indices (integer) or values (floating point).
        task: ``"classification"``, ``"regression"``, or None to infer it from the targets' dtype.
    """
    return task_loss_named(output, targets, task)[0]


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


def callable_name(obj: Callable) -> str:
    """A callable's name for a message: its qualified name, its name, or its type's name."""
    return getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__name__


def resolve_loss_named(
    output,
    targets: torch.Tensor | None = None,
    loss: Callable | None = None,
    task: str | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, str]:
    """The loss of one step and its name in words, by the order in this module's docstring."""
    if loss is not None:
        value = loss(output) if targets is None else loss(output, targets)
        return value, f"loss= {callable_name(loss)}"
    own = own_loss(output)
    if own is not None:
        return own, "the model's own loss (output.loss)"
    if targets is not None:
        return task_loss_named(output, targets, task)
    return projection_loss(output, seed), f"random projection of the outputs (seed {seed})"


def resolve_loss(
    output,
    targets: torch.Tensor | None = None,
    loss: Callable | None = None,
    task: str | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """The loss of one step, by the order in this module's docstring."""
    return resolve_loss_named(output, targets, loss, task, seed)[0]
