"""The one declaration of the per-layer statistics layout: the columns of a layer call's sums and of its record row.

Every producer of sums writes this layout (``measure.hooks.Recorder.finalize`` in torch, the numba taps of
``fast/jit_collector.py``, the C++ taps of ``fast/csrc``) and every consumer reads it by name through the index
constants below, never by position. It lives at the package's floor, importing nothing, because the compiled taps
sit below ``steadygrad.measure`` and must use it too; ``steadygrad.measure.hooks`` re-exports it.

C++ cannot import Python, so ``csrc/moments.h`` keeps its own ``kColumns``; each backend's ``Collector.columns()``
returns its width and ``measure.hooks.Recorder`` refuses taps whose width differs from ``SUMS_WIDTH`` (tested in
``tests/measure/test_taps.py``).

Adding a per-layer statistic: one name here (in its group), its accumulation where its group is summed (torch in
``measure/stats.py``, numba in ``jit_collector``, C++ in ``stats.cpp``'s ``write_row`` and ``kColumns``), and its
finalization in ``measure.hooks.rows_from_sums``.
"""

from __future__ import annotations

from collections import namedtuple

__all__ = [
    "RECORD",
    "RECORD_COLUMNS",
    "RECORD_WIDTH",
    "REPAIRED",
    "SUMS",
    "SUMS_ACTIVATION",
    "SUMS_COLUMNS",
    "SUMS_GRADIENT",
    "SUMS_PARAMETERS",
    "SUMS_SATURATION",
    "SUMS_UNITS",
    "SUMS_WIDTH",
]

# A layer call's sums, in groups; each group is accumulated as one vector and the groups are concatenated in this
# order (``Recorder._slot_sums``).
_SUMS_GROUPS = (
    # activation: values seen, their mean, M2 (merged over micro-batches), min, max, sum of squares, and the NaN/Inf
    # values of the output (excluded from the other sums and counted here)
    ("n", "mean", "m2", "min", "max", "squares", "nonfinite"),
    # tanh/sigmoid values saturated, of values counted
    ("saturated", "counted"),
    # rectifier units, and those <= 0 for every sample
    ("units", "dead"),
    # output gradient's sum of squares (NaN: none received), its NaN/Inf count
    ("grad_squares", "grad_nonfinite"),
    # weight-gradient and bias-gradient sums of squares (NaN: none), the first weight's size (0: none of more than
    # one value) and M2
    ("weight_grad_squares", "bias_grad_squares", "weight_n", "weight_m2"),
)
SUMS_COLUMNS = tuple(name for group in _SUMS_GROUPS for name in group)
SUMS_WIDTH = len(SUMS_COLUMNS)
SUMS = namedtuple("SumsIndex", SUMS_COLUMNS)(*range(SUMS_WIDTH))  # SUMS.grad_squares: that column's index


def _group(first: str, last: str) -> slice:
    return slice(SUMS_COLUMNS.index(first), SUMS_COLUMNS.index(last) + 1)


SUMS_ACTIVATION = _group("n", "nonfinite")
SUMS_SATURATION = _group("saturated", "counted")
SUMS_UNITS = _group("units", "dead")
SUMS_GRADIENT = _group("grad_squares", "grad_nonfinite")
SUMS_PARAMETERS = _group("weight_grad_squares", "weight_m2")

# A layer call's statistics (``rows_from_sums``), named as LayerRecord's fields; the Monitor appends the update ratio
RECORD_COLUMNS = (
    "act_mean",
    "act_std",
    "act_min",
    "act_max",
    "act_second_moment",
    "nonfinite_act",
    "saturated",
    "dead",
    "grad_norm",
    "nonfinite_grad",
    "weight_grad_norm",
    "bias_grad_norm",
    "weight_var",
    "update_ratio",
)
RECORD_WIDTH = len(RECORD_COLUMNS) - 1  # what rows_from_sums gives: all but the update ratio
RECORD = namedtuple("RecordIndex", RECORD_COLUMNS)(*range(len(RECORD_COLUMNS)))
# the statistics a masked recompute of NaN/Inf layers replaces: activation, unit and gradient ones (the weight
# statistics need no repair)
REPAIRED = slice(0, RECORD.weight_grad_norm)
