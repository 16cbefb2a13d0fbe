"""Autograd helpers shared by every layer, the compiled kernels (``steadygrad.fast``) included.

``no_double_backward`` is the refusal every hand-derived normalization backward makes (eager and compiled);
``on_gradient`` is the cheap gradient tap of the Monitor's recorders and of numba's taps.
"""

from __future__ import annotations

import torch

__all__ = ["no_double_backward", "on_gradient"]


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
