"""The optimizers steadygrad's trainer and doctor build by name, from one table.

``momentum`` is SGD with heavy-ball momentum 0.9 (Polyak 1964), the setting of the classic deep-net recipes;
``adamw`` is Adam with decoupled weight decay (Loshchilov & Hutter 2019). Weight decay is 0 unless given, for
every name: torch's AdamW default of 0.01 would make ``adamw`` and ``adam`` differ by more than the name says.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["OPTIMIZERS", "make_optimizer", "param_groups"]

_FACTORIES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, weight_decay=wd),
    "momentum": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd),
    "adam": lambda params, lr, wd: torch.optim.Adam(params, lr=lr, weight_decay=wd),
    "adamw": lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
}
OPTIMIZERS: tuple[str, ...] = tuple(_FACTORIES)


def param_groups(model: torch.nn.Module, lr: float) -> list:
    """What an optimizer for ``model`` at ``lr`` should hold: the model's own parameter groups when it defines
    ``steadygrad_param_groups(lr)`` (μP's per-layer learning rates, ``NetSpec(parametrization="mup")``), else its
    parameters that require grad."""
    own = getattr(model, "steadygrad_param_groups", None)
    if not callable(own):
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                f"{type(model).__name__} has no parameter that requires grad: nothing to optimize. Unfreeze some "
                "(p.requires_grad_(True))."
            )
        return params
    groups = own(lr)
    if not isinstance(groups, list) or not all(isinstance(g, dict) and "params" in g for g in groups):
        raise TypeError(
            f"{type(model).__name__}.steadygrad_param_groups(lr) must return a list of torch param-group dicts "
            f"({{'params': [...], 'lr': ...}}); got {type(groups).__name__}."
        )
    return groups


def make_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of ``OPTIMIZERS``) over ``params``."""
    if name not in _FACTORIES:
        raise ValueError(f"Unknown optimizer {name!r}. Accepted: {', '.join(OPTIMIZERS)}.")
    return _FACTORIES[name](params, lr, weight_decay)
