"""Per-layer statistics computed on the device: one small tensor per layer, copied to the host once.

Non-finite values (NaN, +-Inf) are counted and excluded from every other statistic, so a layer that
blew up reports how many values did, instead of NaN everywhere or a crash.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "RECTIFIERS",
    "SATURATION",
    "activation_kind",
    "activation_stats",
    "gradient_stats",
    "primary_layer",
    "unit_stats",
    "weight_stats",
]

TANH_SATURATION = 0.99  # |tanh(x)| > 0.99: the derivative 1 - y^2 is below 0.02
SIGMOID_SATURATION = 0.01  # sigmoid(x) outside [0.01, 0.99]: the derivative y(1 - y) is below 0.0099
SATURATION = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Hardtanh: "tanh"}
RECTIFIERS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU)
WEIGHT_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.RNNBase, nn.Bilinear, nn.Embedding)

ACTIVATION_FIELDS = ("act_mean", "act_std", "act_min", "act_max", "act_second_moment", "nonfinite_act")


def activation_kind(module: nn.Module) -> tuple[str | None, nn.Module | None]:
    """("tanh" | "sigmoid" | "rectifier", the activation module) for the last activation inside ``module``
    (or ``module`` itself), else (None, None)."""
    found: tuple[str | None, nn.Module | None] = (None, None)
    for m in module.modules():
        for cls, kind in SATURATION.items():
            if type(m) is cls:
                found = (kind, m)
        if isinstance(m, RECTIFIERS):
            found = ("rectifier", m)
    return found


def primary_layer(module: nn.Module) -> nn.Module | None:
    """The layer whose weights describe ``module``: itself if it owns a weight, else its first
    Linear/Conv/RNN descendant."""
    if any(name.startswith("weight") for name, _ in module.named_parameters(recurse=False)):
        return module
    return next((m for m in module.modules() if isinstance(m, WEIGHT_LAYERS)), None)


def _finite(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    finite = torch.isfinite(y)
    count = finite.sum()
    return finite, count, (finite.numel() - count)


def activation_stats(y: torch.Tensor) -> torch.Tensor:
    """[mean, std, min, max, second moment, non-finite count] of the finite values of ``y`` (float64)."""
    y = y.detach().double()
    finite, count, nonfinite = _finite(y)
    n = count.clamp(min=1)
    zeroed = torch.where(finite, y, 0.0)
    mean = zeroed.sum() / n
    second = zeroed.square().sum() / n
    centered = torch.where(finite, y - mean, 0.0)
    std = (centered.square().sum() / (n - 1).clamp(min=1)).sqrt()
    lo = torch.where(finite, y, torch.inf).min() if y.numel() else y.new_tensor(torch.nan)
    hi = torch.where(finite, y, -torch.inf).max() if y.numel() else y.new_tensor(torch.nan)
    return torch.stack([mean, std, lo, hi, second, nonfinite.double()])


def unit_stats(y: torch.Tensor, kind: str | None) -> torch.Tensor:
    """[saturated fraction, dead fraction] of an activation's output ``y`` (N, *); NaN where not applicable.

    Saturated: tanh |y| > 0.99, sigmoid y outside [0.01, 0.99], over all values. Dead (rectifiers): a
    unit (one position of the per-sample output) that is <= 0 for every sample of the batch."""
    y = y.detach()
    nan = torch.tensor(torch.nan, dtype=torch.float64, device=y.device)
    saturated, dead = nan, nan
    if kind == "tanh":
        saturated = (y.abs() > TANH_SATURATION).double().mean()
    elif kind == "sigmoid":
        saturated = ((y < SIGMOID_SATURATION) | (y > 1 - SIGMOID_SATURATION)).double().mean()
    elif kind == "rectifier" and y.dim() >= 1 and y.numel():
        dead = (y.reshape(y.shape[0], -1) <= 0).all(dim=0).double().mean()
    return torch.stack([saturated, dead])


def gradient_stats(grad: torch.Tensor) -> torch.Tensor:
    """[norm of the finite values, non-finite count] of a gradient (float64)."""
    grad = grad.detach().double()
    finite, _, nonfinite = _finite(grad)
    return torch.stack([torch.where(finite, grad, 0.0).norm(), nonfinite.double()])


def weight_stats(layer: nn.Module | None) -> torch.Tensor:
    """[weight gradient norm, bias gradient norm, weight variance] of a layer's own parameters; NaN for
    what it lacks. Every parameter whose name starts with weight (or bias) counts: an LSTM's all gates."""
    nan = torch.tensor(torch.nan, dtype=torch.float64)
    if layer is None:
        return torch.stack([nan, nan, nan])
    weights = [p for name, p in layer.named_parameters(recurse=False) if name.startswith("weight")]
    biases = [p for name, p in layer.named_parameters(recurse=False) if name.startswith("bias")]

    def grad_norm(params):
        grads = [p.grad.detach().double().flatten() for p in params if p.grad is not None]
        return torch.cat(grads).norm().cpu() if grads else nan

    variance = weights[0].detach().double().var().cpu() if weights and weights[0].numel() > 1 else nan
    return torch.stack([grad_norm(weights), grad_norm(biases), variance])
