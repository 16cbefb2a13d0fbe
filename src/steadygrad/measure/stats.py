"""Per-layer statistics as small device tensors that merge across micro-batches and reach the host once.

Accumulators (float64 vectors on the layer's device):

- activations: [n, mean, M2, min, max, sum of squares, non-finite count], merged with Chan, Golub and
  LeVeque's parallel update, so gradient-accumulation micro-batches combine exactly;
- units: [saturated count, values] and, for rectifiers, a per-unit "ever active" mask;
- gradients: [sum of squares, non-finite count].

Non-finite values (NaN, +-Inf) are counted and excluded from every other statistic, so a layer that blew
up reports how many values did, instead of NaN everywhere or a crash.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from steadygrad import _keras, kinds

try:  # torch's sharded tensor: FSDP's fully_shard makes every parameter and its gradient one
    from torch.distributed.tensor import DTensor
except ImportError:  # a build without torch.distributed
    DTensor = ()

__all__ = [
    "activation_kind",
    "activation_moments",
    "gradient_moments",
    "layer_parameters",
    "local_part",
    "merge_activations",
    "needs_exact_gradient",
    "needs_exact_moments",
    "parameter_sums",
    "primary_layer",
    "unit_moments",
    "weight_sums_from",
]

TANH_SATURATION = 0.99  # |tanh(x)| > 0.99: the derivative 1 - y^2 is below 0.02
SIGMOID_SATURATION = 0.01  # sigmoid(x) outside [0.01, 0.99]: the derivative y(1 - y) is below 0.0099

ACTIVATION_FIELDS = ("act_mean", "act_std", "act_min", "act_max", "act_second_moment", "nonfinite_act")
_NAN = math.nan


def activation_kind(module: nn.Module) -> tuple[str | None, nn.Module | None]:
    """("tanh" | "sigmoid" | "rectifier", the activation module) for the last activation inside ``module``
    (or ``module`` itself), else (None, None)."""
    found: tuple[str | None, nn.Module | None] = (None, None)
    for m in module.modules():
        # a module that is no activation class may still apply one to its output (Keras' Dense(activation=...))
        kind = kinds.activation(m) or _keras.applied_activation(m)
        if kind is not None and kind.family == "saturating":
            found = (kind.saturation, m)
        elif kind is not None and kind.family == "rectifier" and kind.dies:
            found = ("rectifier", m)  # dead units are measured where a unit can die (kinds.ActivationKind.dies)
    return found


def layer_parameters(layer: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A layer's own (name, parameter) pairs, named so that ``kinds.parameter_role`` tells weights from biases:
    torch's ``named_parameters(recurse=False)``; for a Keras layer its own variables by Keras' names (``kernel``,
    ``bias``) as the torch Parameters its forward uses (torch sees them only under path names in a ParameterDict)."""
    if _keras.is_keras_layer(layer):
        return _keras.own_parameters(layer)
    return list(layer.named_parameters(recurse=False))


def primary_layer(module: nn.Module) -> nn.Module | None:
    """The layer whose weights describe ``module``: itself if it owns a weight, else its first
    Linear/Conv/RNN descendant (for a Keras layer, its first sublayer owning a kernel: an LSTM's cell); None for
    a residual block (``kinds.is_block``: a transformer's or a ResNet's), whose record is the stream after it,
    which no single layer inside describes."""
    if any(kinds.parameter_role(name) == "weight" for name, _ in layer_parameters(module)):
        return module
    if kinds.is_block(module):
        return None
    if _keras.is_keras_layer(module):
        return _keras.primary_sublayer(module)
    return next((m for m in module.modules() if kinds.is_weight_layer(m)), None)


# -- activations ------------------------------------------------------------------------------------


def activation_moments(y: torch.Tensor) -> torch.Tensor:
    """[n, mean, M2, min, max, sum of squares, non-finite] of the finite values of ``y``."""
    y = y.detach().double()
    finite = torch.isfinite(y)
    n = finite.sum().double()
    zeroed = torch.where(finite, y, 0.0)
    mean = zeroed.sum() / n.clamp(min=1)
    m2 = torch.where(finite, y - mean, 0.0).square().sum()
    if y.numel():
        lo = torch.where(finite, y, torch.inf).min()
        hi = torch.where(finite, y, -torch.inf).max()
    else:
        lo = hi = y.new_tensor(_NAN)
    return torch.stack([n, mean, m2, lo, hi, zeroed.square().sum(), y.numel() - n])


# The one-pass variance sum(y^2) - sum(y)^2 / n from sums with relative error e carries a relative error of about
# e * E[y^2] / Var[y]. The CPU's fast sums are float32 within rows (e about 1e-7 for a row of a few thousand), so
# where E[y^2] exceeds Var[y] this many times (a mean over 30 standard deviations) the error could pass 1e-4 of the
# variance, and the layer's moments are recomputed exactly in float64 (``needs_exact_moments``).
CANCELLATION = 1e3

# A float32 sum of squares underflows where the values are below about 1e-19 (their squares below float32's
# smallest normal, 1.2e-38): a vanishing gradient of 1e-24 would read as exactly 0. Below this figure a float32
# result is taken again in float64 unless the tensor is all zeros.
UNDERFLOW = 1e-30


_ROW = 256  # the fewest values a row of the CPU's fast sums holds: shorter rows make slow reductions


def _rows(y: torch.Tensor) -> torch.Tensor | None:
    """``y`` as (rows, values) for the CPU's fast sums, its trailing dimensions merged until a row holds at least
    ``_ROW`` values (a conv output's (N, C, 4, 4) becomes (N * C / 16, 256)); None where those sums do not apply
    (not float32 on the CPU, not contiguous, or fewer than two rows)."""
    if y.dtype != torch.float32 or y.device.type != "cpu" or y.dim() < 2 or not y.is_contiguous():
        return None
    width = 1
    for size in reversed(y.shape):
        width *= size
        if width >= _ROW:
            break
    return y.view(-1, width) if 1 < width < y.numel() else None


def _host_sums(partial: torch.Tensor) -> list[float]:
    """The float64 sums over rows of (2, rows) float32 partial sums: [row sums, row norms] -> [sum, sum of squares].
    As the compiled taps sum chunks: float32 along each row, float64 across them. torch's float64 reductions of a
    float32 tensor convert every value first, at 2-3x the time. (Not numpy: its BLAS threads spin beside torch's and
    made every later reduction of the step 10-50x slower on 2 cores.)"""
    partial = partial.double()
    partial[1].square_()
    return partial.sum(dim=1).tolist()


def fast_activation_moments(y: torch.Tensor) -> torch.Tensor:
    """The same vector as ``activation_moments`` from three cheap reductions (a sum and a norm, with their partial
    sums in float64, and ``aminmax``), assuming every value is finite. NaN or Inf propagate into the sum, so a
    caller can tell and recompute that one layer with ``activation_moments``; the same where the one-pass
    M2 = sum(y^2) - sum(y)^2 / n may have cancelled (``needs_exact_moments``). ``torch.var_mean`` would be exact
    but costs ~30x more per call on CPU, and this runs on every logged layer of every logged step. On the CPU the
    arithmetic on the sums is done on the host (``_host_sums``); elsewhere on the device, in float64.
    """
    y = y.detach()
    n = float(y.numel())
    rows = _rows(y)
    if rows is not None:
        total, squares = _host_sums(torch.stack([rows.sum(dim=1), torch.linalg.vector_norm(rows, dim=1)]))
        lo, hi = torch.aminmax(y)
        m2 = max(squares - total * total / n, 0.0) if math.isfinite(total) else total
        return torch.tensor([n, total / n, m2, lo.item(), hi.item(), squares, 0.0], dtype=torch.float64)
    total = y.sum(dtype=torch.float64)
    squares = torch.linalg.vector_norm(y, dtype=torch.float64).square()
    lo, hi = torch.aminmax(y) if y.numel() else (total, total)
    m2 = (squares - total * total / max(n, 1.0)).clamp(min=0.0)
    return torch.stack(
        [total.new_tensor(n), total / max(n, 1.0), m2, lo.double(), hi.double(), squares, total.new_zeros(())]
    )


def needs_exact_moments(values: list[float]) -> bool:
    """Whether ``fast_activation_moments``' values (on the host) must be recomputed by ``activation_moments``: a sum
    met NaN/Inf, the float32 squares of values that are not all zero underflowed (``UNDERFLOW``), or the one-pass
    M2 may have lost more than 1e-4 of itself to cancellation (``CANCELLATION``)."""
    mean, m2, lo, hi, squares = values[1], values[2], values[3], values[4], values[5]
    if not (math.isfinite(mean) and math.isfinite(squares)):
        return True
    if squares < UNDERFLOW and (lo != 0 or hi != 0):  # tiny values whose float32 squares underflowed
        return True
    return squares > CANCELLATION * m2 and squares > 0


def needs_exact_gradient(squares: float, grad: torch.Tensor) -> bool:
    """Whether ``fast_gradient_moments``' sum of squares (on the host) must be recomputed by ``gradient_moments``:
    it met NaN/Inf, or it is below ``UNDERFLOW`` for a gradient that is not all zeros (a vanishing gradient whose
    float32 squares underflowed)."""
    return not math.isfinite(squares) or (squares < UNDERFLOW and bool(grad.any()))


def merge_activations(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Combine two activation accumulators (Chan, Golub, LeVeque 1983: exact for mean and M2)."""
    n = a[0] + b[0]
    delta = b[1] - a[1]
    mean = a[1] + delta * b[0] / n.clamp(min=1)
    m2 = a[2] + b[2] + delta.square() * a[0] * b[0] / n.clamp(min=1)
    return torch.stack([n, mean, m2, torch.minimum(a[3], b[3]), torch.maximum(a[4], b[4]), a[5] + b[5], a[6] + b[6]])


# -- units ------------------------------------------------------------------------------------------


def unit_moments(y: torch.Tensor, kind: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([saturated count, values counted], per-unit active mask or None) of an activation's output (N, *).

    Saturated: tanh |y| > 0.99, sigmoid y outside [0.01, 0.99]. A rectifier unit (one position of the
    per-sample output) is active if it is > 0 for some sample; dead if for none."""
    y = y.detach()
    counts = torch.zeros(2, dtype=torch.float64, device=y.device)
    active = None
    if kind == "tanh":
        counts = torch.stack([(y.abs() > TANH_SATURATION).sum().double(), y.new_tensor(y.numel()).double()])
    elif kind == "sigmoid":
        saturated = (y < SIGMOID_SATURATION) | (y > 1 - SIGMOID_SATURATION)
        counts = torch.stack([saturated.sum().double(), y.new_tensor(y.numel()).double()])
    elif kind == "rectifier" and y.dim() >= 1 and y.numel():
        rows = y.reshape(y.shape[0], -1)
        if y.device.type == "cpu":  # the per-unit maximum: no temporary the size of y (the probe's memory)
            largest = rows.amax(dim=0)
            # amax gives NaN for a unit with a NaN anywhere; it may be > 0 in another sample (read at once on the CPU)
            active = (rows > 0).any(dim=0) if bool(largest.isnan().any()) else largest > 0
        else:
            active = (rows > 0).any(dim=0)
    return counts, active


# -- gradients and weights --------------------------------------------------------------------------


def fast_gradient_moments(grad: torch.Tensor) -> torch.Tensor:
    """[sum of squares, 0] in one reduction, assuming every value is finite (NaN/Inf propagate into the sum)."""
    grad = grad.detach()
    rows = _rows(grad)
    if rows is not None:
        squares = torch.linalg.vector_norm(rows, dim=1).double().square().sum()
        return torch.stack([squares, squares.new_zeros(())])
    squares = torch.linalg.vector_norm(grad, dtype=torch.float64).square()
    return torch.stack([squares, squares.new_zeros(())])


def gradient_moments(grad: torch.Tensor) -> torch.Tensor:
    """[sum of squares of the finite values, non-finite count] of a gradient."""
    grad = grad.detach().double()
    finite = torch.isfinite(grad)
    return torch.stack([torch.where(finite, grad, 0.0).square().sum(), (~finite).sum().double()])


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor (a DTensor's local shard, read without communication); any other
    tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def _copies(p: torch.Tensor, world: int) -> int:
    """How many of the ``world`` processes hold the same part of ``p``: a DTensor's mesh sizes along the dimensions it
    is not sharded on (1 under FSDP; HSDP's replicas); a plain tensor is whole on every process."""
    if not isinstance(p, DTensor):
        return world
    return math.prod(p.device_mesh.size(i) for i, how in enumerate(p.placements) if not how.is_shard())


def parameter_sums(parameters: list[tuple[str, torch.Tensor]], device: torch.device, world: int = 1) -> torch.Tensor:
    """[weight-gradient sum of squares, bias-gradient sum of squares, first weight's n, its sum of squares, its sum]
    over this process's part of a layer's own (name, parameter) pairs, on ``device``: NaN for gradients it lacks,
    n = 0 where it has no weight of more than one value. With ``world`` > 1 (sharded parameters) each part is divided
    by the number of processes holding it, so that these sums add up, over the processes, to the whole layer's."""
    nan = torch.tensor(_NAN, dtype=torch.float64, device=device)
    weights = [p for name, p in parameters if kinds.parameter_role(name) == "weight"]
    biases = [p for name, p in parameters if kinds.parameter_role(name) == "bias"]

    def share(p) -> float:
        return 1.0 if world == 1 else 1.0 / _copies(p, world)

    def grad_squares(params):
        squares = [
            torch.linalg.vector_norm(local_part(p.grad.detach()), dtype=torch.float64).to(device).square() * share(p)
            for p in params
            if p.grad is not None
        ]
        return torch.stack(squares).sum() if squares else nan

    count = squares = total = nan.new_zeros(())
    if weights and weights[0].numel() > 1:  # the whole weight's size: the same choice on every process
        w, part = local_part(weights[0].detach()), share(weights[0])
        count = count + w.numel() * part
        total = w.sum(dtype=torch.float64).to(device) * part
        squares = torch.linalg.vector_norm(w, dtype=torch.float64).to(device).square() * part
    return torch.stack([grad_squares(weights), grad_squares(biases), count, squares, total])


def weight_sums_from(sums: torch.Tensor) -> torch.Tensor:
    """[weight-gradient sum of squares, bias-gradient sum of squares, weight n, weight M2] from ``parameter_sums``'
    columns (the last dimension; summed over processes or not): NaN for gradients a layer lacks, n = 0 where it has
    no weight of more than one value. M2 is one-pass, sum(w^2) - sum(w)^2 / n in float64. That cancels for weights
    far from zero (a norm's gain near 1 with a spread of 1e-4 keeps 1e-8 of sum(w^2)): the sums must be float64
    there, which ``Recorder._exact_weight_sums`` sees to for the float32 sums taken on the CPU."""
    weight_grad, bias_grad, count, squares, total = sums.unbind(-1)
    m2 = (squares - total * total / count.clamp(min=1)).clamp(min=0.0)
    return torch.stack([weight_grad, bias_grad, count, m2], dim=-1)
