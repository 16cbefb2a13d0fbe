"""The eager path of training-mode normalization on contiguous float tensors, in the fewest passes over
memory that plain PyTorch ops allow.

The math is ``functional.normalize_forward`` and ``normalize_backward``: the shifted statistics and the
hand-derived backward. Only the order of the work differs. On a CPU, normalizing a large tensor is bound by
memory traffic, not arithmetic. Its cost is the number of full-size passes, plus the page faults each fresh
full-size tensor pays on first touch. Three rules keep both low:

- **Statistics and parameter gradients are reductions of per-row sums.** View the input as (N, C, L); a row
  is one (sample, channel) slice. Every sum over the normalized axes, and every dgamma and dbeta, is a sum
  of row sums. Products such as dy * (x - mu) go into a buffer that the op allocates anyway: the output y in
  the forward pass, the input gradient dx in the backward pass.
- **Each elementwise op broadcasts at most one per-row operand against contiguous ones.** TensorIterator
  vectorizes one broadcast scalar per inner loop. With two (an addcmul of a per-row scale and a per-row
  shift), it falls back to a scalar loop that costs 2 to 4 times as much. So (d - mu) * inv_std is two
  in-place passes, not one addcmul.
- **Scratch is reused in place.** The shifted input becomes the saved x - mu (or x_hat), and the product
  dy * (x - mu) becomes dx.

This takes about 5 full passes forward and 6 backward, where torch's fused kernels and the compiled ones
(``steadygrad.fast``) take 2 and 3; BENCHMARKS.md has the measured cost.

Two layouts cover every norm. The statistics are per channel for batch norm, and per (sample, group) of
channels for group, instance (one channel per group) and layer norm (one group). Layer norm's input is viewed
as (rows, features, 1), so its weight varies within a statistic's row, where group norm's is constant along
L. The ``L == 1`` branches below are that case.
"""

from __future__ import annotations

import torch
from torch.autograd.function import FunctionCtx

__all__ = ["batch_norm_train", "grouped_norm_train", "takes"]


def takes(x: torch.Tensor) -> bool:
    """Whether this path takes ``x``: contiguous float32 or float64. Other inputs take ``functional``'s general
    path (low precision is computed there in float32; strided layouts keep their layout)."""
    return x.is_contiguous() and x.dtype in (torch.float32, torch.float64)


def _no_double_backward() -> None:
    from steadygrad.norm.functional import _no_double_backward as refuse

    refuse()


def _moments(shifted: torch.Tensor, dim: int, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum and sum of squares of ``shifted`` over ``dim``; ``scratch`` (same size) may be overwritten."""
    if dim == shifted.dim() - 1:  # along contiguous rows: one pass each, no temporary
        return shifted.sum(dim), torch.linalg.vector_norm(shifted, dim=dim).square()
    # across rows, vector_norm walks strided columns at a tenth of memory speed: square into scratch instead
    return shifted.sum(dim), torch.mul(shifted, shifted, out=scratch).sum(dim)


def _channel_sums(t: torch.Tensor, scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-channel sum (and, given scratch, sum of squares) of an (N, C, L) tensor."""
    n, c, length = t.shape
    if length == 1:
        flat = t.view(n, c)
        if scratch is None:
            return flat.sum(0), None
        return _moments(flat, 0, scratch.view(n, c))
    rows = t.view(n * c, length)
    if scratch is None:
        return rows.sum(-1).view(n, c).sum(0), None
    total, squares = _moments(rows, 1, scratch)
    return total.view(n, c).sum(0), squares.view(n, c).sum(0)


def _statistics(total, squares, count: int, eps: float):
    """Mean of the shifted values, biased variance and 1/sqrt(var + eps) from their sum and sum of squares.

    E[d^2] - E[d]^2 on the shifted values d = x - K does not cancel the way it does on x: |E[d]| is of the
    order of a standard deviation (see ``functional.normalize_forward``)."""
    mean = total / count
    var = (squares / count).sub_(mean.square()).clamp_(min=0.0)
    return mean, var, torch.rsqrt(var + eps)


class _BatchNormTrain(torch.autograd.Function):
    """Batch norm of a contiguous (N, C, L) input with its own statistics per channel.

    Saves x - mu (not x_hat): y = (x - mu) * (gamma inv_std) + beta is then one multiply and one add.
    Backward, with a = gamma inv_std and m = N L (``functional._constant_affine_backward``):
    dx = a dy - (a / m) sum(dy) - (a inv_std^2 / m) sum(dy (x - mu)) (x - mu).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x, weight, bias, eps):
        n, c, length = x.shape
        per_channel = (1, c, 1)
        shift = x[:1, :, :1]  # K: each channel's first value
        centered = x - shift
        y = torch.empty_like(x)
        mean, var, inv_std = _statistics(*_channel_sums(centered, scratch=y), n * length, eps)
        centered.sub_(mean.view(per_channel))
        scale = inv_std if weight is None else inv_std * weight.to(x.dtype)
        torch.mul(centered, scale.view(per_channel), out=y)
        if bias is not None:
            y.add_(bias.to(x.dtype).view(per_channel))
        ctx.save_for_backward(centered, inv_std, weight)
        batch_mean = shift.flatten() + mean
        ctx.mark_non_differentiable(batch_mean, var)
        return y, batch_mean, var

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        _no_double_backward()
        centered, inv_std, weight = ctx.saved_tensors
        dy = grad_y.contiguous()
        n, c, length = dy.shape
        m = n * length
        per_channel = (1, c, 1)
        grad = torch.mul(dy, centered)  # the buffer becomes dx
        sum_dy, _ = _channel_sums(dy)
        sum_dy_centered, _ = _channel_sums(grad)
        sum_dy_xhat = sum_dy_centered * inv_std  # dgamma
        grad_x = None
        if ctx.needs_input_grad[0]:
            a = inv_std if weight is None else inv_std * weight.to(dy.dtype)
            torch.mul(dy, a.view(per_channel), out=grad)
            grad.addcmul_(centered, (-a * inv_std * sum_dy_xhat / m).view(per_channel))
            grad_x = grad.add_((-a * sum_dy / m).view(per_channel))
        grad_w = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy if ctx.needs_input_grad[2] else None
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
        return per_channel @ weight
    return torch.einsum("ngk,gk->ng", grouped, weight.view(groups, c // groups))


class _GroupedNormTrain(torch.autograd.Function):
    """Group norm of a contiguous (N, C, L) input: statistics per (sample, group of C/G channels) over the
    group's channels and L. Instance norm is G = C; layer norm is (rows, features, 1) with G = 1.

    Backward, with g = gamma dy, m = (C/G) L and per-group sums over the group's channels and L
    (``functional.normalize_backward``): dx = inv_std (g - sum(g) / m - x_hat sum(g x_hat) / m).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x, weight, bias, groups, eps):
        n, c, length = x.shape
        per_group = c // groups
        rows = x.view(n * groups, per_group * length)
        shift = rows[:, :1]  # K: each group's first value
        shifted = rows - shift
        weight = None if weight is None else weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
        total, squares = _moments(shifted, 1, scratch=None)
        mean, var, inv_std = _statistics(total.unsqueeze(1), squares.unsqueeze(1), per_group * length, eps)
        shifted.sub_(mean)
        if length == 1:  # the weight varies along each row: save x_hat, y = x_hat * gamma + beta in one pass
            x_hat = shifted.mul_(inv_std).view(n, c)
            if weight is not None and bias is not None:
                y = torch.addcmul(bias, x_hat, weight)
            elif weight is not None:
                y = x_hat * weight
            else:
                y = x_hat + bias if bias is not None else x_hat.clone()
            saved = x_hat
        else:  # gamma is constant along L: save x - mu, y = (x - mu) * (inv_std gamma) + beta
            saved = shifted.view(n, c, length)
            scale = _per_channel(inv_std, n, groups, per_group)
            if weight is not None:
                scale = scale * weight
            y = saved * scale.unsqueeze(-1)
            if bias is not None:
                y.add_(bias.view(1, c, 1))
        ctx.save_for_backward(saved, inv_std, weight)
        ctx.groups = groups
        batch_mean, var = (shift + mean).view(n, groups), var.view(n, groups)
        ctx.mark_non_differentiable(batch_mean, var)
        return y.view(x.shape), batch_mean, var

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        _no_double_backward()
        saved, inv_std, weight = ctx.saved_tensors
        groups = ctx.groups
        dy = grad_y.contiguous()
        n, c, length = dy.shape
        per_group = c // groups
        m = per_group * length
        if length == 1:  # saved is x_hat (N, C)
            dy = dy.view(n, c)
            grad = torch.mul(dy, saved)  # dy x_hat; the buffer becomes dx
            sum_dy, sum_dy_xhat = dy.sum(0), grad.sum(0)  # dbeta, dgamma
            sum_g = _weighted_group_sums(dy, weight, groups)
            sum_g_xhat = _weighted_group_sums(grad, weight, groups)
        else:  # saved is x - mu (N, C, L): row sums first, then per channel and per group
            grad = torch.mul(dy, saved)
            inv_std_per_channel = _per_channel(inv_std, n, groups, per_group)
            row_dy = dy.sum(-1)
            row_dy_xhat = grad.sum(-1).mul_(inv_std_per_channel)
            sum_dy, sum_dy_xhat = row_dy.sum(0), row_dy_xhat.sum(0)
            sum_g = _weighted_group_sums(row_dy, weight, groups)
            sum_g_xhat = _weighted_group_sums(row_dy_xhat, weight, groups)
        grad_x = None
        if ctx.needs_input_grad[0]:
            shift_g = (-sum_g / m).view(n, groups, 1)
            scale_x = (-sum_g_xhat / m).view(n, groups, 1)
            if length == 1:  # dx = inv_std (gamma dy - sum(g)/m - x_hat sum(g x_hat)/m), three passes
                out = grad.view(n, groups, per_group)
                if weight is None:
                    torch.add(dy.view_as(out), shift_g, out=out)
                else:
                    torch.addcmul(shift_g, dy.view_as(out), weight.view(groups, per_group), out=out)
                out.addcmul_(saved.view_as(out), scale_x).mul_(inv_std.view(n, groups, 1))
            else:  # per (sample, channel): dx = a dy + k (x - mu) + e, three passes
                inv_std_g = inv_std.view(n, groups, 1)
                a = _per_channel(inv_std, n, groups, per_group)
                if weight is not None:
                    a = a * weight
                k = _per_channel(inv_std_g * inv_std_g * scale_x, n, groups, per_group)
                e = _per_channel(inv_std_g * shift_g, n, groups, per_group)
                torch.mul(dy, a.unsqueeze(-1), out=grad)
                grad.addcmul_(saved, k.unsqueeze(-1)).add_(e.unsqueeze(-1))
            grad_x = grad.view(grad_y.shape)
        grad_w = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


def grouped_norm_train(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize a contiguous (N, C, L) input over each (sample, group of C / ``groups`` channels) and L with
    a per-channel affine map: ``(y, mean, var)``, the statistics of shape (N, groups) with the biased variance.

    Group norm is the (N, C, spatial) view; instance norm is ``groups=C``; layer norm over the trailing
    features is the (rows, features, 1) view with ``groups=1``."""
    return _GroupedNormTrain.apply(x, weight, bias, groups, eps)
