"""What the remedies and instruments need to know about a network's architecture, as a protocol.

Fixup needs a residual network's branches, layer-wise pre-training a plain MLP's (weight layer,
activation) chain, the probe the blocks to record and a label, the doctor whether the net has skips.
Reading those off one class's children (``model.blocks[1:]``, ``block.linear``) couples every such
module to that class: renaming a child breaks Fixup. Instead a network that knows its own structure
says so through one method, and the modules below ``nets`` read only this description::

    class MyNet(nn.Module):
        def steadygrad_structure(self) -> Structure:
            return Structure(label="mynet", skip="residual", branches=list(self.branches))

    structure = describe(model)   # None for a model that does not implement the protocol

Any model may implement it, not only ``steadygrad.build``'s: it is how a user's own architecture gets the
automatic branch finding that built networks get.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import nn

__all__ = ["Described", "Structure", "describe"]

SKIPS = ("none", "residual", "dense")


@dataclass
class Structure:
    """A network's description of itself.

    Attributes:
        label: a short human-readable name (reports and tables show it).
        kind: the family: ``"mlp"``, ``"cnn"``, ``"rnn"`` (``"other"`` when none applies).
        skip: ``"none"``, ``"residual"`` or ``"dense"``.
        normalized: whether the network has normalization layers.
        blocks: the (name, module) pairs of its top-level stages, in forward order: what the probe records
            by default.
        branches: the residual branches (modules whose output is added to the stream), for ``skip="residual"``.
        chain: for a plain feed-forward MLP, its (weight layer, activation) pairs from the input up.
        head: the output layer.
        spec: the object the network can be rebuilt from (``NetSpec`` for built networks), or None.
    """

    label: str
    kind: str = "other"
    skip: str = "none"
    normalized: bool = False
    blocks: list[tuple[str, nn.Module]] = field(default_factory=list)
    branches: list[nn.Module] = field(default_factory=list)
    chain: list[tuple[nn.Module, nn.Module]] = field(default_factory=list)
    head: nn.Module | None = None
    spec: Any = None

    def __post_init__(self) -> None:
        if self.skip not in SKIPS:
            raise ValueError(f"Structure.skip must be one of {', '.join(SKIPS)}, got {self.skip!r}.")


@runtime_checkable
class Described(Protocol):
    """A module that describes its own structure (``steadygrad.build``'s networks do)."""

    def steadygrad_structure(self) -> Structure: ...


def describe(model: nn.Module) -> Structure | None:
    """The model's own description, or None when it does not implement ``steadygrad_structure``."""
    if isinstance(model, Described):
        structure = model.steadygrad_structure()
        if not isinstance(structure, Structure):
            raise TypeError(
                f"{type(model).__name__}.steadygrad_structure() must return a steadygrad.structure.Structure, "
                f"got {type(structure).__name__}."
            )
        return structure
    return None
