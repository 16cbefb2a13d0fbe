"""Normalization modules, drop-in for torch.nn: same constructor arguments, defaults and state_dict keys.

Each module holds its parameters and buffers and calls one op of ``steadygrad.norm.functional``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import nn

from steadygrad import kinds
from steadygrad.norm import functional as F

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "RMSNorm",
]


def _affine_parameters(module: nn.Module, shape: tuple[int, ...], affine: bool, bias: bool, factory) -> None:
    """Register gamma (``weight``) and beta (``bias``), or None for those not learned."""
    module.register_parameter("weight", nn.Parameter(torch.empty(shape, **factory)) if affine else None)
    module.register_parameter("bias", nn.Parameter(torch.empty(shape, **factory)) if affine and bias else None)


def _reset_affine(module: nn.Module) -> None:
    if module.weight is not None:
        nn.init.ones_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class _NormBase(nn.Module):
    """Parameters and running statistics shared by batch and instance norm (torch's ``_NormBase``)."""

    _version = 2  # state_dict version of torch's _NormBase: num_batches_tracked exists since version 2
    _expected_dims: tuple[int, ...] = ()  # accepted input dimensionalities, for the error message
    _layout = ""  # e.g. "(N, C, H, W)"

    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive integer; got {num_features!r}.")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        _affine_parameters(self, (num_features,), affine, bias, factory)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        _reset_affine(self)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}"
        )

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in self._expected_dims:
            accepted = " or ".join(f"{d}-D" for d in self._expected_dims)
            raise ValueError(
                f"{type(self).__name__} expects a {accepted} input {self._layout}; got a {x.dim()}-D input "
                f"of shape {tuple(x.shape)}. {self._hint}"
            )

    _hint = ""

    def _averaging_factor(self) -> float:
        """The momentum of this step; ``momentum=None`` means a cumulative average: 1 / batches seen."""
        if not (self.training and self.track_running_stats):
            return 0.0 if self.momentum is None else self.momentum
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs):
        # state_dicts saved before num_batches_tracked existed (torch's version < 2) load with it at 0
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long, device=self.running_mean.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs)


class _BatchNorm(_NormBase):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        sync: bool = False,
        process_group=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.sync = sync  # in training, normalize with the statistics of every rank's batch
        self.process_group = process_group  # None: all ranks

    def _synchronized(self) -> bool:
        if not (self.sync and self.training):
            return False
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if self._synchronized():
            factor = self._averaging_factor()
            return F.sync_batch_norm(
                x,
                self.running_mean if self.track_running_stats else None,
                self.running_var if self.track_running_stats else None,
                self.weight,
                self.bias,
                factor,
                self.eps,
                self.process_group,
            )
        factor = self._averaging_factor()
        # batch statistics in training, and in eval when no running statistics are kept (as torch)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return F.batch_norm(
            x,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch,
            factor,
            self.eps,
        )


class BatchNorm1d(_BatchNorm):
    """Batch normalization over a 2-D (N, C) or 3-D (N, C, L) input (Ioffe & Szegedy 2015).

    y = (x - E[x]) / sqrt(Var[x] + eps) * gamma + beta, statistics per channel over N (and L). Same
    arguments, defaults and state_dict keys as ``torch.nn.BatchNorm1d``; the backward is steadygrad's
    hand-derived one (``steadygrad.norm.functional.normalize_backward``).

    Args:
        num_features: C.
        eps: added to the variance for numerical stability.
        momentum: weight of the newest batch in the running averages; None for a cumulative average.
        affine: learn gamma (weight) and beta (bias).
        track_running_stats: keep running averages for eval mode; without them eval uses batch statistics.

    Example:
        >>> bn = BatchNorm1d(16)
        >>> bn(torch.randn(32, 16)).shape
        torch.Size([32, 16])
    """

    _expected_dims = (2, 3)
    _layout = "(N, C) or (N, C, L)"
    _hint = "For (N, C, H, W) use BatchNorm2d; for (N, C, D, H, W) BatchNorm3d."


class BatchNorm2d(_BatchNorm):
    """Batch normalization over a 4-D (N, C, H, W) input; statistics per channel over N, H, W.

    Same arguments as ``BatchNorm1d`` and ``torch.nn.BatchNorm2d``.
    """

    _expected_dims = (4,)
    _layout = "(N, C, H, W)"
    _hint = "For (N, C) or (N, C, L) use BatchNorm1d; for (N, C, D, H, W) BatchNorm3d."


class BatchNorm3d(_BatchNorm):
    """Batch normalization over a 5-D (N, C, D, H, W) input. Same arguments as ``torch.nn.BatchNorm3d``."""

    _expected_dims = (5,)
    _layout = "(N, C, D, H, W)"
    _hint = "For 4-D inputs use BatchNorm2d."


class _InstanceNorm(_NormBase):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        unbatched = x.dim() == min(self._expected_dims)
        if unbatched:  # (C, *) -> (1, C, *), as torch.nn.InstanceNorm does
            x = x.unsqueeze(0)
        # as torch.nn.InstanceNorm: no num_batches_tracked count, and momentum=None freezes the averages
        factor = 0.0 if self.momentum is None else self.momentum
        y = F.instance_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            factor,
            self.eps,
        )
        return y.squeeze(0) if unbatched else y


class InstanceNorm1d(_InstanceNorm):
    """Instance normalization of (N, C, L) or unbatched (C, L): each sample and channel over L (Ulyanov
    et al. 2016). Same arguments and defaults as ``torch.nn.InstanceNorm1d`` (affine=False,
    track_running_stats=False)."""

    _expected_dims = (2, 3)
    _layout = "(N, C, L) or (C, L)"


class InstanceNorm2d(_InstanceNorm):
    """Instance normalization of (N, C, H, W) or (C, H, W). Same arguments as ``torch.nn.InstanceNorm2d``."""

    _expected_dims = (3, 4)
    _layout = "(N, C, H, W) or (C, H, W)"


class InstanceNorm3d(_InstanceNorm):
    """Instance normalization of (N, C, D, H, W) or (C, D, H, W). As ``torch.nn.InstanceNorm3d``."""

    _expected_dims = (4, 5)
    _layout = "(N, C, D, H, W) or (C, D, H, W)"


def _normalized_shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    """torch's ``normalized_shape`` argument as a tuple of positive sizes (an int is the last dimension)."""
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (normalized_shape,)
    shape = tuple(int(d) for d in normalized_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"normalized_shape must be positive sizes; got {normalized_shape!r}.")
    return shape


class LayerNorm(nn.Module):
    """Layer normalization over the trailing ``normalized_shape`` dimensions (Ba, Kiros, Hinton 2016).

    y = (x - E[x]) / sqrt(Var[x] + eps) * gamma + beta, statistics per sample over the trailing axes;
    independent of the batch. Same arguments and state_dict keys as ``torch.nn.LayerNorm``.

    Args:
        normalized_shape: the trailing shape to normalize over (an int for the last dimension).
        eps: added to the variance.
        elementwise_affine: learn gamma (and beta) of shape ``normalized_shape``.
        bias: learn beta as well (with elementwise_affine).

    Example:
        >>> LayerNorm(64)(torch.randn(8, 10, 64)).shape
        torch.Size([8, 10, 64])
    """

    normalized_shape: tuple[int, ...]
    eps: float
    elementwise_affine: bool

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        _affine_parameters(self, self.normalized_shape, elementwise_affine, bias, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_affine(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}"
        )


class RMSNorm(nn.Module):
    """Root-mean-square normalization over the trailing ``normalized_shape`` dimensions (Zhang & Sennrich 2019).

    y = x / sqrt(mean(x^2) + eps) * gamma: layer norm without the centring and without beta, as in T5 and
    Llama. Its backward, dL/dx = inv_rms * (g - x_hat * mean(g * x_hat)) with g = dL/dy * gamma, is the
    statistics core's (``functional.normalize_backward`` with ``centered=False``). Same arguments, defaults and
    state_dict keys as ``torch.nn.RMSNorm``; ``eps=None`` is the machine epsilon of the input's dtype.

    Example:
        >>> RMSNorm(64)(torch.randn(8, 10, 64)).shape
        torch.Size([8, 10, 64])
    """

    normalized_shape: tuple[int, ...]
    eps: float | None
    elementwise_affine: bool

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        _affine_parameters(self, self.normalized_shape, elementwise_affine, False, {"device": device, "dtype": dtype})
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_affine(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class GroupNorm(nn.Module):
    """Group normalization (Wu & He 2018): channels split into groups, each sample's each group normalized
    over its channels and spatial axes; independent of the batch, so it works at batch size 1 or 2.

    Same arguments and state_dict keys as ``torch.nn.GroupNorm``. ``GroupNorm(1, C)`` normalizes like a
    LayerNorm over (C, *) (with per-channel affine); ``GroupNorm(C, C)`` like InstanceNorm.

    Example:
        >>> GroupNorm(8, 64)(torch.randn(2, 64, 16, 16)).shape
        torch.Size([2, 64, 16, 16])
    """

    num_groups: int
    num_channels: int
    eps: float
    affine: bool

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        F.check_groups(num_groups, num_channels)
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        _affine_parameters(self, (num_channels,), affine, bias, {"device": device, "dtype": dtype})
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_affine(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.size(1) != self.num_channels:
            raise ValueError(
                f"GroupNorm({self.num_groups}, {self.num_channels}) expects an (N, {self.num_channels}, *) "
                f"input; got shape {tuple(x.shape)}."
            )
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
            f"bias={self.bias is not None}"
        )


# steadygrad's norms are norms to every instrument and rule (steadygrad.kinds)
for _cls, _family in (
    (_BatchNorm, "batch"),
    (_InstanceNorm, "instance"),
    (LayerNorm, "layer"),
    (GroupNorm, "group"),
    (RMSNorm, "rms"),
):
    kinds.register_norm(_cls, _family)
