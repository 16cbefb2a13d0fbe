"""The Monitor's taps compiled by numba: the C++ ``Collector`` (``csrc/collector.cpp``) for machines with no C++
compiler, with its interface and its sums.

The forward hook hands each layer output to ``Collector.output``; a gradient hook sums the output and its
gradient when the gradient arrives and lets both go; the parameters are summed at the step's end and the weights
copied for the update ratio. The sums are those of ``csrc/stats.cpp``: activation moments shifted by the
tensor's first value (Chan, Golub and LeVeque 1983), float32 partial sums joining float64 every ``CHUNK``
values, min, max and the activation's unit statistics in the same pass; a tensor whose fast sums are not
finite is summed again over its finite values, counting the others. The C++ taps run their gradient hook in
C++; here it is a Python hook around two numba calls, so a logged step costs somewhat more than with C++ and
far less than the eager statistics' dozen torch reductions per tensor (``BENCHMARKS.md``).

Only ``steadygrad.fast.enable`` imports this module, with numba's backend (see ``jit.py``).
"""

from __future__ import annotations

import math
import threading
import weakref

import numba
import numpy as np
import torch
from numba import njit, prange
from numba.typed import List

from steadygrad._autograd import on_gradient
from steadygrad._layout import SUMS, SUMS_ACTIVATION, SUMS_PARAMETERS, SUMS_WIDTH
from steadygrad.fast.jit import _MATH, _NONE, _PARALLEL, CHUNK, _array, _shifted_sums

__all__ = ["Collector", "warm_up"]

# the activation kinds of the taps (steadygrad.measure.hooks._KIND_CODES, csrc/stats.h)
NO_KIND, TANH, SIGMOID, RECTIFIER = 0, 1, 2, 3
# as steadygrad.measure.stats's (this layer sits below measure, as csrc/stats.cpp does; tests check they agree)
TANH_SATURATION = 0.99
SIGMOID_SATURATION = 0.01
COLUMNS = SUMS_WIDTH  # a row of sums: steadygrad._layout's SUMS_COLUMNS (csrc/moments.h's kColumns must agree)
_TANH = np.float32(TANH_SATURATION)
_SIGMOID_LOW = np.float32(SIGMOID_SATURATION)
_SIGMOID_HIGH = np.float32(1.0 - SIGMOID_SATURATION)


# --- the sums (numba) ------------------------------------------------------------------------------------


@njit(**_MATH)
def _saturated(v, kind):
    if kind == TANH:
        return abs(v) > _TANH
    return v < _SIGMOID_LOW or v > _SIGMOID_HIGH


@njit(**_MATH)
def _raise_maxima(maxima, x, rows, units):
    """maxima[j] = max(maxima[j], x[r, j]) over the rows of an (rows, units) array: a rectifier's units."""
    for r in range(rows):
        row = x[r * units : (r + 1) * units]
        for j in range(units):
            if row[j] > maxima[j]:
                maxima[j] = row[j]


@njit(**_MATH)
def _output_sums(x, rows, units, kind, maxima, out):
    """An output's out = [n, mean, M2, -, -, sum of squares, saturated] from sums shifted by x[0], and a
    rectifier's per-unit maxima raised in ``maxima``, the output viewed as (rows, units). The min and max
    (out[3], out[4]) are numpy's: numba's min/max reductions do not vectorize (8x slower, measured)."""
    k = x[0]
    s, q = _shifted_sums(x, k)
    saturated = 0.0
    if kind in (TANH, SIGMOID):
        for c0 in range(0, x.shape[0], CHUNK):
            chunk = x[c0 : c0 + CHUNK]
            for j in range(chunk.shape[0]):
                saturated += _saturated(chunk[j], kind)
    if kind == RECTIFIER:
        _raise_maxima(maxima, x, rows, units)
    n = x.shape[0]
    out[0] = n
    out[1] = k + s / n
    out[2] = max(0.0, q - s * s / n)
    out[5] = q + 2.0 * k * s + n * np.float64(k) * k
    out[6] = saturated


@njit(**_MATH)
def _finite_output_sums(x, rows, units, kind, maxima, out):
    """The same over the finite values only, in float64 and two passes (the rare path of a broken step); out[7]
    counts the others. Units: a rectifier unit's maximum and the saturated count take every value but NaN."""
    n = 0.0
    total = 0.0
    for i in range(x.shape[0]):
        if np.isfinite(x[i]):
            n += 1.0
            total += x[i]
    mean = total / n if n > 0 else 0.0
    m2 = 0.0
    squares = 0.0
    lo = np.inf
    hi = -np.inf
    saturated = 0.0
    for r in range(rows):
        row = x[r * units : (r + 1) * units]
        for j in range(units):
            v = row[j]
            if kind == RECTIFIER and v > maxima[j]:
                maxima[j] = v
            elif kind in (TANH, SIGMOID) and _saturated(v, kind):
                saturated += 1.0
            if np.isfinite(v):
                m2 += (v - mean) * (v - mean)
                squares += np.float64(v) * v
                lo = min(lo, v)
                hi = max(hi, v)
    out[0] = n
    out[1] = mean
    out[2] = m2
    out[3] = lo
    out[4] = hi
    out[5] = squares
    out[6] = saturated
    out[7] = x.shape[0] - n


_UNDERFLOW = 1e-30  # as steadygrad.measure.stats.UNDERFLOW


@njit(**_MATH)
def _sum_squares(x):
    """sum(x^2), float32 chunks joining float64 (NaN and Inf propagate); taken again in float64 below
    ``_UNDERFLOW``, where float32 squares of values under ~1e-19 underflow (a vanishing gradient is not 0)."""
    squares = _shifted_sums(x, np.float32(0.0))[1]
    if squares < _UNDERFLOW:
        squares = 0.0
        for i in range(x.shape[0]):
            squares += np.float64(x[i]) * x[i]
    return squares


@njit(**_MATH)
def _finite_sum_squares(x):
    """(sum of the finite values' squares in float64, how many were not finite)."""
    total = 0.0
    nonfinite = 0.0
    for i in range(x.shape[0]):
        if np.isfinite(x[i]):
            total += np.float64(x[i]) * x[i]
        else:
            nonfinite += 1.0
    return total, nonfinite


@njit(**_MATH)
def _weight_moments(x, copy):
    """(n, mean, M2) of a weight from sums shifted by x[0], copied into ``copy`` (unless empty) chunk by chunk
    while the chunk is in cache."""
    k = x[0]
    s = 0.0
    q = 0.0
    keep = copy.shape[0] == x.shape[0]
    for c0 in range(0, x.shape[0], CHUNK):
        chunk = x[c0 : c0 + CHUNK]
        a, b = _shifted_sums(chunk, k)  # one chunk: one float32 partial each
        if keep:  # a loop: numba's slice assignment is 2x slower than the whole pass (measured)
            target = copy[c0 : c0 + CHUNK]
            for j in range(chunk.shape[0]):
                target[j] = chunk[j]
        s += a
        q += b
    n = x.shape[0]
    return n, k + s / n, max(0.0, q - s * s / n)


@njit(**_PARALLEL)
def _square_sums(arrays, out):
    """out[i] = sum(arrays[i]^2) for a typed list of arrays, in parallel over the list."""
    for i in prange(np.int64(len(arrays))):
        out[i] = _sum_squares(arrays[np.int64(i)])


@njit(**_PARALLEL)
def _weight_pass(weights, copies, out):
    """out[i] = (n, M2) of weights[i], copied into copies[i] unless that is empty; in parallel over the list."""
    for i in prange(np.int64(len(weights))):
        n, _, m2 = _weight_moments(weights[np.int64(i)], copies[np.int64(i)])
        out[i, 0] = n
        out[i, 1] = m2


@njit(**_PARALLEL)
def _update_pass(now, before, out):
    """out[i] = (||now[i] - before[i]||^2, ||before[i]||^2), in parallel over the lists."""
    for i in prange(np.int64(len(now))):
        change, size = _update_sums(now[np.int64(i)], before[np.int64(i)])
        out[i, 0] = change
        out[i, 1] = size


@njit(**_MATH)
def _update_sums(now, before):
    """(||now - before||^2, ||before||^2) in one pass over both."""
    change = 0.0
    size = 0.0
    for c0 in range(0, now.shape[0], CHUNK):
        a = now[c0 : c0 + CHUNK]
        b = before[c0 : c0 + CHUNK]
        part = np.float32(0.0)
        part_size = np.float32(0.0)
        for j in range(a.shape[0]):
            d = a[j] - b[j]
            part += d * d
            part_size += b[j] * b[j]
        change += part
        size += part_size
    return change, size


# --- the Collector (Python, the C++ class's interface) ---------------------------------------------------


def _typed(arrays: list[np.ndarray]) -> List:
    """A numba typed list of flat float32 arrays (what the parallel kernels take; about 2 µs an array)."""
    typed = List.empty_list(numba.float32[::1])
    for array in arrays:
        typed.append(array)
    return typed


def _merge(a: list[float], b: list[float]) -> list[float]:
    """Two activation moments [n, mean, M2, min, max, squares] combined (Chan, Golub and LeVeque)."""
    n = a[0] + b[0]
    if n == 0:
        return a
    delta = b[1] - a[1]
    nan = math.isnan(a[3]) or math.isnan(b[3])
    return [
        n,
        a[1] + delta * b[0] / n,
        a[2] + b[2] + delta * delta * a[0] * b[0] / n,
        math.nan if nan else min(a[3], b[3]),
        math.nan if nan or math.isnan(a[4]) or math.isnan(b[4]) else max(a[4], b[4]),
        a[5] + b[5],
    ]


class _SlotSums:
    """Everything one layer call accumulates over a step: one row of the table (SUMS_COLUMNS)."""

    __slots__ = ("activation", "counted", "grad", "grad_nonfinite", "maxima", "nonfinite", "saturated")

    def __init__(self) -> None:
        self.activation = [0.0, 0.0, 0.0, math.inf, -math.inf, 0.0]
        self.nonfinite = self.saturated = self.counted = self.grad_nonfinite = 0.0
        self.maxima: np.ndarray | None = None
        self.grad = math.nan  # no output gradient received

    def add_units(self, maxima: np.ndarray | None, saturated: float, counted: float) -> None:
        self.saturated += saturated
        self.counted += counted
        if maxima is None:
            return
        if self.maxima is None:
            self.maxima = maxima
        elif self.maxima.shape == maxima.shape:  # a micro-batch of another shape adds no unit sums
            np.maximum(self.maxima, maxima, out=self.maxima)

    def row(self, params: list[float]) -> list[float]:
        """The row (``steadygrad._layout.SUMS_COLUMNS``, filled by name), with the layer's parameter sums (weight-grad
        and bias-grad squares, weight n and M2)."""
        row = [0.0] * COLUMNS
        row[SUMS_ACTIVATION] = [*self.activation, self.nonfinite]
        row[SUMS.saturated], row[SUMS.counted] = self.saturated, self.counted
        if self.maxima is not None:
            row[SUMS.units] = self.maxima.shape[0]
            row[SUMS.dead] = int(np.count_nonzero(~(self.maxima > 0)))
        row[SUMS.grad_squares], row[SUMS.grad_nonfinite] = self.grad, self.grad_nonfinite
        row[SUMS_PARAMETERS] = params
        return row


def _output_sums_of(y: np.ndarray, rows: int, units: int, kind: int) -> tuple[list[float], float, tuple]:
    """(activation moments, non-finite count, (maxima, saturated, counted)) of one output."""
    maxima = np.full(units, -np.inf, dtype=np.float32) if kind == RECTIFIER else _NONE
    out = np.zeros(8)
    if y.shape[0]:
        _output_sums(y, rows, units, kind, maxima, out)
        out[3], out[4] = y.min(), y.max()  # NaN propagates: the check below sees it
        # NaN/Inf, or float32 squares of tiny values (not all zeros) that underflowed: the float64 finite-only sums
        tiny = out[5] < _UNDERFLOW and (out[3] != 0 or out[4] != 0)
        if not np.isfinite(out[:6]).all() or tiny:
            maxima[:] = -np.inf
            _finite_output_sums(y, rows, units, kind, maxima, out)
    counted = float(y.shape[0]) if kind in (TANH, SIGMOID) else 0.0
    units_sums = (maxima if kind == RECTIFIER else None, float(out[6]), counted)
    return out[:6].tolist(), float(out[7]), units_sums


def _layout(y: torch.Tensor, kind: int) -> tuple[int, int]:
    """An (N, *) output as rows of units: rows matter only to a rectifier's units; else one flat row."""
    n = y.numel()
    rows = y.shape[0] if kind == RECTIFIER and y.dim() >= 1 and n > 0 else 1
    return rows, (n // rows if rows else 0)


class Collector:
    """The Monitor's taps for one logged step (``csrc/collector.h``'s interface): see the module docstring.

    Args (per watched layer, by index): the weights and biases whose gradients are summed at the step's end, the
    first weight (its statistics and update ratio) and a buffer for its copy before the update (None: no ratio).
    """

    def __init__(self, weights, biases, first_weights, snapshots) -> None:
        if not len(weights) == len(biases) == len(first_weights) == len(snapshots):
            raise ValueError("Collector: weights, biases, first weights and snapshots are per layer, of one length")
        self.weights, self.biases = weights, biases
        self.first_weights, self.snapshots = first_weights, snapshots
        self._sums: list[_SlotSums] = []
        self._pending: dict[int, tuple] = {}  # tap -> (output, slot, kind): outputs waiting for their gradient
        self._taps = 0
        self._copied = [False] * len(weights)
        self._lists = None  # (key, numba lists, copied layers) of the last statistics() call: see _weight_lists
        self._lock = threading.Lock()  # gradient hooks may run on autograd's worker threads

    @staticmethod
    def columns() -> int:
        """The width of a row of ``statistics``, as the C++ Collector's ``columns()`` (checked against the layout)."""
        return COLUMNS

    def _slot(self, index: int) -> _SlotSums:
        while len(self._sums) <= index:
            self._sums.append(_SlotSums())
        return self._sums[index]

    def _add_output(self, y: torch.Tensor, slot: int, kind: int, moments_wanted: bool = True) -> None:
        rows, units = _layout(y, kind)
        moments, nonfinite, unit_sums = _output_sums_of(_array(y), rows, units, kind)
        with self._lock:
            sums = self._slot(slot)
            if moments_wanted:
                sums.activation = _merge(sums.activation, moments)
                sums.nonfinite += nonfinite
            sums.add_units(*unit_sums)

    def output(self, y: torch.Tensor, slot: int, kind: int) -> None:
        """A layer call's output: summed with its gradient when that arrives (now, if it will get none)."""
        if not y.requires_grad:
            self._add_output(y, slot, kind)
            return
        with self._lock:
            tap = self._taps
            self._taps += 1
            self._pending[tap] = (y.detach(), slot, kind)
        # a weak reference: a monitor closed before this backward pass is neither kept alive nor written to
        collector = weakref.ref(self)

        def receive(grad, tap=tap, slot=slot):
            live = collector()
            if live is not None:
                live._add_gradient(grad, slot, tap)

        on_gradient(y, receive)

    def units(self, y: torch.Tensor, slot: int, kind: int) -> None:
        """An activation function's output that is not the layer's own: its unit statistics only."""
        self._add_output(y, slot, kind, moments_wanted=False)

    def _add_gradient(self, grad: torch.Tensor, slot: int, tap: int) -> None:
        with self._lock:
            waiting = self._pending.pop(tap, None)  # the first gradient of this output (a second finds it gone)
        if waiting is not None:
            self._add_output(*waiting)
        g = _array(grad)
        squares, nonfinite = _sum_squares(g), 0.0
        if not math.isfinite(squares):
            squares, nonfinite = _finite_sum_squares(g)
        with self._lock:
            sums = self._slot(slot)
            sums.grad = (0.0 if math.isnan(sums.grad) else sums.grad) + squares
            sums.grad_nonfinite += nonfinite

    def statistics(self, slot_layers: list[int], snapshot: bool = True) -> torch.Tensor:
        """Every slot's row of sums, (slots, COLUMNS) float64; slot_layers[i] is slot i's layer.
        Adds each slot's parameter gradients and first weight, copying each first weight once when ``snapshot``
        (for ``update_norms``; without it nothing is copied): two numba calls, each parallel over all the tensors."""
        with self._lock:
            waiting, self._pending = self._pending, {}
        for y, slot, kind in waiting.values():  # outputs whose gradient never came
            self._add_output(y, slot, kind)
        self._copied = [False] * len(self.weights)
        grads, grad_cells, weighted = [], [], []  # grad_cells: (slot, column) each sum goes to
        for index, layer in enumerate(slot_layers):
            if not 0 <= layer < len(self.weights):
                raise IndexError("Collector: layer index out of range")
            for column, group in ((0, self.weights[layer]), (1, self.biases[layer])):
                for p in group:
                    if p.grad is not None:
                        grads.append(_array(p.grad))
                        grad_cells.append((index, column))
            weight, buffer = self.first_weights[layer], self.snapshots[layer]
            if weight is not None:
                # a layer called several times is copied once
                copy = snapshot and not self._copied[layer] and buffer is not None and buffer.numel() == weight.numel()
                self._copied[layer] = self._copied[layer] or copy
                weighted.append((index, layer, copy))
        squares = np.zeros(len(grads))
        if grads:
            _square_sums(_typed(grads), squares)
        moments = np.zeros((len(weighted), 2))
        if weighted:
            lists = self._weight_lists(tuple((layer, copy) for _, layer, copy in weighted))
            _weight_pass(lists[0], lists[1], moments)
        params = [[math.nan, math.nan, 0.0, 0.0] for _ in slot_layers]  # weight-grad, bias-grad squares, n, M2
        for (index, column), value in zip(grad_cells, squares.tolist(), strict=True):
            total = params[index][column]
            params[index][column] = (0.0 if math.isnan(total) else total) + value
        for (index, _, _), (n, m2) in zip(weighted, moments.tolist(), strict=True):
            params[index][2:] = [n, m2]
        rows = [self._slot(index).row(params[index]) for index in range(len(slot_layers))]
        return torch.tensor(rows, dtype=torch.float64).reshape(len(slot_layers), COLUMNS)

    def _weight_lists(self, entries: tuple[tuple[int, bool], ...]) -> tuple[List, List, List, List]:
        """numba lists for (layer, copied) entries: the weights and their copy buffers (empty: no copy), and the
        copied weights and buffers again for ``update_norms``. Kept between steps while every weight is the same
        float32 CPU tensor in the same memory, since a list costs about 2 µs an array to make."""
        weights = [self.first_weights[layer] for layer, _ in entries]
        viewable = all(w.dtype is torch.float32 and w.is_cpu and w.is_contiguous() for w in weights)
        key = (entries, tuple(w.data_ptr() for w in weights)) if viewable else None
        if key is None or self._lists is None or self._lists[0] != key:
            arrays = [_array(w) for w in weights]
            copies = [self.snapshots[layer].view(-1).numpy() if copy else _NONE for layer, copy in entries]
            copied = [i for i, (_, copy) in enumerate(entries) if copy]
            lists = tuple(
                _typed(chosen) for chosen in (arrays, copies, [arrays[i] for i in copied], [copies[i] for i in copied])
            )
            self._lists = (key, lists, [entries[i][0] for i in copied])
        return self._lists[1]

    def update_norms(self) -> torch.Tensor:
        """(layers, 2): [||W - W_before||^2, ||W_before||^2] for the weights ``statistics`` copied, NaN elsewhere."""
        table = np.full((len(self.weights), 2), math.nan)
        if any(self._copied):  # copied by this step's statistics(), whose lists are the last made
            _, (_, _, now, before), layers = self._lists
            sums = np.zeros((len(layers), 2))
            _update_pass(now, before, sums)
            table[layers] = sums
        return torch.from_numpy(table)

    def clear(self) -> None:
        """Forget this step's sums (the parameters and snapshot buffers stay)."""
        with self._lock:
            self._sums.clear()
            self._pending.clear()
        self._copied = [False] * len(self.weights)


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel on tiny inputs, for the types real calls use."""
    x = np.linspace(-1.0, 1.0, 12, dtype=np.float32)
    for kind in (NO_KIND, TANH, SIGMOID, RECTIFIER):
        _output_sums_of(x, 3, 4, kind)
        _finite_output_sums(x, 3, 4, kind, np.full(4, -np.inf, dtype=np.float32), np.zeros(8))
    _sum_squares(x)
    _finite_sum_squares(x)
    _weight_moments(x, np.empty_like(x))
    _weight_moments(x, _NONE)
    _update_sums(x, x)
    _square_sums(_typed([x, x]), np.zeros(2))
    _weight_pass(_typed([x, x]), _typed([np.empty_like(x), _NONE]), np.zeros((2, 2)))
    _update_pass(_typed([x]), _typed([x]), np.zeros((1, 2)))
