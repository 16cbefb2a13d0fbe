"""Like layers across depth: the records of one role (``transformer.h.*.attn.c_attn``) read in depth order.

Comparing a record with whatever record comes next compares unlike things: an embedding's output has std 0.02
by design, a norm's output has std 1 by construction, a residual branch's gradient is the stream's times the
branch's own scale, and an attention query's gradient is small at init because the softmax is nearly uniform.
The same role at two depths differs only by what the layers between them did to the signal, which is what
vanishing, exploding and poor propagation across depth mean. So the depth rules read series: records grouped by
their name with the depth indices replaced by ``*``, their kind and which call of the module they are.

The functions take any records with ``name``, ``kind``, ``call`` and ``index`` (``LayerRecord``s), so that the
report's own summary and the rules in ``steadygrad.diagnose`` read depth the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

_DIGITS = re.compile(r"\d+")
_KERAS_REPEAT = re.compile(r"_\d+$")


def template(name: str) -> str:
    """The name with its depth indices replaced by ``*``: ``transformer.h.3.attn.c_attn`` ->
    ``transformer.h.*.attn.c_attn``, ``layer2.1.conv1`` -> ``layer*.*.conv1``, ``block07`` -> ``block*``,
    ``3`` -> ``*``.

    Digits in the enclosing modules' names count the depth; in the layer's own (last) name they usually name a
    role (``conv1`` and ``conv2`` of one block do different things), so they are kept there, unless no enclosing
    name carries an index, in which case the last name is the only place the depth can be (``block07``, an
    ``nn.Sequential``'s ``3``, a user's ``fc1``..``fc3``, Keras' ``dense``, ``dense_1``, ... -> ``dense``).
    """
    *parents, last = name.split(".")
    indexed = [_DIGITS.sub("*", p) for p in parents]
    if indexed == parents:
        # Keras numbers a layer's repeats with a suffix (dense, dense_1, dense_2): they are one role
        last = _DIGITS.sub("*", _KERAS_REPEAT.sub("", last))
    return ".".join([*indexed, last])


@dataclass
class Series:
    """The records of one role at every depth it occurs, in forward (execution) order."""

    template: str
    kind: str
    call: int
    records: list[Any]  # LayerRecords

    @property
    def label(self) -> str:
        call = f" (call {self.call})" if self.call != 1 else ""
        return f"{self.template} ({self.kind}){call}"


def series(report_or_records, *, min_depth: int = 2) -> list[Series]:
    """The series of ``report`` with at least ``min_depth`` records. The call number is part of the key: a
    module called twice per block (torchvision's one ``relu``) plays two roles, before and after the residual
    add, and each is compared with itself at other depths."""
    records: Iterable = getattr(report_or_records, "records", report_or_records)
    groups: dict[tuple[str, str, int], list] = {}
    for record in sorted(records, key=lambda r: r.index):
        groups.setdefault((template(record.name), record.kind, record.call), []).append(record)
    return [Series(t, k, c, rs) for (t, k, c), rs in groups.items() if len(rs) >= min_depth]
