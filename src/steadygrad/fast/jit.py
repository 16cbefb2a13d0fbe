"""steadygrad's fused normalization kernels compiled by numba: the fast path where no C++ compiler is found.

numba compiles Python to machine code with the LLVM that ships inside its wheel, so these kernels need no
system compiler, no ninja and no headers. They run the same math, in the same order, as ``csrc/norm.cpp``
(see its header comment): statistics from sums shifted by a sample of each group (Chan, Golub and LeVeque
1983), float32 partial sums joining float64 every ``CHUNK`` values, each group's second read while it is still
in cache, and a backward that reads each group from memory twice, its sums for dgamma and dbeta taken while
the group is in cache. Reductions vectorize
because the kernels allow LLVM to reassociate floating-point sums (``fastmath={"reassoc", "contract"}``),
while NaN and Inf keep their IEEE meaning (no "nnan"/"ninf"), so a broken input still gives NaN, as torch's
kernels do.

Only ``steadygrad.fast.enable()`` imports this module (numba is an optional dependency: ``pip install
"steadygrad[numba]"``). Each kernel is compiled on its first call, which ``enable`` makes on tiny inputs so that
the cost is paid there, once, and measured; numba caches the machine code on disk (``__pycache__`` beside this
file, or numba's user cache directory where that is read-only; ``NUMBA_CACHE_DIR`` moves it), so later
processes load it in well under a second.

The entry points, ``batch_norm_train`` and ``rows_norm``, take the arguments of the C++ module's, so
``steadygrad.norm.functional`` calls either the same way. Work is split over numba's threads
(``numba.set_num_threads``; ``enable`` sets torch's count).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange
from torch.autograd.graph import increment_version

from steadygrad._autograd import no_double_backward

__all__ = ["batch_norm_train", "rows_norm", "warm_up"]

CHUNK = 4096  # float32 partial sums cover at most this many values before joining a float64
FLUSH_ROWS = 64  # row sweeps add their float32 column buffers into float64 this often
SMALL_L = 16  # BatchNorm with fewer values per (sample, channel) sweeps whole rows instead of channels

_MATH = {"fastmath": {"reassoc", "contract"}, "error_model": "numpy", "cache": True, "nogil": True}
_PARALLEL = {**_MATH, "parallel": True}
_NONE = np.empty(0, dtype=np.float32)  # an absent weight, bias or gradient
_NO_GRADS = np.empty((2, 0), dtype=np.float32)  # the forward has no dgamma and dbeta to write


# --- shared pieces ----------------------------------------------------------------------------------------
# Loops index slices from 0 (``xr = x[o:o + d]; xr[j]``), never ``x[o + j]``: numba must then check every
# offset index for a negative value to wrap, which stops LLVM from vectorizing the loop (3x slower, measured).


@njit(**_MATH)
def _shifted_sums(x, k):
    """sum(x - k) and sum((x - k)^2) over a 1-D slice, float32 chunks joining float64."""
    s = 0.0
    q = 0.0
    for c0 in range(0, x.shape[0], CHUNK):
        chunk = x[c0 : c0 + CHUNK]
        a = np.float32(0.0)
        b = np.float32(0.0)
        for j in range(chunk.shape[0]):
            t = chunk[j] - k
            a += t
            b += t * t
        s += a
        q += b
    return s, q


@njit(**_MATH)
def _gradient_sums(dy, x, k):
    """sum(dy) and sum(dy * (x - k)) over two 1-D slices of one length, float32 chunks joining float64."""
    s = 0.0
    q = 0.0
    for c0 in range(0, x.shape[0], CHUNK):
        g = dy[c0 : c0 + CHUNK]
        xc = x[c0 : c0 + CHUNK]
        a = np.float32(0.0)
        b = np.float32(0.0)
        for j in range(xc.shape[0]):
            a += g[j]
            b += g[j] * (xc[j] - k)
        s += a
        q += b
    return s, q


@njit(**_MATH)
def _affine(x, y, k, scale, beta):
    """y = (x - k) scale + beta over 1-D slices: the normalization with the mean and the affine map folded in."""
    for j in range(x.shape[0]):
        y[j] = (x[j] - k) * scale + beta


@njit(**_MATH)
def _combine(dy, x, dx, k, scale, c, e):
    """dx = scale dy + c (x - k) + e over 1-D slices: the backward with its reductions folded into c and e."""
    for j in range(x.shape[0]):
        dx[j] = scale * dy[j] + c * (x[j] - k) + e


@njit(**_MATH)
def _statistics(s, q, m, eps):
    """(mean deviation md, biased variance, rstd) of a group from its shifted sums over m values."""
    md = s / m
    var = q / m - md * md
    if not var > 0.0:  # rounding (or NaN, as C++'s std::max(0.0, var) gives): zero
        var = 0.0
    return md, var, 1.0 / math.sqrt(var + eps)


@njit(**_MATH)
def _coefficients(sum_g, sum_gt, md, rstd, m):
    """dx = rstd g + c t + e: the backward's c and e from A = sum(g), B = sum(g t) (csrc/norm.cpp's header)."""
    g_xhat = rstd * (sum_gt - md * sum_g) / m
    return -rstd * rstd * g_xhat, rstd * rstd * g_xhat * md - rstd * sum_g / m


@njit(**_MATH)
def _move_running(running_mean, running_var, ch, mean, var, count, momentum):
    """running <- (1 - momentum) running + momentum batch, as torch.nn's BatchNorm; the variance unbiased."""
    if running_mean.shape[0] > 0:
        running_mean[ch] = (1.0 - momentum) * running_mean[ch] + momentum * mean
    if running_var.shape[0] > 0:
        running_var[ch] = (1.0 - momentum) * running_var[ch] + momentum * var * count / (count - 1.0)


def _chunks(rows: int) -> int:
    """Row chunks of a parallel sweep, each with its own partial sums: one per thread."""
    return max(1, min(rows, numba.get_num_threads()))


# --- layer and group norm: rows of d values; row r in group r % groups ----------------------------------


@njit(**_PARALLEL)
def _rows_forward(x, w, b, y, shift, dev, rstd, groups, cpg, hw, per_element, eps):
    d = cpg * hw
    rows = shift.shape[0]
    has_w = w.shape[0] > 0
    has_b = b.shape[0] > 0
    # LayerNorm's elementwise affine, ones and zeros standing in for an absent weight or bias (as in the backward)
    ones = np.ones(d if per_element and not has_w else 0, dtype=np.float32)
    zeros = np.zeros(d if per_element and not has_b else 0, dtype=np.float32)
    gammas = w if has_w or not per_element else ones
    betas = b if has_b or not per_element else zeros
    for r in prange(rows):
        xr = x[r * d : (r + 1) * d]
        yr = y[r * d : (r + 1) * d]
        k = xr[0]
        s, q = _shifted_sums(xr, k)
        md64, _, rs64 = _statistics(s, q, d, eps)
        md = np.float32(md64)
        rs = np.float32(rs64)
        shift[r] = k
        dev[r] = md
        rstd[r] = rs
        if not per_element:  # GroupNorm: a scale and shift per channel
            base = (r % groups) * cpg
            for c in range(cpg):
                scale = rs * (w[base + c] if has_w else np.float32(1.0))
                beta = (b[base + c] if has_b else np.float32(0.0)) - md * scale
                _affine(xr[c * hw : (c + 1) * hw], yr[c * hw : (c + 1) * hw], k, scale, beta)
        else:  # LayerNorm: y = x_hat gamma + beta
            for j in range(d):
                yr[j] = ((xr[j] - k) - md) * rs * gammas[j] + betas[j]


@njit(**_PARALLEL)
def _rows_backward(dy, x, shift, dev, rstd, w, dx, part_w, part_b, groups, cpg, hw, per_element):
    d = cpg * hw
    rows = shift.shape[0]
    has_w = w.shape[0] > 0
    need_affine = part_w.shape[1] > 0
    chunks = part_w.shape[0]
    per = (rows + chunks - 1) // chunks
    ones = np.ones(d if per_element and not has_w else 0, dtype=np.float32)
    gamma = w if has_w or not per_element else ones
    for chunk in prange(chunks):
        pw = part_w[chunk]
        pb = part_b[chunk]
        lw = np.zeros(d if per_element and need_affine else 0, dtype=np.float32)
        lb = np.zeros_like(lw)
        chan_a = np.empty(cpg, dtype=np.float64)
        chan_b = np.empty(cpg, dtype=np.float64)
        pending = 0
        stop = min(rows, (chunk + 1) * per)
        for r in range(chunk * per, stop):
            xr = x[r * d : (r + 1) * d]
            gr = dy[r * d : (r + 1) * d]
            dxr = dx[r * d : (r + 1) * d]
            k = shift[r]
            md = dev[r]
            rs = rstd[r]
            if per_element:
                a = 0.0
                bsum = 0.0
                for c0 in range(0, d, CHUNK):
                    xc = xr[c0 : c0 + CHUNK]
                    gc = gr[c0 : c0 + CHUNK]
                    wc = gamma[c0 : c0 + CHUNK]
                    pa = np.float32(0.0)
                    pq = np.float32(0.0)
                    for j in range(xc.shape[0]):
                        g = gc[j] * wc[j]
                        pa += g
                        pq += g * (xc[j] - k)
                    a += pa
                    bsum += pq
                c64, e64 = _coefficients(a, bsum, md, rs, d)
                c = np.float32(c64)
                e = np.float32(e64)
                for j in range(d):
                    dxr[j] = rs * gamma[j] * gr[j] + c * (xr[j] - k) + e
                if need_affine:
                    for j in range(d):
                        lw[j] += gr[j] * ((xr[j] - k) - md) * rs
                        lb[j] += gr[j]
                    pending += 1
                    if pending == FLUSH_ROWS or r + 1 == stop:
                        for j in range(d):
                            pw[j] += lw[j]
                            pb[j] += lb[j]
                            lw[j] = 0.0
                            lb[j] = 0.0
                        pending = 0
            else:
                base = (r % groups) * cpg
                a = 0.0
                bsum = 0.0
                for c in range(cpg):  # per channel, then weighted by its gamma
                    ca, cb = _gradient_sums(gr[c * hw : (c + 1) * hw], xr[c * hw : (c + 1) * hw], k)
                    chan_a[c] = ca
                    chan_b[c] = cb
                    wc = w[base + c] if has_w else 1.0
                    a += wc * ca
                    bsum += wc * cb
                c64, e64 = _coefficients(a, bsum, md, rs, d)
                c_t = np.float32(c64)
                e = np.float32(e64)
                for c in range(cpg):
                    scale = rs * (w[base + c] if has_w else np.float32(1.0))
                    lo = c * hw
                    _combine(gr[lo : lo + hw], xr[lo : lo + hw], dxr[lo : lo + hw], k, scale, c_t, e)
                    if need_affine:  # dgamma_c = rstd (sum(dy t) - md sum(dy)), dbeta_c = sum(dy)
                        pw[base + c] += rs * (chan_b[c] - md * chan_a[c])
                        pb[base + c] += chan_a[c]


# --- batch norm over (N, C, L): per channel over N and L; channel ch's shift is x[0, ch, 0] ---------------


@njit(**_PARALLEL)
def _batch_forward_channels(x, w, b, y, n, c, length, stats, eps, running_mean, running_var, momentum):
    """L >= SMALL_L: a thread per channel; its N segments of L values stay in cache between the two passes.
    ``stats`` rows: shift, dev, mean, var, rstd (float32, per channel). The running statistics move too."""
    has_w = w.shape[0] > 0
    has_b = b.shape[0] > 0
    for ch in prange(c):
        k = x[ch * length]
        s = 0.0
        q = 0.0
        for i in range(n):
            o = (i * c + ch) * length
            a, a2 = _shifted_sums(x[o : o + length], k)
            s += a
            q += a2
        md, var, rs64 = _statistics(s, q, n * length, eps)
        rs = np.float32(rs64)
        stats[0, ch] = k
        stats[1, ch] = md
        stats[2, ch] = k + md
        stats[3, ch] = var
        stats[4, ch] = rs
        _move_running(running_mean, running_var, ch, k + md, var, n * length, momentum)
        scale = rs * (w[ch] if has_w else np.float32(1.0))
        beta = (b[ch] if has_b else np.float32(0.0)) - np.float32(md) * scale
        for i in range(n):
            o = (i * c + ch) * length
            _affine(x[o : o + length], y[o : o + length], k, scale, beta)


@njit(**_PARALLEL)
def _batch_backward_channels(dy, x, w, dx, n, c, length, stats, grads):
    """L >= SMALL_L, a thread per channel. ``grads`` rows: dgamma, dbeta."""
    has_w = w.shape[0] > 0
    for ch in prange(c):
        k = stats[0, ch]
        md = stats[1, ch]
        rs = stats[4, ch]
        a = 0.0
        bsum = 0.0
        for i in range(n):
            o = (i * c + ch) * length
            pa, pb = _gradient_sums(dy[o : o + length], x[o : o + length], k)
            a += pa
            bsum += pb
        wc = w[ch] if has_w else np.float32(1.0)
        grads[1, ch] = a
        grads[0, ch] = rs * (bsum - md * a)
        c64, e64 = _coefficients(wc * a, wc * bsum, md, rs, n * length)
        c_t = np.float32(c64)
        e = np.float32(e64)
        scale = rs * wc
        for i in range(n):
            o = (i * c + ch) * length
            _combine(dy[o : o + length], x[o : o + length], dx[o : o + length], k, scale, c_t, e)


@njit(**_MATH)
def _sweep_rows(x, dy, kw, width, start, stop, sums):
    """Small L, rows [start, stop): per column, sums[0] += sum(t), sums[1] += sum(t^2) with t = x - kw, or with
    a gradient dy, sum(dy) and sum(dy t). float32 buffers, flushed into float64 ``sums`` every FLUSH_ROWS rows."""
    s = np.zeros(width, dtype=np.float32)
    q = np.zeros(width, dtype=np.float32)
    gradient = dy.shape[0] > 0
    pending = 0
    for i in range(start, stop):
        xr = x[i * width : (i + 1) * width]
        if gradient:
            gr = dy[i * width : (i + 1) * width]
            for j in range(width):
                s[j] += gr[j]
                q[j] += gr[j] * (xr[j] - kw[j])
        else:
            for j in range(width):
                t = xr[j] - kw[j]
                s[j] += t
                q[j] += t * t
        pending += 1
        if pending == FLUSH_ROWS or i + 1 == stop:
            for j in range(width):
                sums[0, j] += s[j]
                sums[1, j] += q[j]
                s[j] = 0.0
                q[j] = 0.0
            pending = 0


@njit(**_PARALLEL)
def _batch_rows(x, dy, w, b, out, n, c, length, stats, grads, chunks, eps, running_mean, running_var, momentum):
    """L < SMALL_L (BatchNorm1d on (N, C)): a row holds every channel, so threads take chunks of rows, sum
    their columns, and the channels' totals follow. Forward (dy empty): y into ``out`` and ``stats`` filled;
    backward: dx into ``out``, dgamma and dbeta into ``grads``, from the forward's ``stats``. The forward
    moves the running statistics (empty arrays: none)."""
    width = c * length
    backward = dy.shape[0] > 0
    has_w = w.shape[0] > 0
    has_b = b.shape[0] > 0
    kw = np.empty(width, dtype=np.float32)
    for j in range(width):
        kw[j] = stats[0, j // length] if backward else x[(j // length) * length]  # channel ch's shift: x[0, ch, 0]
    sums = np.zeros((chunks, 2, width), dtype=np.float64)
    per = (n + chunks - 1) // chunks
    for chunk in prange(chunks):
        _sweep_rows(x, dy, kw, width, chunk * per, min(n, (chunk + 1) * per), sums[chunk])
    scale = np.zeros(width, dtype=np.float32)
    coef_t = np.empty(width, dtype=np.float32)
    const = np.empty(width, dtype=np.float32)
    for ch in range(c):
        first = 0.0
        second = 0.0
        for chunk in range(chunks):
            for j in range(ch * length, (ch + 1) * length):
                first += sums[chunk, 0, j]
                second += sums[chunk, 1, j]
        wc = w[ch] if has_w else np.float32(1.0)
        if backward:  # first = sum(dy), second = sum(dy t)
            md = stats[1, ch]
            rs = stats[4, ch]
            grads[1, ch] = first
            grads[0, ch] = rs * (second - md * first)
            c64, e64 = _coefficients(wc * first, wc * second, md, rs, n * length)
            s_c = rs * wc
            t_c = np.float32(c64)
            e_c = np.float32(e64)
        else:
            md64, var, rs64 = _statistics(first, second, n * length, eps)
            rs = np.float32(rs64)
            stats[0, ch] = kw[ch * length]
            stats[1, ch] = md64
            stats[2, ch] = kw[ch * length] + md64
            stats[3, ch] = var
            stats[4, ch] = rs
            _move_running(running_mean, running_var, ch, kw[ch * length] + md64, var, n * length, momentum)
            s_c = np.float32(0.0)
            t_c = rs * wc
            e_c = (b[ch] if has_b else np.float32(0.0)) - np.float32(md64) * t_c
        for j in range(ch * length, (ch + 1) * length):
            scale[j] = s_c
            coef_t[j] = t_c
            const[j] = e_c
    source = dy if backward else x  # the forward's scale is 0: y = coef_t t + const
    for i in prange(n):
        xr = x[i * width : (i + 1) * width]
        sr = source[i * width : (i + 1) * width]
        o = out[i * width : (i + 1) * width]
        for j in range(width):
            o[j] = scale[j] * sr[j] + coef_t[j] * (xr[j] - kw[j]) + const[j]


# --- the Python side: tensors in and out, autograd -----------------------------------------------------------


def _array(t: torch.Tensor | None) -> np.ndarray:
    """A flat float32 view of a contiguous float32 CPU tensor (no copy), the empty array for an absent or empty
    one, and a float32 CPU copy of anything else (the Monitor's taps take any output; the norms never pass one)."""
    if t is None or t.numel() == 0:
        return _NONE
    if t.dtype is torch.float32 and t.is_cpu and t.is_contiguous():
        return t.detach().view(-1).numpy()
    return t.detach().to("cpu", torch.float32).contiguous().view(-1).numpy()


def _batch_layout(x: torch.Tensor) -> tuple[int, int, int]:
    n, c = x.shape[0], x.shape[1]
    return n, c, (x.numel() // (n * c) if n * c else 0)


class NumbaBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm on (N, C, *) with the running statistics moved, as torch.nn's."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        n, c, length = _batch_layout(x)
        y = torch.empty_like(x)
        stats = torch.empty(5, c, dtype=torch.float32)  # shift, dev, mean, var, rstd per channel
        if x.numel():
            xa, w, b, ya, s = _array(x), _array(weight), _array(bias), y.view(-1).numpy(), stats.numpy()
            running = (_array(running_mean), _array(running_var), momentum)
            if length >= SMALL_L:
                _batch_forward_channels(xa, w, b, ya, n, c, length, s, eps, *running)
            else:
                _batch_rows(xa, _NONE, w, b, ya, n, c, length, s, _NO_GRADS, _chunks(n), eps, *running)
            # written through numpy: tell autograd they changed, as an in-place torch op would
            increment_version([t for t in (running_mean, running_var) if t is not None])
        ctx.save_for_backward(x, weight, stats)
        return y

    @staticmethod
    def backward(ctx, dy):
        no_double_backward()
        x, weight, stats = ctx.saved_tensors
        n, c, length = _batch_layout(x)
        dx = torch.empty_like(x)
        grads = torch.zeros(2, c, dtype=torch.float32)  # dgamma, dbeta
        if x.numel():
            dya, xa, dxa, w, s = _array(dy.contiguous()), _array(x), dx.view(-1).numpy(), _array(weight), stats.numpy()
            if length >= SMALL_L:
                _batch_backward_channels(dya, xa, w, dxa, n, c, length, s, grads.numpy())
            else:
                _batch_rows(xa, dya, w, _NONE, dxa, n, c, length, s, grads.numpy(), _chunks(n), 0.0, _NONE, _NONE, 0.0)
        dgamma, dbeta = grads.unbind()
        return dx, dgamma if ctx.needs_input_grad[1] else None, dbeta if ctx.needs_input_grad[2] else None, *[None] * 4


class NumbaRowsNorm(torch.autograd.Function):
    """LayerNorm (one group, elementwise affine) and GroupNorm (per-channel affine) on rows of d values."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, cpg, hw, per_element, eps):
        d = cpg * hw
        rows = x.numel() // d if d else 0
        y = torch.empty_like(x)
        stats = torch.empty(3, rows, dtype=torch.float32)  # shift, dev, rstd
        if x.numel():
            s = stats.numpy()
            _rows_forward(
                _array(x), _array(weight), _array(bias), y.view(-1).numpy(), s[0], s[1], s[2], groups, cpg, hw,
                per_element, eps,
            )  # fmt: skip
        ctx.save_for_backward(x, weight, stats)
        ctx.layout = (groups, cpg, hw, per_element)
        return y

    @staticmethod
    def backward(ctx, dy):
        no_double_backward()
        x, weight, stats = ctx.saved_tensors
        groups, cpg, hw, per_element = ctx.layout
        need_affine = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        width = (cpg * hw if per_element else groups * cpg) if need_affine else 0
        rows = stats.shape[1]
        dx = torch.empty_like(x)
        partial_w = np.zeros((_chunks(rows), width), dtype=np.float64)
        partial_b = np.zeros_like(partial_w)
        if x.numel():
            s, dya = stats.numpy(), _array(dy.contiguous())
            _rows_backward(
                dya, _array(x), s[0], s[1], s[2], _array(weight), dx.view(-1).numpy(), partial_w, partial_b, groups,
                cpg, hw, per_element,
            )  # fmt: skip
        dgamma = torch.from_numpy(partial_w.sum(0)).float() if ctx.needs_input_grad[1] else None
        dbeta = torch.from_numpy(partial_b.sum(0)).float() if ctx.needs_input_grad[2] else None
        return dx, dgamma, dbeta, None, None, None, None, None


def batch_norm_train(x, weight, bias, running_mean, running_var, momentum: float, eps: float) -> torch.Tensor:
    """Training-mode BatchNorm of a contiguous float32 (N, C, *) CPU tensor; the C++ module's signature."""
    return NumbaBatchNorm.apply(x, weight, bias, running_mean, running_var, float(momentum), float(eps))


def rows_norm(x, weight, bias, groups: int, cpg: int, hw: int, per_element: bool, eps: float) -> torch.Tensor:
    """LayerNorm/GroupNorm of a contiguous float32 tensor as rows of ``cpg * hw`` values; the C++ signature."""
    return NumbaRowsNorm.apply(x, weight, bias, int(groups), int(cpg), int(hw), bool(per_element), float(eps))


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel, on tiny inputs: ``enable`` pays the cost here."""
    x = torch.randn(2, 3, 4, requires_grad=True)
    w, b = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    rows_norm(x, w, b, 1, 4, 1, True, 1e-5).sum().backward()
    rows_norm(x.view(2, 3, 2, 2), torch.ones(3), None, 3, 1, 4, False, 1e-5).sum().backward()
    for shape in ((3, 2, 17), (4, 3)):  # the per-channel kernels (L >= SMALL_L) and the row sweeps
        xb = torch.randn(shape, requires_grad=True)
        batch_norm_train(xb, torch.ones(shape[1]), None, None, None, 0.1, 1e-5).sum().backward()
