"""The eager path of training-mode normalization on contiguous float tensors, in the fewest passes over
memory that plain PyTorch ops allow.

The math is ``functional.normalize_forward`` and ``normalize_backward``: the shifted statistics and the
hand-derived backward. Only the order of the work differs. On a CPU, normalizing a large tensor is bound by
memory traffic, not arithmetic. Its cost is the number of full-size passes, plus the page faults each fresh
full-size tensor pays on first touch. Three rules keep both low:

- **Statistics and parameter gradients are reductions of per-row sums.** View the input as (N, C, L); a row
  is one (sample, channel) slice. Every sum over the normalized axes, and every dgamma and dbeta, is a sum
  of row sums (or, down the columns of an (N, C) input, a vector-matrix product).
- **Each elementwise op broadcasts at most one per-row operand against contiguous ones.** TensorIterator
  vectorizes one broadcast scalar per inner loop. With two (an addcmul of a per-row scale and a per-row
  shift), it falls back to a scalar loop that costs 2 to 4 times as much. So d * scale + shift is two
  in-place passes, not one addcmul, unless scale and shift run along the contiguous axis.
- **Nothing full-size lives from forward to backward but x**, as in torch's kernels: the shifted input
  d = x - K is computed into y's buffer and turned into y in place, and the backward recomputes d into dx's
  buffer. A normalized copy kept for the backward cost more (a fresh tensor that outlives the step's
  temporaries, so their memory is not reused) than the pass that recomputes it.

This takes about 5 full passes forward and 7 to 9 backward, where torch's fused kernels and the compiled ones
(``steadygrad.fast``) take 2 and 3; BENCHMARKS.md has the measured cost.

Two layouts cover every norm. The statistics are per channel for batch norm, and per (sample, group) of
channels for group, instance (one channel per group) and layer norm (one group). Layer norm's input is viewed
as (rows, features, 1), so its weight varies within a statistic's row, where group norm's is constant along
L. The ``L == 1`` branches below are that case.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx

from steadygrad._autograd import no_double_backward

__all__ = ["batch_norm_train", "grouped_norm_train", "takes"]


def takes(x: torch.Tensor) -> bool:
    """Whether this path takes ``x``: contiguous float32 or float64. Other inputs take ``functional``'s general
    path (low precision is computed there in float32; strided layouts keep their layout)."""
    return x.is_contiguous() and x.dtype in (torch.float32, torch.float64)


def _moments(shifted: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and sum of squares of ``shifted`` over ``dim``."""
    if dim == shifted.dim() - 1:  # along contiguous rows: one pass each, no temporary
        return shifted.sum(dim), torch.linalg.vector_norm(shifted, dim=dim).square()
    # across rows vector_norm walks strided columns at a tenth of memory speed: square into a temporary instead
    return shifted.sum(dim), shifted.square().sum(dim)


def _channel_sums(t: torch.Tensor, squares: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-channel sum (and with ``squares``, sum of squares) of an (N, C, L) tensor."""
    n, c, length = t.shape
    if length == 1:  # down the columns: a vector-matrix product streams at memory speed, sum(0) does not
        flat = t.view(n, c)
        total = flat.new_ones(n) @ flat
        return total, (flat.square().sum(0) if squares else None)
    rows = t.view(n * c, length)
    if not squares:
        return rows.sum(-1).view(n, c).sum(0), None
    total, sum_squares = _moments(rows, 1)
    return total.view(n, c).sum(0), sum_squares.view(n, c).sum(0)


def _statistics(total, squares, count: int, eps: float):
    """Mean of the shifted values, biased variance and 1/sqrt(var + eps) from their sum and sum of squares.

    E[d^2] - E[d]^2 on the shifted values d = x - K does not cancel the way it does on x: |E[d]| is of the
    order of a standard deviation (see ``functional.normalize_forward``)."""
    mean = total / count
    var = (squares / count).sub_(mean.square()).clamp_(min=0.0)
    return mean, var, torch.rsqrt(var + eps)


def _scale_shift_(t: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """t <- t * scale + shift in place, for per-channel (1, C, 1) scale and shift on an (N, C, L) tensor. With
    L = 1 both vary along the contiguous axis and one addcmul vectorizes; otherwise they are per-row scalars,
    and two single-scalar passes beat one addcmul that falls back to a scalar loop."""
    if t.shape[-1] == 1:
        return torch.addcmul(shift, t, scale, out=t)
    return t.mul_(scale).add_(shift)


class _BatchNormTrain(torch.autograd.Function):
    """Batch norm of a contiguous (N, C, L) input with its own statistics per channel.

    Like torch's kernel, it saves x and not x_hat, and the backward recomputes the shifted values d = x - K.
    A copy kept from forward to backward costs more here than the extra pass. With a = gamma inv_std, m = N L,
    and mu_d the mean of d (``functional._constant_affine_backward``):

        y  = a d + (beta - a mu_d)
        dx = a dy - (a / m) sum(dy) - (a inv_std^2 / m) sum(dy (d - mu_d)) (d - mu_d)
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x, weight, bias, eps):
        n, c, length = x.shape
        per_channel = (1, c, 1)
        shift = x[:1, :, :1].clone()  # K: each channel's first value (a strided operand slows the subtraction)
        y = x - shift  # d, then y in place
        mean_d, var, inv_std = _statistics(*_channel_sums(y, squares=True), n * length, eps)
        a = inv_std if weight is None else inv_std * weight.to(x.dtype)
        offset = -a * mean_d if bias is None else bias.to(x.dtype) - a * mean_d
        _scale_shift_(y, a.view(per_channel), offset.view(per_channel))
        ctx.save_for_backward(x, mean_d, inv_std, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        batch_mean = shift.flatten() + mean_d
        ctx.mark_non_differentiable(batch_mean, var)
        return y, batch_mean, var

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        no_double_backward()
        x, mean_d, inv_std, weight = ctx.saved_tensors
        dy = grad_y.contiguous()
        n, c, length = dy.shape
        m = n * length
        per_channel = (1, c, 1)
        shifted = x - x[:1, :, :1].clone()  # d again; the buffer becomes dx
        sum_dy, _ = _channel_sums(dy)
        sum_dy_shifted, _ = _channel_sums(dy * shifted)
        sum_dy_xhat = (sum_dy_shifted - mean_d * sum_dy) * inv_std  # dgamma: sum(dy (d - mu_d)) inv_std
        grad_x = None
        if ctx.needs_input_grad[0]:
            a = inv_std if weight is None else inv_std * weight.to(dy.dtype)
            k = -a * inv_std * sum_dy_xhat / m
            offset = -a * sum_dy / m - k * mean_d  # k (d - mu_d) = k d - k mu_d
            grad_x = _scale_shift_(shifted, k.view(per_channel), offset.view(per_channel)).addcmul_(
                dy, a.view(per_channel)
            )
        grad_w = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def batch_norm_train(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch norm of a contiguous (N, C, L) input in training mode: ``(y, mean, var)``, with the batch's
    per-channel mean and biased variance (shape (C,)) for the running averages."""
    return _BatchNormTrain.apply(x, weight, bias, eps)


def _per_channel(per_group: torch.Tensor, n: int, groups: int, channels_per_group: int) -> torch.Tensor:
    """(N, G) or (N * G, 1) per-group values -> (N, C): each group's value repeated for its channels."""
    return per_group.reshape(n, groups, 1).expand(n, groups, channels_per_group).reshape(n, -1)


def _weighted_group_sums(per_channel: torch.Tensor, weight: torch.Tensor | None, groups: int) -> torch.Tensor:
    """sum over each group's channels of weight[c] * per_channel[n, c]: (N, C) -> (N, G)."""
    n, c = per_channel.shape
    grouped = per_channel.view(n, groups, c // groups)
    if weight is None:
        return grouped.sum(-1)
    if groups == 1:  # layer norm: a matrix-vector product, one pass at memory speed
        return (per_channel @ weight).unsqueeze(1)
    return torch.einsum("ngk,gk->ng", grouped, weight.view(groups, c // groups))


def _column_sums(t: torch.Tensor, per_group: torch.Tensor | None, groups: int) -> torch.Tensor:
    """sum over n of v[n, g(c)] * t[n, c] for (N, C) ``t`` and (N, G) ``v`` (all ones when None): (C,)."""
    n, c = t.shape
    if per_group is None:
        return t.new_ones(n) @ t
    if groups == 1:  # a vector-matrix product streams at memory speed, sum(0) does not
        return per_group.reshape(n) @ t
    return torch.einsum("ng,ngk->gk", per_group.reshape(n, groups), t.view(n, groups, c // groups)).reshape(c)


class _GroupedNormTrain(torch.autograd.Function):
    """Group norm of a contiguous (N, C, L) input: statistics per (sample, group of C/G channels) over the
    group's channels and L. Instance norm is G = C; layer norm is (rows, features, 1) with G = 1.

    Saves x, as ``_BatchNormTrain`` does, and recomputes d = x - K in the backward. With g = gamma dy,
    m = (C/G) L, mu_d the group's mean of d, and per-group sums over the group's channels and L
    (``functional.normalize_backward``):

        dx = inv_std (g - sum(g) / m - x_hat sum(g x_hat) / m),  x_hat = (d - mu_d) inv_std
        sum(g x_hat) = inv_std (sum(g d) - mu_d sum(g))          (so dy x_hat is never formed)
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x, weight, bias, groups, eps):
        n, c, length = x.shape
        per_group = c // groups
        rows = x.view(n * groups, per_group * length)
        shift = rows[:, :1].clone()  # K: each group's first value (a strided operand slows the subtraction)
        y = rows - shift  # d, then y in place
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        weight = None if weight is None else weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
        total, squares = _moments(y, 1)
        mean_d, var, inv_std = _statistics(total.unsqueeze(1), squares.unsqueeze(1), per_group * length, eps)
        if length == 1:  # the weight varies along each row: x_hat in place, then one addcmul
            y.sub_(mean_d).mul_(inv_std)
            y = y.view(n, c)
            if weight is not None and bias is not None:
                torch.addcmul(bias, y, weight, out=y)
            elif weight is not None:
                y.mul_(weight)
            elif bias is not None:
                y.add_(bias)
        else:  # gamma is constant along L: y = d (inv_std gamma) + (beta - mu_d inv_std gamma), two passes
            scale = _per_channel(inv_std, n, groups, per_group)
            if weight is not None:
                scale = scale * weight
            offset = -_per_channel(mean_d, n, groups, per_group) * scale
            if bias is not None:
                offset = offset + bias
            y = y.view(n, c, length).mul_(scale.unsqueeze(-1)).add_(offset.unsqueeze(-1))
        ctx.mean_d, ctx.inv_std, ctx.groups = mean_d, inv_std, groups  # small: kept on ctx, not as saved tensors
        batch_mean, var = (shift + mean_d).view(n, groups), var.view(n, groups)
        ctx.mark_non_differentiable(batch_mean, var)
        return y.view(x.shape), batch_mean, var

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        no_double_backward()
        x, param = ctx.saved_tensors
        mean_d, inv_std, groups = ctx.mean_d, ctx.inv_std, ctx.groups
        weight = None if param is None else param.to(x.dtype)
        dy = grad_y.contiguous()
        n, c, length = dy.shape
        per_group = c // groups
        m = per_group * length
        rows = x.view(n * groups, m)
        shifted = (rows - rows[:, :1].clone()).view(n, c, length)  # d again
        product = dy * shifted  # dy d
        if length == 1:  # per-channel sums down the columns, per-group sums along the rows
            dy, shifted, product = dy.view(n, c), shifted.view(n, c), product.view(n, c)
            sum_dy = _column_sums(dy, None, groups)  # dbeta
            # dgamma = sum_n dy x_hat = sum_n inv_std (dy d - mu_d dy)
            sum_dy_xhat = _column_sums(product, inv_std, groups) - _column_sums(dy, inv_std * mean_d, groups)
            sum_g = _weighted_group_sums(dy, weight, groups)
            sum_g_shifted = _weighted_group_sums(product, weight, groups)
        else:  # sums over L first: per (sample, channel), then per channel and per group
            row_dy, row_product = dy.sum(-1), product.sum(-1)
            del product
            mean_per_channel = _per_channel(mean_d, n, groups, per_group)
            inv_std_per_channel = _per_channel(inv_std, n, groups, per_group)
            row_dy_xhat = (row_product - mean_per_channel * row_dy).mul_(inv_std_per_channel)
            sum_dy, sum_dy_xhat = row_dy.sum(0), row_dy_xhat.sum(0)
            sum_g = _weighted_group_sums(row_dy, weight, groups)
            sum_g_shifted = _weighted_group_sums(row_product, weight, groups)
        grad_x = None
        if ctx.needs_input_grad[0]:
            inv_std_g, mean_g = inv_std.view(n, groups), mean_d.view(n, groups)
            sum_g_xhat = inv_std_g * (sum_g_shifted - mean_g * sum_g)
            # dx = inv_std (g + kappa d + epsilon): kappa = -inv_std sum(g x_hat) / m,
            # epsilon = -sum(g) / m - kappa mu_d
            kappa = -inv_std_g * sum_g_xhat / m
            epsilon = -sum_g / m - kappa * mean_g
            if length == 1:  # three passes in the (N, G, C/G) view; product's buffer becomes dx
                out = product.view(n, groups, per_group)
                dy_g = dy.view_as(out)
                if weight is None:
                    torch.add(dy_g, epsilon.unsqueeze(-1), out=out)
                else:
                    torch.addcmul(epsilon.unsqueeze(-1), dy_g, weight.view(groups, per_group), out=out)
                out.addcmul_(shifted.view_as(out), kappa.unsqueeze(-1)).mul_(inv_std_g.unsqueeze(-1))
                grad_x = out
            else:  # per (sample, channel) scalars: dx = a dy + (inv_std kappa) d + inv_std epsilon; d becomes dx
                a = inv_std_per_channel if weight is None else inv_std_per_channel * weight
                scale = _per_channel(inv_std_g * kappa, n, groups, per_group)
                offset = _per_channel(inv_std_g * epsilon, n, groups, per_group)
                grad_x = shifted.mul_(scale.unsqueeze(-1)).add_(offset.unsqueeze(-1)).addcmul_(dy, a.unsqueeze(-1))
            grad_x = grad_x.view(grad_y.shape)
        grad_w = sum_dy_xhat.to(param.dtype) if param is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


def grouped_norm_train(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize a contiguous (N, C, L) input over each (sample, group of C / ``groups`` channels) and L with
    a per-channel affine map: ``(y, mean, var)``, the statistics of shape (N, groups) with the biased variance.

    Group norm is the (N, C, spatial) view; instance norm is ``groups=C``; layer norm over the trailing
    features is the (rows, features, 1) view with ``groups=1``."""
    return _GroupedNormTrain.apply(x, weight, bias, groups, eps)
