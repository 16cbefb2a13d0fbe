"""``torch.compile``'d models under the instruments: measured eagerly on logged steps, under the original's names.

Dynamo captures a module's hooks when it compiles it, so hooks added afterwards (a Monitor attached after the
first compiled call) never fire, and hooks present while it compiles break the graph or get traced into it. The
instruments therefore run a compiled model eagerly on the steps they record: a forward pre-hook on the model sets
``torch.compiler.set_stance("force_eager")`` and its forward hook restores the stance it found. Between logged steps
those hooks are off, like the recorder's, and the model runs its compiled code (compiled without any hook of ours,
so the cached graphs stay valid and nothing recompiles). The layers are selected from the module
``torch.compile`` wraps, so records carry its names (``0``, not ``_orig_mod.0``).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

__all__ = ["EagerStance", "is_compile_wrapper", "is_compiled", "unwrap"]


def _optimized_module_type() -> type | None:
    """torch's OptimizedModule, without importing dynamo: no model can be one before dynamo is loaded."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(eval_frame, "OptimizedModule", None)


def is_compile_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is the wrapper ``torch.compile(module)`` returns (an ``OptimizedModule``)."""
    optimized = _optimized_module_type()
    return optimized is not None and isinstance(module, optimized)


def unwrap(model: nn.Module) -> nn.Module:
    """The module ``torch.compile(model)`` compiled (its ``_orig_mod``, through nested wrappers), else ``model``."""
    optimized = _optimized_module_type()
    while optimized is not None and isinstance(model, optimized):
        model = model._orig_mod
    return model


def _compiled_in_place(module: nn.Module) -> bool:
    """Whether ``module.compile()`` compiled it in place: its hooks then run inside the compiled code."""
    return getattr(module, "_compiled_call_impl", None) is not None


def is_compiled(model: nn.Module) -> bool:
    """Whether running ``model`` runs compiled code of a module: it is a compile wrapper or holds one, or a
    submodule was compiled in place. Refuses a model compiled in place itself (see the message)."""
    if _compiled_in_place(model):
        raise ValueError(
            f"{type(model).__name__} was compiled in place (module.compile()): its hooks run inside the compiled "
            "code, where steadygrad cannot switch it to eager for a measured step. Measure the wrapper "
            "torch.compile(model) returns instead (train with it too), or the model before compiling it."
        )
    optimized = _optimized_module_type()
    if optimized is None:
        return False
    return any(isinstance(m, optimized) or _compiled_in_place(m) for m in model.modules())


class EagerStance:
    """Forward hooks on ``model`` that run its forward with torch.compile's ``force_eager`` stance, switched on and
    off with the recorder (``attach`` for a logged step, ``park`` after it).

    The stance is restored in a forward hook that runs even when the forward raises (``always_call``), to what it
    was (a stack of them: a model may call itself).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._handles: list = []
        self._entered: list = []  # the set_stance objects whose exit restores the stance found

    def attach(self) -> None:
        if not self._handles:
            self._handles = [
                self.model.register_forward_pre_hook(self._eager),
                self.model.register_forward_hook(self._restore, always_call=True),
            ]

    def park(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _eager(self, module, args) -> None:
        self._entered.append(torch.compiler.set_stance("force_eager"))  # set now; its __exit__ restores

    def _restore(self, module, args, output) -> None:
        if self._entered:
            self._entered.pop().__exit__(None, None, None)
