"""Normalization as one statistics core with a hand-derived backward.

Batch, layer, instance and group normalization differ only in the set R of axes they reduce:

    ==========  ==================  ==================================================
    norm        input               R (axes averaged over)
    ==========  ==================  ==================================================
    batch       (N, C, *)           N and every spatial axis: one mean per channel
    instance    (N, C, *)           the spatial axes: one mean per (sample, channel)
    group       (N, G, C/G, *)      channels of a group and spatial: per (sample, group)
    layer       (*, *shape)         the trailing ``normalized_shape`` axes
    rms         (*, *shape)         the trailing axes, and no mean is subtracted
    ==========  ==================  ==================================================

Forward, with m = |R| elements per statistic (Ioffe & Szegedy 2015, alg. 1):

    mu = mean_R(x),  var = mean_R((x - mu)^2)  (biased),  x_hat = (x - mu) / sqrt(var + eps)
    y  = gamma * x_hat + beta

Backward (derived in ``normalize_backward``), with g = dL/dy * gamma:

    dL/dx = inv_std * (g - mean_R(g) - x_hat * mean_R(g * x_hat))
    dL/dgamma = sum(dL/dy * x_hat),  dL/dbeta = sum(dL/dy)   (over every axis gamma is broadcast along)

For batch norm gamma is constant over R and this is the seed material's
dx = (gamma * inv_std / m) * (m * dy - sum(dy) - x_hat * sum(dy * x_hat)).

RMS normalization (Zhang & Sennrich 2019) is the same core uncentred: mu is taken as 0, so "var" is the mean
square mean_R(x^2), x_hat = x / sqrt(mean_R(x^2) + eps), and the backward loses its mean_R(g) term:
dL/dx = inv_rms * (g - x_hat * mean_R(g * x_hat)).

Numerics: statistics are reduced in float32 at least (float16/bfloat16 inputs are computed in float32 and
returned in their own dtype), by a shifted two-pass algorithm that stays accurate where the one-pass
E[x^2] - E[x]^2 cancels catastrophically (inputs with mean 1e4 and std 1e-2 in float32): see
``normalize_forward``.

Three routes run this math, with the same results (tested against torch.nn in float64): ``steadygrad.fast``'s
kernels when enabled (C++ or numba; contiguous float32 on the CPU); ``streamed`` for other contiguous float32/float64
inputs in training mode (plain PyTorch ops in the fewest full passes over memory); and ``_Normalize`` below,
the formulas as written, for everything else (eval mode, strided layouts, float16/bfloat16).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.autograd.function import FunctionCtx

from steadygrad import fast
from steadygrad._autograd import no_double_backward
from steadygrad.norm import streamed

__all__ = [
    "affine_backward",
    "batch_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "normalize_backward",
    "normalize_forward",
    "rms_norm",
    "sync_batch_norm",
]

Dims = tuple[int, ...]


# --------------------------------------------------------------------------------------------------
# The pure math: statistics, forward, backward. No autograd, no modules.
# --------------------------------------------------------------------------------------------------


def normalize_forward(
    x: torch.Tensor, dims: Dims, eps: float, centered: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize ``x`` over ``dims`` with its own statistics.

    ``centered=False`` is RMS normalization: no mean is subtracted, ``var`` is the mean square mean(x^2) (taken
    directly: there is no difference of large numbers to cancel) and the mean returned is 0.

    Shifted-data algorithm (Chan, Golub, LeVeque 1983): subtract one sample K of each group first,
    d = x - K (exact when x and K are within a factor 2 of each other, Sterbenz' lemma), then
    mu_d = mean(d), var = mean(d^2) - mu_d^2, x_hat = (d - mu_d) * inv_std. Neither the mean nor the
    variance is then formed from large numbers: with inputs of mean 1e4 and std 1e-2 in float32, whose
    spacing at 1e4 is 1e-3, rounding mu to float32 alone would misplace every x_hat by up to 5% of a std,
    and the one-pass E[x^2] - E[x]^2 loses the variance entirely.

    Returns:
        ``(x_hat, mean, var, inv_std)``; the statistics keep their reduced axes (size 1) so they
        broadcast against ``x``. ``var`` is the biased variance.
    """
    if not centered:
        mean_square = x.square().mean(dim=dims, keepdim=True)
        inv_rms = torch.rsqrt(mean_square + eps)
        return x * inv_rms, torch.zeros_like(mean_square), mean_square, inv_rms
    shift = x
    for dim in dims:
        shift = shift.narrow(dim, 0, 1)  # K: the first sample of each group
    deviation = x - shift
    m = math.prod(x.shape[d] for d in dims)
    mean_deviation = deviation.mean(dim=dims, keepdim=True)
    # one pass over the shifted values: |mean(d)| is of the order of a std, so E[d^2] - E[d]^2 does not
    # cancel the way E[x^2] - E[x]^2 does, and it saves a pass over the data (which is what this costs)
    second = deviation.square().sum(dim=dims, keepdim=True).div_(m)  # (vector_norm over dim 0 is 10x slower)
    var = second.sub_(mean_deviation.square()).clamp_(min=0.0)
    inv_std = torch.rsqrt(var + eps)
    x_hat = torch.addcmul(-mean_deviation * inv_std, deviation, inv_std)  # (d - mu_d) * inv_std
    return x_hat, shift + mean_deviation, var, inv_std


def normalize_backward(
    grad_out: torch.Tensor,
    x_hat: torch.Tensor,
    inv_std: torch.Tensor,
    weight: torch.Tensor | None,
    dims: Dims,
    batch_stats: bool = True,
    centered: bool = True,
) -> torch.Tensor:
    """dL/dx of y = gamma * (x - mu) * inv_std + beta, where mu and inv_std are statistics over ``dims``.

    Derivation, with m elements per statistic and x_hat = (x - mu) * inv_std:

        (1) dL/dx_hat = g = dL/dy * gamma
        (2) dL/dvar   = -(1/2) * inv_std^3 * sum_R(g * (x - mu)) = -(inv_std^2 / 2) * sum_R(g * x_hat)
        (3) dL/dmu    = -inv_std * sum_R(g)   (the term through var vanishes: sum_R(x - mu) = 0)
        (4) dL/dx     = g * inv_std + dL/dvar * 2 (x - mu) / m + dL/dmu / m
                      = inv_std * (g - mean_R(g) - x_hat * mean_R(g * x_hat))

    With ``batch_stats=False`` the statistics are constants (eval mode with running averages):
    only term (1) remains, dL/dx = g * inv_std.

    Uncentred (RMS norm, ``centered=False``): mu = 0 is no function of x, so term (3) is gone and (2) reads
    dL/dms = -(inv_rms^2 / 2) * sum_R(g * x_hat) through ms = mean_R(x^2), giving
    dL/dx = inv_rms * (g - x_hat * mean_R(g * x_hat)).
    """
    g = grad_out if weight is None else grad_out * weight  # (1)
    if not batch_stats:
        return g * inv_std
    if not centered:
        return torch.addcmul(g * inv_std, x_hat, -inv_std * (g * x_hat).mean(dim=dims, keepdim=True))
    mean_g = g.mean(dim=dims, keepdim=True)  # (3), divided by m
    mean_g_xhat = (g * x_hat).mean(dim=dims, keepdim=True)  # (2), divided by m
    # (4) as g * inv_std + x_hat * (-inv_std mean(g x_hat)) + (-inv_std mean(g)): two passes, not four
    return torch.addcmul(-inv_std * mean_g, g, inv_std).addcmul_(x_hat, -inv_std * mean_g_xhat)


def affine_backward(
    grad_out: torch.Tensor,
    x_hat: torch.Tensor,
    weight_shape: torch.Size | None,
    bias_shape: torch.Size | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dL/dgamma = sum(dL/dy * x_hat) and dL/dbeta = sum(dL/dy), each summed over every axis its
    parameter is broadcast along (``sum_to_size``)."""
    grad_weight = None if weight_shape is None else (grad_out * x_hat).sum_to_size(weight_shape)
    grad_bias = None if bias_shape is None else grad_out.sum_to_size(bias_shape)
    return grad_weight, grad_bias


# --------------------------------------------------------------------------------------------------
# The thin autograd wrapper: save what backward needs, call the pure functions.
# --------------------------------------------------------------------------------------------------

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


class _Normalize(torch.autograd.Function):
    """y = weight * normalize(x over dims) + bias; also returns the batch statistics (not differentiable).

    With ``mean``/``var`` given, those constants normalize instead (eval mode with running averages);
    ``centered=False`` normalizes by the root mean square (RMS norm).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x, weight, bias, dims, eps, mean=None, var=None, centered=True):
        compute = _compute_dtype(x.dtype)
        x_c = x.to(compute)
        batch_stats = mean is None
        if batch_stats:
            x_hat, mean, var, inv_std = normalize_forward(x_c, dims, eps, centered)
        else:
            inv_std = torch.rsqrt(var.to(compute) + eps)
            x_hat = (x_c - mean.to(compute)) * inv_std
        if weight is not None and bias is not None:
            y = torch.addcmul(bias.to(compute), x_hat, weight.to(compute))
        else:
            y = x_hat if weight is None else x_hat * weight.to(compute)
            y = y if bias is None else y + bias.to(compute)
        ctx.save_for_backward(x_hat, inv_std, weight)
        ctx.dims, ctx.batch_stats, ctx.centered = dims, batch_stats, centered
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.mark_non_differentiable(mean, var)
        return y.to(x.dtype), mean, var

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        no_double_backward()
        x_hat, inv_std, weight = ctx.saved_tensors
        g = grad_y.to(x_hat.dtype)
        constant = _constant_over(weight, x_hat.dim(), ctx.dims) and _constant_over(
            ctx.bias_shape, x_hat.dim(), ctx.dims
        )
        if ctx.batch_stats and ctx.centered and ctx.needs_input_grad[0] and constant:
            return _constant_affine_backward(ctx, g, x_hat, inv_std, weight, grad_y.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = None if weight is None else weight.to(x_hat.dtype)
            grad_x = normalize_backward(g, x_hat, inv_std, w, ctx.dims, ctx.batch_stats, ctx.centered)
            grad_x = grad_x.to(grad_y.dtype)
        weight_shape = weight.shape if weight is not None and ctx.needs_input_grad[1] else None
        bias_shape = ctx.bias_shape if ctx.needs_input_grad[2] else None
        grad_weight, grad_bias = affine_backward(g, x_hat, weight_shape, bias_shape)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(grad_y.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


def _constant_over(param: torch.Tensor | torch.Size | None, ndim: int, dims: Dims) -> bool:
    """Whether gamma (or beta) is one number per statistic (size 1 along every reduced axis): batch and instance
    norm. Takes a parameter or its shape."""
    shape = None if param is None else tuple(param.shape if isinstance(param, torch.Tensor) else param)
    return shape is None or (len(shape) == ndim and all(shape[d] == 1 for d in dims))


def _constant_affine_backward(ctx, dy, x_hat, inv_std, weight, out_dtype):
    """``normalize_backward`` and ``affine_backward`` in five passes when gamma is constant over R: then
    sum_R(g) = gamma sum_R(dy) and sum_R(g x_hat) = gamma sum_R(dy x_hat), the two sums dgamma and dbeta
    need anyway, and (4) becomes dx = a dy + b x_hat + c with a = gamma inv_std,
    b = -a mean_R(dy x_hat), c = -a mean_R(dy)."""
    dims = ctx.dims
    m = math.prod(x_hat.shape[d] for d in dims)
    sum_dy = dy.sum(dim=dims, keepdim=True)  # (3)
    sum_dy_xhat = (dy * x_hat).sum(dim=dims, keepdim=True)  # (2)
    a = inv_std if weight is None else inv_std * weight.to(x_hat.dtype)
    grad_x = torch.addcmul(-a * sum_dy / m, dy, a).addcmul_(x_hat, -a * sum_dy_xhat / m)  # (4)
    grad_weight = grad_bias = None
    if ctx.needs_input_grad[1]:
        grad_weight = sum_dy_xhat.sum_to_size(weight.shape).to(weight.dtype)
    if ctx.needs_input_grad[2]:
        grad_bias = sum_dy.sum_to_size(ctx.bias_shape).to(out_dtype)
    return grad_x.to(out_dtype), grad_weight, grad_bias, None, None, None, None, None


def _fast(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether the opt-in compiled kernels (``steadygrad.fast``) take this call: contiguous float32 on CPU."""
    if not fast.enabled() or x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        return False
    for p in params:  # noqa: SIM110 (a loop: a generator costs a microsecond more, on every call)
        if p is not None and (p.dtype != torch.float32 or not p.is_contiguous()):
            return False
    return True


def _all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


class _SyncBatch(torch.autograd.Function):
    """Batch norm in training mode over the batch of every rank of ``group`` (synchronized BatchNorm).

    Forward: two all-reduces make the statistics exactly those of the concatenated batch (the two-pass
    variance: counts and sums give the global mean, then the squared deviations from it). Backward: the
    same hand-derived formula, with the two sums it needs, sum(g) and sum(g * x_hat), all-reduced, so each
    rank's dx is the derivative of the sum of every rank's loss, as on the concatenated batch.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):
        compute = _compute_dtype(x.dtype)
        xc = x.to(compute)
        dims = (0, *range(2, x.dim()))
        local = torch.stack(
            [
                torch.tensor(float(xc.numel() // xc.size(1)), dtype=torch.float64).expand(xc.size(1)),
                xc.sum(dim=dims, dtype=torch.float64),
            ]
        )
        _all_reduce(local, group)
        count = local[0, 0]
        mean = (local[1] / count).to(compute)
        view = (1, -1) + (1,) * (x.dim() - 2)
        centered = xc - mean.reshape(view)
        squares = _all_reduce(centered.square().sum(dim=dims, dtype=torch.float64), group)
        var = (squares / count).clamp(min=0.0).to(compute)
        inv_std = torch.rsqrt(var + eps).reshape(view)
        x_hat = centered * inv_std
        y = x_hat if weight is None else x_hat * weight.to(compute).reshape(view)
        if bias is not None:
            y = y + bias.to(compute).reshape(view)
        ctx.save_for_backward(x_hat, inv_std, weight)
        ctx.group, ctx.count, ctx.dims, ctx.view = group, float(count), dims, view
        ctx.mark_non_differentiable(mean, var)
        return y.to(x.dtype), mean, var, torch.tensor(float(count))

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var, _grad_count):
        no_double_backward()
        x_hat, inv_std, weight = ctx.saved_tensors
        dy = grad_y.to(x_hat.dtype)
        g = dy if weight is None else dy * weight.to(x_hat.dtype).reshape(ctx.view)  # (1) dL/dx_hat
        sums = torch.stack(
            [g.sum(dim=ctx.dims, dtype=torch.float64), (g * x_hat).sum(dim=ctx.dims, dtype=torch.float64)]
        )
        _all_reduce(sums, ctx.group)  # (2), (3): the sums run over every rank's examples
        mean_g = (sums[0] / ctx.count).to(x_hat.dtype).reshape(ctx.view)
        mean_gx = (sums[1] / ctx.count).to(x_hat.dtype).reshape(ctx.view)
        grad_x = (inv_std * (g - mean_g - x_hat * mean_gx)).to(grad_y.dtype)  # (4)
        # this rank's share of dgamma and dbeta: data parallelism (DDP) sums or averages them across ranks
        grad_w = (
            (dy * x_hat).sum(dim=ctx.dims).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        )
        grad_b = dy.sum(dim=ctx.dims).to(grad_y.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


def sync_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group=None,
) -> torch.Tensor:
    """Training-mode batch norm with the statistics of the batch of every rank in ``process_group``
    (all ranks by default); the running averages move toward the global mean and unbiased variance."""
    _check_channels(
        "sync_batch_norm", input, next((t.numel() for t in (running_mean, weight, bias) if t is not None), None)
    )
    y, mean, var, count = _SyncBatch.apply(input, weight, bias, eps, process_group)
    n = float(count)
    if n <= 1:
        raise ValueError("Synchronized BatchNorm needs more than one value per channel across all ranks.")
    with torch.no_grad():
        _update_running(running_mean, mean, momentum)
        _update_running(running_var, var * (n / (n - 1)), momentum)
    return y


# --------------------------------------------------------------------------------------------------
# Public functional ops, with torch.nn.functional's signatures.
# --------------------------------------------------------------------------------------------------


def _channel_view(param: torch.Tensor | None, ndim: int) -> torch.Tensor | None:
    """(C,) -> (1, C, 1, ..., 1) to broadcast against an (N, C, *) input of ``ndim`` dimensions."""
    return None if param is None else param.reshape((1, -1) + (1,) * (ndim - 2))


def _check_channels(what: str, x: torch.Tensor, channels: int | None) -> None:
    if x.dim() < 2:
        raise ValueError(
            f"{what} expects an input of shape (N, C, *) with at least 2 dimensions; got shape {tuple(x.shape)}."
        )
    if channels is not None and x.size(1) != channels:
        raise ValueError(
            f"{what} was given {channels}-channel parameters but the input has {x.size(1)} channels in "
            f"dim 1 (shape {tuple(x.shape)}). Make num_features equal the input's channel count."
        )


def _update_running(running: torch.Tensor | None, batch_value: torch.Tensor, momentum: float) -> None:
    # running <- (1 - momentum) * running + momentum * batch (torch's convention for momentum)
    if running is not None:
        running.lerp_(batch_value.to(running.dtype), momentum)


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Batch normalization of an (N, C, *) input (Ioffe & Szegedy 2015); ``F.batch_norm``'s signature.

    Training: normalize with the batch's mean and biased variance over N and the spatial axes, and move
    the running averages toward the batch's mean and *unbiased* variance by ``momentum``. Eval: normalize
    with the running averages, a fixed affine map.

    Shape:
        input (N, C) or (N, C, *); weight, bias, running statistics (C,).
    """
    channels = next((t.numel() for t in (running_mean, weight, bias) if t is not None), None)
    _check_channels("batch_norm", input, channels)
    ndim = input.dim()
    dims = (0, *range(2, ndim))
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(
                "batch_norm in eval mode needs running_mean and running_var; pass training=True to "
                "normalize with the batch's own statistics."
            )
        y, _, _ = _Normalize.apply(
            input,
            _channel_view(weight, ndim),
            _channel_view(bias, ndim),
            dims,
            eps,
            _channel_view(running_mean, ndim),
            _channel_view(running_var, ndim),
        )
        return y
    count = input.numel() // input.size(1)
    if count <= 1:
        raise ValueError(
            "BatchNorm in training mode needs more than one value per channel to estimate a variance; got "
            f"input of shape {tuple(input.shape)} ({count} value per channel). Use a batch of at least 2, "
            "call model.eval() for single-example inference, or use LayerNorm/GroupNorm, which do not "
            "depend on the batch."
        )
    if _fast(input, weight, bias, running_mean, running_var):  # also moves the running averages, in C++
        return fast.norm_kernels().batch_norm_train(input, weight, bias, running_mean, running_var, momentum, eps)
    if streamed.takes(input):
        y, mean, var = streamed.batch_norm_train(input.view(input.shape[0], input.shape[1], -1), weight, bias, eps)
        y = y.view(input.shape)
    else:
        y, mean, var = _Normalize.apply(input, _channel_view(weight, ndim), _channel_view(bias, ndim), dims, eps)
    with torch.no_grad():
        _update_running(running_mean, mean.flatten(), momentum)
        _update_running(running_var, var.flatten() * (count / (count - 1)), momentum)
    return y


def instance_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Instance normalization of an (N, C, *) input: each sample's each channel over its spatial axes
    (Ulyanov, Vedaldi, Lempitsky 2016); ``F.instance_norm``'s signature.

    With running statistics, training moves them toward the batch-average of the per-instance mean and
    unbiased variance; ``use_input_stats=False`` normalizes with them instead.
    """
    channels = next((t.numel() for t in (running_mean, weight, bias) if t is not None), None)
    _check_channels("instance_norm", input, channels)
    ndim = input.dim()
    dims = tuple(range(2, ndim))
    weight_b, bias_b = _channel_view(weight, ndim), _channel_view(bias, ndim)
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError("instance_norm with use_input_stats=False needs running_mean and running_var.")
        y, _, _ = _Normalize.apply(
            input,
            weight_b,
            bias_b,
            dims,
            eps,
            _channel_view(running_mean, ndim),
            _channel_view(running_var, ndim),
        )
        return y
    count = math.prod(input.shape[2:])
    if count <= 1:
        raise ValueError(
            "InstanceNorm needs more than one spatial element per channel to estimate a variance; got input "
            f"of shape {tuple(input.shape)}. Use BatchNorm or LayerNorm for inputs without spatial extent."
        )
    if streamed.takes(input):
        n, channels = input.shape[:2]
        flat = input.view(n, channels, -1)
        y, mean, var = streamed.grouped_norm_train(flat, weight, bias, channels, eps)
        y = y.view(input.shape)
    else:
        y, mean, var = _Normalize.apply(input, weight_b, bias_b, dims, eps)
    with torch.no_grad():
        _update_running(running_mean, mean.mean(dim=0).flatten(), momentum)
        _update_running(running_var, (var * (count / (count - 1))).mean(dim=0).flatten(), momentum)
    return y


def _check_layer_shape(
    input: torch.Tensor, normalized_shape: Sequence[int], what: str = "layer_norm", module: str = "LayerNorm"
) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if k == 0 or input.dim() < k or tuple(input.shape[-k:]) != shape:
        trailing = tuple(input.shape[-k:]) if 0 < k <= input.dim() else tuple(input.shape)
        raise ValueError(
            f"{what} normalizes over the trailing dimensions {shape}, but the input has shape "
            f"{tuple(input.shape)} (its last {k} dimension(s): {trailing}). Set normalized_shape to the "
            f"trailing shape of your input, e.g. {module}(x.shape[-1])."
        )
    return shape


def layer_norm(
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Layer normalization over the trailing ``normalized_shape`` axes (Ba, Kiros, Hinton 2016);
    ``F.layer_norm``'s signature. weight and bias have shape ``normalized_shape`` (elementwise affine)."""
    shape = _check_layer_shape(input, normalized_shape)
    if _fast(input, weight, bias):
        d = math.prod(shape)
        flat_weight = None if weight is None else weight.reshape(-1)
        flat_bias = None if bias is None else bias.reshape(-1)
        return fast.norm_kernels().rows_norm(input, flat_weight, flat_bias, 1, d, 1, True, eps)
    if streamed.takes(input):
        d = math.prod(shape)
        flat_weight = None if weight is None else weight.reshape(-1)
        flat_bias = None if bias is None else bias.reshape(-1)
        y, _, _ = streamed.grouped_norm_train(input.view(-1, d, 1), flat_weight, flat_bias, 1, eps)
        return y.view(input.shape)
    dims = tuple(range(input.dim() - len(shape), input.dim()))
    y, _, _ = _Normalize.apply(input, weight, bias, dims, eps)
    return y


def rms_norm(
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> torch.Tensor:
    """Root-mean-square normalization over the trailing ``normalized_shape`` axes (Zhang & Sennrich 2019);
    ``F.rms_norm``'s signature: y = x / sqrt(mean(x^2) + eps) * gamma, with ``eps=None`` meaning the machine
    epsilon of the input's dtype, as torch's. Always the formulas as written (``_Normalize``): the compiled and
    streamed routes are layer norm's."""
    shape = _check_layer_shape(input, normalized_shape, "rms_norm", "RMSNorm")
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    dims = tuple(range(input.dim() - len(shape), input.dim()))
    y, _, _ = _Normalize.apply(input, weight, None, dims, eps, None, None, False)
    return y


def check_groups(num_groups: int, channels: int) -> None:
    """Raise unless ``num_groups`` divides ``channels``, listing the groups that would."""
    if not isinstance(num_groups, int) or num_groups < 1 or channels % num_groups:
        divisors = [d for d in range(1, channels + 1) if channels % d == 0]
        raise ValueError(
            f"The number of groups ({num_groups}) must divide the number of channels ({channels}); "
            f"choose one of {', '.join(map(str, divisors))}."
        )


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Group normalization (Wu & He 2018); ``F.group_norm``'s signature.

    The channels are split into ``num_groups`` groups, and each sample's each group is normalized over
    its channels and spatial axes: the input is viewed as (N, G, C/G, *) and reduced over all but the
    first two axes. ``num_groups=1`` is layer norm over (C, *); ``num_groups=C`` is instance norm.
    """
    _check_channels("group_norm", input, None if weight is None else weight.numel())
    channels = input.size(1)
    check_groups(num_groups, channels)
    n = input.size(0)
    if _fast(input, weight, bias):
        hw = input.numel() // (n * channels) if n * channels else 0
        return fast.norm_kernels().rows_norm(input, weight, bias, num_groups, channels // num_groups, hw, False, eps)
    if streamed.takes(input):
        y, _, _ = streamed.grouped_norm_train(input.view(n, channels, -1), weight, bias, num_groups, eps)
        return y.view(input.shape)
    grouped = input.reshape(n, num_groups, channels // num_groups, -1)  # (N, G, C/G, L)
    param_shape = (1, num_groups, channels // num_groups, 1)
    weight_b = None if weight is None else weight.reshape(param_shape)
    bias_b = None if bias is None else bias.reshape(param_shape)
    y, _, _ = _Normalize.apply(grouped, weight_b, bias_b, (2, 3), eps)
    return y.reshape(input.shape)
