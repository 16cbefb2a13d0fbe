"""Autograd helpers shared by every layer, the compiled kernels (``steadygrad.fast``) included.

``no_double_backward`` is the refusal every hand-derived normalization backward makes (eager and compiled);
``on_gradient`` is the cheap gradient tap of the Monitor's recorders and of numba's taps; ``in_backward`` tells
their forward hooks that a forward call is gradient checkpointing's recompute, not a call of its own.
"""

from __future__ import annotations

import torch

__all__ = ["in_backward", "no_double_backward", "on_gradient"]


def no_double_backward() -> None:
    """Inside a backward, grad mode is on only under create_graph=True: refuse it with the way out. (Every
    hand-derived norm backward calls this; the C++ kernels raise the same message.)"""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "steadygrad's normalization backward is hand-derived and differentiable once: a second derivative "
            "(create_graph=True, gradient penalties, Hessian-vector products) is not supported. Convert the "
            "model to torch's norms for that: steadygrad.norm.convert_norms(model, to='torch')."
        )


def on_gradient(y: torch.Tensor, receive) -> None:
    """Have the backward pass call ``receive(dL/dy)``.

    A pre-hook on the node that made y sees the same accumulated gradient as ``y.register_hook`` at a third of
    its cost (no Python wrapper, no removable handle), which matters at one call per layer per step. Where y
    is a leaf (no node), the tensor hook it is.
    """
    node = y.grad_fn
    if node is None:
        y.register_hook(receive)
        return
    index = y.output_nr

    def prehook(grads):
        if grads[index] is not None:
            receive(grads[index])

    node.register_prehook(prehook)


def in_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread.

    A module's forward that runs then is gradient checkpointing's recompute (``torch.utils.checkpoint``, either
    mode, and what ``gradient_checkpointing_enable`` sets up in transformers): the engine has a graph task only
    while it executes one. torch's own ``ModuleTracker`` and FSDP ask the same question the same way.
    """
    return torch._C._current_graph_task_id() != -1
