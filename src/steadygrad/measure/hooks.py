"""The recorder both instruments use: hooks on selected modules that accumulate statistics on the device.

The probe runs it for one forward and backward pass; the monitor across the micro-batches of each
optimizer step. Either way ``finalize`` turns the accumulators into one vector of sums per layer call
(``SUMS_COLUMNS``), still on the device; after a single host copy ``rows_from_sums`` works out the
statistics from them, and ``make_records`` makes ``LayerRecord``s. The compiled kernels of the monitor's
deferred mode (``deferred_table``, fed as the step runs by ``Recorder.collector()``) produce the same sums,
so both paths share that last step.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn

from steadygrad._autograd import in_backward, on_gradient
from steadygrad._keras import is_stand_in
from steadygrad._layout import (
    RECORD,
    RECORD_COLUMNS,
    RECORD_WIDTH,
    SUMS,
    SUMS_ACTIVATION,
    SUMS_COLUMNS,
    SUMS_GRADIENT,
    SUMS_PARAMETERS,
    SUMS_SATURATION,
    SUMS_UNITS,
    SUMS_WIDTH,
)
from steadygrad.kinds import parameter_role
from steadygrad.losses import first_tensor
from steadygrad.measure.records import LayerRecord
from steadygrad.measure.stats import (
    CANCELLATION,
    UNDERFLOW,
    DTensor,
    activation_kind,
    activation_moments,
    fast_activation_moments,
    fast_gradient_moments,
    gradient_moments,
    layer_parameters,
    local_part,
    merge_activations,
    needs_exact_gradient,
    needs_exact_moments,
    parameter_sums,
    primary_layer,
    unit_moments,
    weight_sums_from,
)

__all__ = [
    "RECORD_COLUMNS",
    "RECORD_WIDTH",
    "SUMS_COLUMNS",
    "RankSums",
    "Recorder",
    "first_tensor",
    "kind_name",
    "make_records",
    "merge_ranks",
    "rows_from_sums",
]

_NO_ACTIVATIONS = (0.0, 0.0, 0.0, math.inf, -math.inf, 0.0, 0.0)  # the SUMS_ACTIVATION sums of nothing seen
# the order in which Recorder._slot_table concatenates a slot's accumulators: it must tile SUMS_COLUMNS
_GROUPS = (SUMS_ACTIVATION, SUMS_SATURATION, SUMS_UNITS, SUMS_GRADIENT, SUMS_PARAMETERS)
assert [i for g in _GROUPS for i in range(SUMS_WIDTH)[g]] == list(range(SUMS_WIDTH)), "groups must tile the layout"
assert len(_NO_ACTIVATIONS) == len(SUMS_COLUMNS[SUMS_ACTIVATION])


def _width(group: slice) -> int:
    return len(range(SUMS_WIDTH)[group])


def rows_from_sums(sums: list[float], gradient_scale: float = 1.0) -> list[float]:
    """A layer call's RECORD_WIDTH statistics (``RECORD_COLUMNS`` but the update ratio) from its sums
    (``SUMS_COLUMNS``, on the host): mean, std (unbiased), min, max, second moment, non-finite count, saturated and
    dead fractions, gradient norm (divided by a GradScaler's scale), its non-finite count, weight- and bias-gradient
    norms, weight variance (unbiased); NaN where nothing was seen."""
    s = SUMS
    n, m2, squares, counted, units = sums[s.n], sums[s.m2], sums[s.squares], sums[s.counted], sums[s.units]
    grad, weight_grad, bias_grad = sums[s.grad_squares], sums[s.weight_grad_squares], sums[s.bias_grad_squares]
    weight_n = sums[s.weight_n]
    nan = math.nan
    seen = n > 0
    row = [nan] * RECORD_WIDTH
    r = RECORD
    row[r.act_mean] = sums[s.mean] if seen else nan
    row[r.act_std] = math.sqrt(m2 / (n - 1)) if n > 1 else nan
    row[r.act_min] = sums[s.min] if seen else nan
    row[r.act_max] = sums[s.max] if seen else nan
    row[r.act_second_moment] = squares / n if seen else nan
    row[r.nonfinite_act] = sums[s.nonfinite]
    row[r.saturated] = sums[s.saturated] / counted if counted > 0 else nan
    row[r.dead] = sums[s.dead] / units if units > 0 else nan
    row[r.grad_norm] = math.sqrt(grad) / gradient_scale if grad == grad else nan
    row[r.nonfinite_grad] = sums[s.grad_nonfinite]
    row[r.weight_grad_norm] = math.sqrt(weight_grad) if weight_grad == weight_grad else nan
    row[r.bias_grad_norm] = math.sqrt(bias_grad) if bias_grad == bias_grad else nan
    row[r.weight_var] = sums[s.weight_m2] / (weight_n - 1) if weight_n > 1 else nan
    return row


def kind_name(module: nn.Module) -> str:
    """The class name; for an ``nn.Sequential`` block, its parts: ``Linear+BatchNorm1d+ReLU``."""
    if type(module) is nn.Sequential and len(module):
        return "+".join(type(m).__name__ for m in module)
    return type(module).__name__


def _is_last_step(module: nn.Module, inner: nn.Module) -> bool:
    """Whether ``inner``'s output is ``module``'s output: it ends a chain of ``nn.Sequential``s."""
    while type(module) is nn.Sequential and len(module):
        module = module[-1]
        if module is inner:
            return True
    return False


@dataclass
class _Slot:
    """Accumulators of one (module, call index): call k of a module used several times per forward."""

    name: str
    module: nn.Module
    call: int
    kind: str = ""  # kind_name(module), looked up once per recorder and given at creation
    index: int = 0  # position in first-call order: the row of the statistics table
    activations: torch.Tensor | None = None
    unit_counts: torch.Tensor | None = None
    unit_active: torch.Tensor | None = None
    gradients: torch.Tensor | None = None
    # on an accelerator (``_checked_now``), the tensors behind the fast statistics, kept until the step ends in case
    # one holds NaN/Inf and its statistics must be recomputed with masking (the fast path cannot exclude them)
    outputs: list = field(default_factory=list)
    grads: list = field(default_factory=list)


_CHUNK = 4096  # the values a float32 partial sum holds in ``_chunked_squares``, as in the compiled taps
# Tensors of more values are summed in chunks: ``_foreach_norm`` keeps one float32 accumulator per tensor, whose
# relative error grows with the count (1.8e-5 at 1 M values, 1.3e-3 at 16 M: a GPT-2 embedding has 38 M).
_LARGE = 1 << 20


def _chunked_squares(t: torch.Tensor) -> torch.Tensor:
    """sum(t^2) of a float32 tensor as float32 sums of chunks of ``_CHUNK`` values added in float64."""
    flat = t.reshape(-1)
    whole = flat.numel() - flat.numel() % _CHUNK
    squares = torch.linalg.vector_norm(flat[:whole].view(-1, _CHUNK), dim=1).double().square().sum()
    if whole < flat.numel():
        squares = squares + torch.linalg.vector_norm(flat[whole:]).double().square()
    return squares


def square_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's sum of squares, float64, in one multi-tensor pass (``torch._foreach_norm``, as
    ``clip_grad_norm_`` takes them). Float32 CPU tensors are summed in float32 (a float64 dtype makes
    ``_foreach_norm`` convert every value, 8x the time), those of over ``_LARGE`` values in chunks
    (``_chunked_squares``); a norm that overflowed, or one that may have underflowed (below ``UNDERFLOW``, of a
    tensor not all zeros: values under ~1e-19), is taken again in float64, so that a finite tensor never reads as
    Inf nor a vanishing one as 0. Elsewhere the pass accumulates in float64."""
    if not all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors):
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64)).square()
    large = [i for i, t in enumerate(tensors) if t.numel() > _LARGE]
    if large:
        squares = torch.zeros(len(tensors), dtype=torch.float64)
        small = [i for i, t in enumerate(tensors) if t.numel() <= _LARGE]
        if small:
            squares[small] = torch.stack(torch._foreach_norm([tensors[i] for i in small], 2)).double().square()
        for i in large:
            squares[i] = _chunked_squares(tensors[i])
    else:
        squares = torch.stack(torch._foreach_norm(tensors, 2)).double().square()
    tiny = squares < UNDERFLOW
    doubtful = ~torch.isfinite(squares) | tiny  # overflow, NaN/Inf, or underflow: float64 says
    for i in torch.nonzero(doubtful).flatten().tolist():
        if not (tiny[i] and not tensors[i].any()):  # an all-zero tensor's 0 is exact
            squares[i] = torch.linalg.vector_norm(tensors[i], dtype=torch.float64).square()
    return squares


def _total(w: torch.Tensor) -> torch.Tensor:
    """sum(w) in float64 (of a float32 CPU tensor: in float32, converted; a weight whose variance would cancel has
    it taken again in float64, ``Recorder._exact_weight_sums``)."""
    if w.dtype == torch.float32 and w.device.type == "cpu":
        return w.sum().double()
    return w.sum(dtype=torch.float64)


def _checked_now(t: torch.Tensor) -> bool:
    """Whether a tensor's fast sums are checked for NaN/Inf as soon as they are taken, and its masked statistics
    computed then if needed, so that nothing is kept: on the CPU, where reading a sum costs about a microsecond. On
    an accelerator that read would stall the device's queue once per layer, so there the tensor is kept to the
    step's end instead (``Recorder._repair_nonfinite``) and a healthy step reaches the host once."""
    return t.device.type == "cpu"


def _add_output(slot: _Slot, y: torch.Tensor | None, units: tuple | None, keep_nothing: bool = False) -> None:
    """Merge an output's moments and its activation's unit statistics into the slot's accumulators. With
    ``keep_nothing`` (the probe's one pass), an output that would be kept to the step's end (``_checked_now``)
    gets its exact masked moments at once instead: more arithmetic, no host read, and nothing held."""
    if y is not None:
        if _checked_now(y):
            moments = fast_activation_moments(y)
            if needs_exact_moments(moments.tolist()):  # NaN/Inf met, or M2 may have cancelled: exact, masked
                moments = activation_moments(y)
        elif keep_nothing:
            moments = activation_moments(y)
        else:
            moments = fast_activation_moments(y)
            slot.outputs.append(y.detach())
        slot.activations = moments if slot.activations is None else merge_activations(slot.activations, moments)
    if units is not None:
        counts, active = units
        slot.unit_counts = counts if slot.unit_counts is None else slot.unit_counts + counts
        if active is not None:
            slot.unit_active = active if slot.unit_active is None else slot.unit_active | active


_FINGERPRINT = 16  # values strided over an output, kept with its sums to tell a shared module's calls apart


def _fingerprint(y: torch.Tensor) -> tuple[tuple[int, ...], torch.Tensor]:
    """A no_grad output's shape, and on its device in float64: its sum, its norm and 16 values strided over it.

    Checkpointing's recompute replays the forward (RNG state included), so in deterministic kernels it reproduces
    all of them bitwise. The sums cover every value, not only the first sample's; they accumulate in float32
    (float64 for a float64 output), which copies nothing of a float32 output."""
    flat = y.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32  # accumulate: no copy of a bf16 output
    sample = flat[:: max(1, flat.numel() // _FINGERPRINT)][:_FINGERPRINT].to(dtype)
    sums = torch.stack([flat.sum(dtype=dtype), torch.linalg.vector_norm(flat, dtype=dtype)])
    return tuple(y.shape), torch.cat([sums, sample]).double()


def _take_match(waiting: deque, y: torch.Tensor) -> _Slot:
    """Remove and return the waiting call that a recompute's output ``y`` reproduces: the only one, else the latest
    whose fingerprint ``y``'s equals, else the latest of its shape, else the latest. Reentrant checkpointing
    recomputes the segments last first, so among calls it cannot tell apart the latest waiting is the one whose
    gradient comes next. The comparison reaches the host once, and is made only when several calls wait."""
    index = len(waiting) - 1
    if len(waiting) > 1:
        shape, mark = _fingerprint(y)
        same = [i for i, (_, (seen_shape, _)) in enumerate(waiting) if seen_shape == shape]
        if same:
            seen = torch.stack([waiting[i][1][1] for i in same])
            equal = torch.isclose(seen, mark, rtol=0, atol=0, equal_nan=True).all(1).tolist()
            index = next((i for i, hit in zip(reversed(same), reversed(equal), strict=True) if hit), same[-1])
    slot, _ = waiting[index]
    del waiting[index]
    return slot


def _add_gradient(slot: _Slot, grad: torch.Tensor, moments_of=fast_gradient_moments) -> None:
    moments = moments_of(grad)
    slot.gradients = moments if slot.gradients is None else slot.gradients + moments


def _add_fast_gradient(slot: _Slot, grad: torch.Tensor, keep_nothing: bool = False) -> None:
    """A gradient's fast sum of squares, checked at once on the CPU (the masked sums instead if it met NaN/Inf),
    else kept for the step's end (``_checked_now``); with ``keep_nothing``, the masked sums at once instead."""
    if _checked_now(grad):
        moments = fast_gradient_moments(grad)
        if needs_exact_gradient(moments[0].item(), grad):  # NaN/Inf met, or underflowed: the masked float64 sums
            moments = gradient_moments(grad)
    elif keep_nothing:
        moments = gradient_moments(grad)
    else:
        moments = fast_gradient_moments(grad)
        slot.grads.append(grad.detach())
    slot.gradients = moments if slot.gradients is None else slot.gradients + moments


def _gradient_tap(slot: _Slot, keep_nothing: bool = False):
    """The eager tensor hook of a slot's output: sums the gradient (``_add_fast_gradient``)."""

    def grad_hook(grad):
        _add_fast_gradient(slot, grad, keep_nothing)

    return grad_hook


@dataclass
class RankSums:
    """One layer call's accumulators on one rank, as ``_Slot`` holds them: activation moments (stats'
    ``activation_moments`` vector), unit counts [saturated, counted], the rectifier units' "ever active" mask and
    the output gradient's [sum of squares, non-finite count]; None where the slot has none."""

    activations: torch.Tensor
    unit_counts: torch.Tensor | None = None
    unit_active: torch.Tensor | None = None
    gradients: torch.Tensor | None = None


def merge_ranks(ranks: list[RankSums]) -> RankSums:
    """The accumulators of the global batch from each rank's share of it (data parallelism), with no communication.

    Activation moments merge by Chan, Golub and LeVeque's parallel update (exact for mean and M2); unit counts add;
    a unit is active if it is on any rank. Each rank's loss is the mean over its own share, so its output gradients
    are world_size times those of the global mean loss: the summed squares are divided by world_size^2 (the
    non-finite counts just add).
    """
    if not ranks:
        raise ValueError("merge_ranks needs the accumulators of at least one rank; got none.")
    world = len(ranks)
    activations = functools.reduce(merge_activations, [r.activations for r in ranks])

    def combined(values, how):
        return None if values[0] is None else how(torch.stack(values))

    counts = combined([r.unit_counts for r in ranks], lambda t: t.sum(0))
    active = combined([r.unit_active for r in ranks], lambda t: t.any(0))
    gradients = combined([r.gradients for r in ranks], lambda t: t.sum(0))
    if gradients is not None:
        gradients = gradients * gradients.new_tensor([1.0 / world**2, 1.0])
    return RankSums(activations, counts, active, gradients)


class Recorder:
    """Forward hooks on the selected modules (and on the activation inside each), and tensor hooks on
    their outputs for the gradient. ``arm`` and ``disarm`` switch the work on and off for the monitor's logged steps;
    ``active``, ``deferred`` and ``gradient_scale`` are read-only, set through ``arm`` and ``set_gradient_scale``.

    With ``deferred`` (the Monitor's mode when ``steadygrad.fast`` is on) the hooks hand each output to the
    compiled taps (``collector()``), which sum it with its gradient when that arrives, keeping nothing;
    ``deferred_table`` adds the parameters at the step's end. With the C++ taps that is one C++ call per layer
    in the forward pass and no Python at all in the backward pass; numba's taps have a Python gradient hook
    around two numba calls. Either way it replaces a dozen small reductions per tensor.

    Gradient checkpointing runs a segment's forward again in the backward pass. That recompute is not a call of its
    own (``in_backward``): in reentrant mode the first forward ran under no_grad, so the recompute's output is the one
    the gradient flows through, and it takes the gradient tap for the call of the module still waiting for one
    (``_awaiting``); in non-reentrant mode the first forward's outputs are in the graph and the recompute's are
    not, so nothing waits and the recompute is ignored. Where several calls of one module wait (a module shared by
    two checkpointed segments, which recompute last first), the recompute goes to the call whose output it
    reproduces (its shape, sums and strided values, bitwise: checkpointing replays the forward, RNG state included);
    failing that, or between calls with equal outputs, the latest call waiting (the backward's order). A recompute
    that does not reproduce its forward bitwise (a non-deterministic kernel) of a call out of that order may so have
    its gradient recorded under another call of the shared module.
    """

    def __init__(self, selected: list[tuple[str, nn.Module]]) -> None:
        self.selected = selected
        self._active = True  # the probe's use: attach, one pass, finalize
        self._paused = False  # a pass of a logged step that is not recorded (evaluation; LBFGS's re-evaluations)
        self._deferred = False
        # per selected module: its primary layer's (name, parameter) pairs, looked up once
        self.parameters: dict[int, list[tuple[str, nn.Parameter]]] = {}
        # and what the deferred statistics take from them: weights, biases, the first weight (all by module id)
        self._parameter_roles: dict[int, tuple[list[nn.Parameter], list[nn.Parameter], nn.Parameter | None]] = {}
        self._kinds = {id(module): kind_name(module) for _, module in selected}
        self._layer_index = {id(module): i for i, (_, module) in enumerate(selected)}
        self._collector = None  # deferred mode: the compiled taps (steadygrad.fast), made on first use
        self._snapshots: list[torch.Tensor | None] = []  # the eager taps' copies of the CPU first weights, reused
        # the probe's one pass: off the CPU, exact masked statistics at once instead of tensors kept to the step's end
        self.keep_nothing = False
        for _, module in selected:
            layer = primary_layer(module)
            named = [] if layer is None else layer_parameters(layer)
            self.parameters[id(module)] = named
            weights = [p for n, p in named if parameter_role(n) == "weight"]
            biases = [p for n, p in named if parameter_role(n) == "bias"]
            first = weights[0] if weights and weights[0].numel() > 1 else None
            self._parameter_roles[id(module)] = (weights, biases, first)
        self.watched_parameters = [p for named in self.parameters.values() for _, p in named]  # all, in order
        # FSDP's fully_shard (torch's DTensor parameters): each process holds a part of each parameter and of its
        # gradient; the weight statistics are then merged across processes (``parameter_sums``)
        self.sharded = any(isinstance(p, DTensor) for p in self.watched_parameters)
        self._gradient_scale = 1.0  # a GradScaler's scale: gradients are divided by it
        self._handles: list = []  # one per hook of the plan while attached
        self._attached = False
        self._plan: list[tuple[nn.Module, object]] | None = None
        self._slots: dict[tuple[str, int], _Slot] = {}
        self._calls_this_pass: dict[str, int] = {}
        self._pending_units: dict[int, tuple] = {}
        # per module name, its calls whose output had no gradient to tap (reentrant checkpointing's no_grad
        # forward), oldest first: a recompute in the backward pass taps its gradient for them
        self._awaiting: dict[str, deque[tuple[_Slot, tuple]]] = {}  # (call, its output's fingerprint)
        self.called: set[str] = set()
        # release_gradients: each parameter's gradient sum of squares, by id, taken as autograd accumulated it
        self._released: dict[int, torch.Tensor] | None = None
        self._release_handles: list = []

    # -- lifecycle ----------------------------------------------------------------------------------
    def _hook_plan(self) -> list[tuple[nn.Module, object]]:
        """(module, forward hook) pairs: each selected module's output hook, and its activation's where that is
        a separate module whose output is not the block's."""
        plan = []
        for name, module in self.selected:
            kind, act_module = activation_kind(module)
            if act_module is not None and act_module is not module and _is_last_step(module, act_module):
                act_module = module  # its output is the block's output: one hook serves both
            own_kind = kind if act_module is module else None
            if act_module is not None and act_module is not module:
                plan.append((act_module, self._unit_hook(module, kind)))
            plan.append((module, self._output_hook(name, module, own_kind)))
        return plan

    def attach(self) -> Recorder:
        """Register the forward hooks (the monitor does it for each logged step that follows an unlogged one).

        Only torch's public hook API is used: ``register_forward_hook`` here and ``handle.remove()`` in ``park``,
        so hooks the user registers in between keep their order relative to these (torch runs hooks in
        registration order) and torch's own bookkeeping of them stays whole. The hook functions are made once
        (``_hook_plan``); registering them anew costs about 7 µs a hook (torch makes a handle with weak
        references), paid once per run of logged steps, not per step."""
        if self._attached:
            return self
        if self._plan is None:
            self._plan = self._hook_plan()
        self._handles = [module.register_forward_hook(hook) for module, hook in self._plan]
        self._attached = True
        return self

    def park(self) -> None:
        """Take the hooks off their modules, keeping the hook functions for ``attach``: between a monitor's logged
        steps the modules then run torch's hook-free fast path."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._attached = False

    def detach(self) -> None:
        """Remove the hooks for good."""
        self.park()
        self._plan = None
        for handle in self._release_handles:
            handle.remove()
        self._release_handles = []
        self.keep_nothing = False

    def release_gradients(self, parameters: list[torch.Tensor]) -> None:
        """For a single measured pass (the probe): sum each parameter's gradient the moment autograd has accumulated
        it, and let it go (``p.grad = None``), so that a deep model's weight gradients never all live at once. The
        records are the same: the weight statistics read these sums instead of ``p.grad``. One backward pass calls a
        leaf's hook once, with every use's contribution summed, so the sum is that of the whole gradient. Reentrant
        checkpointing runs a backward pass per segment, so a leaf used in two of them gets its gradient in parts:
        when the forward showed it (a call waiting for its gradient, ``_awaiting``), the gradients stay whole. Not for
        sharded parameters (their sums need this process's part), nor for steps an optimizer must take."""
        if self.sharded:
            return
        self._released = {}

        def release(p: torch.Tensor) -> None:
            if self._awaiting:  # reentrant checkpointing: a leaf may get its gradient in parts, kept whole then
                return
            self._released[id(p)] = square_norms([p.grad.detach()])[0]  # as the table sums a kept gradient
            p.grad = None

        self._release_handles = [p.register_post_accumulate_grad_hook(release) for p in parameters if p.requires_grad]

    def had_gradient(self, p: torch.Tensor) -> bool:
        """Whether ``p`` got a gradient that is not all zeros this step (a layer used through its weights)."""
        if self._released and id(p) in self._released:
            return bool(self._released[id(p)] != 0)
        return p.grad is not None and bool(p.grad.any())

    def _gradient_squares(self, device: torch.device) -> torch.Tensor:
        """Per selected layer, its weight- and bias-gradient sums of squares (a (layers, 2) float64 tensor on
        ``device``, NaN where it has none): ``_squares`` without the weights."""
        return self._squares(device, weights=False)[:, :2]

    def _squares(self, device: torch.device, weights: bool = True) -> torch.Tensor:
        """Per selected layer, [weight-gradient, bias-gradient, first weight] sums of squares (a (layers, 3) float64
        tensor on ``device``; NaN where a layer has no such gradient, 0 where it has no first weight or
        ``weights`` is False). The gradients come from ``release_gradients``' sums, else from ``p.grad``; every
        tensor is summed in one multi-tensor pass (``torch._foreach_norm``, as ``clip_grad_norm_`` takes them),
        not a reduction and a copy per tensor."""
        layers = len(self.selected)
        released = self._released or {}
        tensors, places, found, found_places = [], [], [], []  # places: the flat index layer * 3 + column
        for i, (_, module) in enumerate(self.selected):
            role = self._parameter_roles[id(module)]
            for column in (0, 1):  # weights' and biases' gradients
                for p in role[column]:
                    if id(p) in released:
                        found.append(released[id(p)])
                        found_places.append(3 * i + column)
                    elif p.grad is not None:
                        tensors.append(p.grad.detach())
                        places.append(3 * i + column)
            if weights and role[2] is not None:
                tensors.append(role[2].detach())
                places.append(3 * i + 2)
        parts = []
        if tensors:
            parts.append(square_norms(tensors).to(device))
        if found:
            parts.append(torch.stack(found).to(device))
        squares = torch.zeros(3 * layers, dtype=torch.float64, device=device)
        seen = torch.zeros(3 * layers, dtype=torch.bool, device=device)
        if parts:
            index = torch.tensor(places + found_places, device=device)
            squares.index_add_(0, index, torch.cat(parts) if len(parts) > 1 else parts[0])
            seen[index] = True
        squares, seen = squares.view(layers, 3), seen.view(layers, 3)
        squares[:, :2] = torch.where(seen[:, :2], squares[:, :2], math.nan)
        return squares

    # -- the monitor's side: one logged step at a time ------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether the hooks record (the step being accumulated is logged)."""
        return self._active

    @property
    def deferred(self) -> bool:
        """Whether this step's statistics come from the compiled taps (``collector()``) instead of the eager ones."""
        return self._deferred

    @property
    def gradient_scale(self) -> float:
        """The factor output gradients are divided by in the records (a GradScaler's scale; 1 otherwise)."""
        return self._gradient_scale

    def arm(self, deferred: bool = False) -> None:
        """Record the next step: hooks on, with the compiled taps (``deferred``; their backend renewed if
        ``steadygrad.fast`` switched backend) or the eager statistics. The choice holds until the next ``arm``."""
        self._active = True
        self._deferred = bool(deferred)
        if self._deferred:
            self.renew_collector()
        self.attach()

    @property
    def paused(self) -> bool:
        """Whether the hooks ignore the passes now running, though the step is logged (``pause``)."""
        return self._paused

    def pause(self, paused: bool = True) -> None:
        """Ignore the passes that run from now until ``pause(False)``: what was recorded is kept, nothing is added
        (an evaluation pass between training steps, or an optimizer re-evaluating its closure after the update
        began). The hooks stay on, so resuming costs nothing."""
        self._paused = bool(paused)

    def disarm(self) -> None:
        """Record nothing until the next ``arm``: the hooks come off, so the model runs torch's hook-free path."""
        self._active = False
        self.park()

    def set_gradient_scale(self, scale: float) -> None:
        """Divide this step's output gradients by ``scale`` in the records (``reset`` restores 1)."""
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"gradient scale must be a positive finite number (a GradScaler's scale); got {scale}.")
        self._gradient_scale = scale

    def layer_index(self, module: nn.Module) -> int:
        """The position of a selected module in ``selected`` (a slot's layer, for per-layer columns)."""
        return self._layer_index[id(module)]

    def new_pass(self) -> None:
        """Call before each forward pass: call indices restart, so micro-batches merge slot by slot."""
        self._calls_this_pass.clear()

    def reset(self) -> None:
        """Forget this step's accumulators (and its gradient scale): ready for the next step."""
        self._gradient_scale = 1.0
        self._paused = False
        self._slots.clear()
        if self._collector is not None:
            self._collector.clear()
        self._calls_this_pass.clear()
        self._pending_units.clear()
        self._awaiting.clear()
        if self._released is not None:
            self._released.clear()

    @property
    def empty(self) -> bool:
        return not self._slots

    # -- hooks ----------------------------------------------------------------------------------------
    def _unit_hook(self, parent: nn.Module, kind: str):
        def hook(module, args, output):
            # a recompute (its first call gave the unit statistics), or Keras' shape inference (meta tensors)
            if not self._active or self._paused or in_backward() or is_stand_in(output):
                return
            y = first_tensor(output)
            if y is not None:
                self._pending_units[id(parent)] = (y.detach(), kind) if self._deferred else unit_moments(y, kind)

        return hook

    def _output_hook(self, name: str, module: nn.Module, own_kind: str | None):
        def hook(mod, args, output):
            # Keras' shape inference (meta tensors) is not a call
            if not self._active or self._paused or is_stand_in(output):
                return
            if in_backward():
                self._recomputed(name, output)
                return
            call = self._calls_this_pass.get(name, 0) + 1
            self._calls_this_pass[name] = call
            self.called.add(name)
            slot = self._slots.get((name, call))
            if slot is None:
                slot = _Slot(name, module, call, self._kinds[id(module)], len(self._slots))
                self._slots[(name, call)] = slot
            y = first_tensor(output)
            if y is None:
                return
            if not y.requires_grad and not torch.is_grad_enabled():  # reentrant checkpointing's first forward
                self._awaiting.setdefault(name, deque()).append((slot, _fingerprint(y)))
            if self._deferred:
                self._collect(slot, y, module, own_kind)
                return
            units = unit_moments(y, own_kind) if own_kind else self._pending_units.pop(id(module), None)
            _add_output(slot, y, units, self.keep_nothing)
            if y.requires_grad:
                on_gradient(y, _gradient_tap(slot, self.keep_nothing))

        return hook

    def _recomputed(self, name: str, output) -> None:
        """A forward call in the backward pass (checkpointing's recompute): no new call and no activation
        statistics (the first forward gave them), only the gradient of a call that is waiting for one."""
        waiting = self._awaiting.get(name)
        y = first_tensor(output)
        if not waiting or y is None or not y.requires_grad:
            return
        slot = _take_match(waiting, y)
        if self._deferred:  # the compiled taps summed the output already: the gradient joins in deferred_table
            on_gradient(y, lambda grad: _add_gradient(slot, grad, gradient_moments))
        else:
            on_gradient(y, _gradient_tap(slot, self.keep_nothing))

    def first_weights(self) -> list[nn.Parameter | None]:
        """Each selected layer's first weight of more than one value (None where it has none): the weight whose
        variance and update ratio the records report."""
        return [self._parameter_roles[id(module)][2] for _, module in self.selected]

    def weight_snapshot(self) -> list[torch.Tensor | None]:
        """A copy of each selected layer's first weight (of a sharded one, this process's part; None where it has
        none), for the eager taps' update ratio: the caller may overwrite the copies (``_EagerTaps`` subtracts the
        updated weights from them in place). A CPU weight is copied into a buffer kept from the last call: a fresh
        copy of every weight each logged step made the allocator map and fault in that many megabytes again (glibc
        gives large blocks back when they are freed), which cost 3-4x the copy itself on the benchmark MLP. This
        keeps one copy of the watched CPU weights alive between logged steps, as the compiled taps' buffers do; on
        an accelerator the caching allocator reuses its blocks, so a fresh copy costs nothing extra and holds no
        memory between steps."""
        weights = [None if w is None else local_part(w.detach()) for w in self.first_weights()]
        if len(self._snapshots) != len(weights):
            self._snapshots = [None] * len(weights)
        copies: list[torch.Tensor | None] = []
        buffers, sources = [], []  # the CPU copies, filled in one multi-tensor pass
        for i, w in enumerate(weights):
            kept = self._snapshots[i]
            if w is None or w.device.type != "cpu":
                self._snapshots[i] = None  # a weight moved off the CPU lets its old buffer go
                copies.append(None if w is None else w.clone())
                continue
            if kept is None or kept.shape != w.shape or kept.dtype != w.dtype:  # made, or the weight changed
                kept = self._snapshots[i] = torch.empty_like(w, memory_format=torch.contiguous_format)
            copies.append(kept)
            buffers.append(kept)
            sources.append(w)
        if buffers:
            torch._foreach_copy_(buffers, sources)
        return copies

    def collector(self):
        """The compiled taps of deferred mode (a ``steadygrad.fast`` backend's Collector), made on first use: they
        know each layer's parameters and hold a buffer per first weight for its copy before the update."""
        if self._collector is None:
            self.renew_collector()
        return self._collector

    def renew_collector(self) -> None:
        """Make the taps of the backend now enabled, unless the current ones are that backend's (called before
        each logged step, so that a step's taps stay the same from its forward pass to its report)."""
        from steadygrad.fast import collector_type

        made = collector_type()
        if isinstance(self._collector, made):
            return
        width = made.columns() if hasattr(made, "columns") else "an unknown number of"  # a build older than columns()
        if width != SUMS_WIDTH:
            raise RuntimeError(
                f"steadygrad's compiled taps ({made.__module__}) write rows of {width} sums, but the layout "
                f"(steadygrad/_layout.py) has {SUMS_WIDTH}: rebuild the kernels after changing the layout (C++: "
                "kColumns in fast/csrc/moments.h and SlotSums::write_row), or run steadygrad.fast.disable()."
            )
        roles = [self._parameter_roles[id(module)] for _, module in self.selected]
        snapshots = [
            torch.empty_like(w, memory_format=torch.contiguous_format)
            if w is not None and w.dtype == torch.float32 and w.device.type == "cpu"
            else None
            for _, _, w in roles
        ]
        self._collector = made([w for w, _, _ in roles], [b for _, b, _ in roles], [w for _, _, w in roles], snapshots)

    def _collect(self, slot: _Slot, y: torch.Tensor, module: nn.Module, own_kind: str | None) -> None:
        """Deferred mode: the output goes to the compiled taps, which sum it with its gradient in the backward
        pass (at once if it will get none); nothing is kept here."""
        collector = self._collector or self.collector()
        if own_kind:  # the activation function's output is the layer's: one pass gives both statistics
            collector.output(y, slot.index, _KIND_CODES[own_kind])
            return
        collector.output(y, slot.index, 0)
        units = self._pending_units.pop(id(module), None)
        if units is not None:
            collector.units(units[0], slot.index, _KIND_CODES[units[1]])

    # -- results ---------------------------------------------------------------------------------------
    def _recompute_masked(self, slot: _Slot) -> None:
        """The exact, NaN/Inf-excluding statistics of one slot from the tensors it kept (the rare path: it held
        non-finite values; on the CPU they were computed on the spot, and nothing was kept)."""
        if slot.outputs:
            slot.activations = None
        for y in slot.outputs:
            moments = activation_moments(y)
            slot.activations = moments if slot.activations is None else merge_activations(slot.activations, moments)
        if slot.grads:
            slot.gradients = torch.stack([gradient_moments(g) for g in slot.grads]).sum(0)

    def _repair_nonfinite(self, slots: list[_Slot], device: torch.device) -> None:
        """One host synchronization: recompute, with masking, only the slots whose fast statistics met NaN/Inf."""
        zero = torch.zeros((), dtype=torch.float64)
        sums = [
            torch.stack(
                [
                    (s.activations[1] if s.activations is not None else zero).to(device),
                    (s.gradients[0] if s.gradients is not None else zero).to(device),
                ]
            )
            for s in slots
        ]
        if sums and not bool(torch.isfinite(torch.stack(sums)).all()):
            for slot, pair in zip(slots, sums, strict=True):
                if not bool(torch.isfinite(pair).all()):
                    self._recompute_masked(slot)

    def all_reduce(self, group=None) -> None:
        """Merge every rank's accumulators so that ``finalize`` reports the statistics of the global batch.

        Slots line up across ranks (the same model ran the same forward). Each slot's accumulators are
        all-gathered and merged by ``merge_ranks`` (the arithmetic, documented and tested there).
        """
        import torch.distributed as dist

        world = dist.get_world_size(group)
        slots = list(self._slots.values())
        if not slots:
            return
        device = next((s.activations.device for s in slots if s.activations is not None), torch.device("cpu"))
        self._repair_nonfinite(slots, device)
        empty = torch.tensor(_NO_ACTIVATIONS, dtype=torch.float64, device=device)

        def gather(local: torch.Tensor | None) -> list[torch.Tensor] | None:
            if local is None:
                return None
            gathered = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(gathered, local.contiguous(), group=group)
            return gathered

        for slot in slots:
            activations = gather(slot.activations if slot.activations is not None else empty)
            counts = gather(slot.unit_counts)
            active = gather(None if slot.unit_active is None else slot.unit_active.double())
            gradients = gather(slot.gradients)
            merged = merge_ranks(
                [
                    RankSums(
                        activations[rank],
                        None if counts is None else counts[rank],
                        None if active is None else active[rank] > 0,
                        None if gradients is None else gradients[rank],
                    )
                    for rank in range(world)
                ]
            )
            slot.activations, slot.unit_counts = merged.activations, merged.unit_counts
            slot.unit_active, slot.gradients = merged.unit_active, merged.gradients

    def parameter_sums(self, device: torch.device) -> torch.Tensor:
        """Per selected layer, ``stats.parameter_sums`` of this process's part of its parameters: a (layers, 5)
        float64 tensor on ``device`` whose sum over the processes (one all_reduce) is the whole model's."""
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return torch.stack([parameter_sums(self.parameters[id(m)], device, world) for _, m in self.selected])

    def _parameter_table(self, device: torch.device) -> torch.Tensor:
        """Per selected layer, ``stats.parameter_sums``' five sums of its own parameters (weight- and bias-gradient
        sums of squares, NaN where it has none: ``_gradient_squares``; its first weight's n, sum of squares and
        sum), as a (layers, 5) float64 tensor on ``device``, each group in one multi-tensor pass."""
        f64 = {"dtype": torch.float64, "device": device}
        table = torch.zeros((len(self.selected), 5), **f64)
        squares = self._squares(device)
        table[:, :2], table[:, 3] = squares[:, :2], squares[:, 2]
        firsts = [(i, self._parameter_roles[id(module)][2]) for i, (_, module) in enumerate(self.selected)]
        firsts = [(i, w.detach()) for i, w in firsts if w is not None]
        if firsts:
            index = torch.tensor([i for i, _ in firsts], device=device)
            table[index, 2] = torch.tensor([float(w.numel()) for _, w in firsts], **f64)
            table[index, 4] = torch.stack([_total(w) for _, w in firsts]).to(device)
            self._exact_weight_sums(table, firsts)
        return table

    @staticmethod
    def _exact_weight_sums(table: torch.Tensor, firsts: list[tuple[int, torch.Tensor]]) -> None:
        """Take again in float64 the sum and sum of squares of each float32 CPU first weight whose variance
        sum(w^2) - sum(w)^2 / n cancels (sum(w^2) > ``CANCELLATION`` M2): a norm's gain near 1 with a small
        spread, whose float32 sums would give a variance off by 16% (1e-3 spread, 4096 values) or 0 (1e-4)."""
        cpu32 = [(i, w) for i, w in firsts if w.dtype == torch.float32 and w.device.type == "cpu"]
        if not cpu32:
            return
        rows = table[[i for i, _ in cpu32]]
        squares, m2 = rows[:, 3], weight_sums_from(rows)[:, 3]
        cancelled = (squares > CANCELLATION * m2) & (squares > 0)
        for j in torch.nonzero(cancelled).flatten().tolist():
            i, w = cpu32[j]
            table[i, 3] = torch.linalg.vector_norm(w, dtype=torch.float64).square()
            table[i, 4] = w.sum(dtype=torch.float64)

    def _slot_table(self, slots: list[_Slot], device: torch.device, parameters: torch.Tensor | None) -> torch.Tensor:
        """The slots' accumulators as a (slots, len(SUMS_COLUMNS)) float64 tensor on ``device``: each group's
        vectors stacked for all slots at once, the groups concatenated in ``_GROUPS`` order, which tiles the layout
        (checked at import). ``parameters``: weight_sums_from of the parameter table (None when sharded: filled in
        with the merged figures by the Monitor, ``_EagerTaps.rows``)."""
        f64 = {"dtype": torch.float64, "device": device}

        def stacked(values: list[torch.Tensor | None], missing: tuple[float, ...]) -> torch.Tensor:
            default = None
            if any(v is None for v in values):
                default = torch.tensor(missing, **f64)
            return torch.stack([default if v is None else v.to(device) for v in values])

        activations = stacked([s.activations for s in slots], _NO_ACTIVATIONS)
        counts = stacked([s.unit_counts for s in slots], (0.0,) * _width(SUMS_SATURATION))
        units = torch.zeros((len(slots), _width(SUMS_UNITS)), **f64)
        masked = [(i, s.unit_active) for i, s in enumerate(slots) if s.unit_active is not None]
        if masked:  # [units, dead units]
            index = torch.tensor([i for i, _ in masked], device=device)
            sizes = torch.tensor([float(m.numel()) for _, m in masked], **f64)
            active = torch.stack([m.sum() for _, m in masked]).to(**f64)
            units[index] = torch.stack([sizes, sizes - active], dim=1)
        gradients = stacked([s.gradients for s in slots], (math.nan, 0.0))
        if parameters is None:
            weights = torch.full((len(slots), _width(SUMS_PARAMETERS)), math.nan, **f64)
        else:
            weights = parameters[torch.tensor([self._layer_index[id(s.module)] for s in slots], device=device)]
        return torch.cat([activations, counts, units, gradients, weights], dim=1)

    def finalize(self, device: torch.device | None = None, repair: bool = True) -> tuple[list[_Slot], torch.Tensor]:
        """The slots in first-call order and their sums: a (slots, len(SUMS_COLUMNS)) float64 tensor on
        ``device``, for ``rows_from_sums`` after one host copy.

        With ``repair``, one host synchronization checks whether any layer's fast statistics met NaN/Inf, and
        only those layers are recomputed, with masking, from the tensors kept for that purpose. Without it the
        caller checks the values it copies to the host anyway (``needs_repair``) and calls again with repair
        only when one is non-finite: a healthy step then reaches the host once.
        """
        slots = list(self._slots.values())
        if device is None:
            seen = (s.activations.device for s in slots if s.activations is not None)
            device = next(seen, torch.device("cpu"))
        if repair:
            self._repair_nonfinite(slots, device)
        if not slots:
            return slots, torch.zeros((0, SUMS_WIDTH), dtype=torch.float64, device=device)
        parameters = None if self.sharded else weight_sums_from(self._parameter_table(device))
        return slots, self._slot_table(slots, device, parameters)


# the activation kinds of the compiled taps: the codes of steadygrad/fast/csrc/stats.h
_KIND_CODES = {None: 0, "tanh": 1, "sigmoid": 2, "rectifier": 3}


def deferred_table(recorder: Recorder, snapshot: bool = True) -> tuple[list[_Slot], torch.Tensor]:
    """The deferred mode's sums for every slot, ``finalize``'s (slots, len(SUMS_COLUMNS)) float64 tensor, from
    the compiled taps: what they summed as the step ran, plus each slot's parameter gradients and first weight
    in one parallel pass, which with ``snapshot`` also copies each first weight into its snapshot buffer
    (``Collector.update_norms`` after the optimizer's step gives the update ratios)."""
    slots = list(recorder._slots.values())
    layers = [recorder.layer_index(slot.module) for slot in slots]
    table = recorder.collector().statistics(layers, snapshot)
    if recorder._released is not None:  # the gradients were summed and let go as they came (release_gradients)
        columns = [SUMS.weight_grad_squares, SUMS.bias_grad_squares]
        table[:, columns] = recorder._gradient_squares(table.device)[layers]
    return slots, _add_recomputed_gradients(slots, table)


def _add_recomputed_gradients(slots: list[_Slot], table: torch.Tensor) -> torch.Tensor:
    """The gradients the recorder tapped itself on checkpointing's recomputes (the taps saw the first forward's
    output, which had none) added to the taps' gradient sums, NaN there meaning none yet."""
    for row, slot in enumerate(slots):
        if slot.gradients is not None:
            squares, nonfinite = slot.gradients.to(table).unbind()
            total = table[row, SUMS.grad_squares]
            table[row, SUMS.grad_squares] = torch.where(total.isnan(), 0.0, total) + squares
            table[row, SUMS.grad_nonfinite] += nonfinite
    return table


def needs_repair(slots: list[_Slot], rows: list[list[float]]) -> bool:
    """Whether host rows of an unrepaired ``finalize`` show that a layer's fast statistics met NaN/Inf: a
    non-finite mean of an output it saw, or a non-finite norm of a gradient it received."""
    return any(
        (slot.activations is not None and not math.isfinite(row[RECORD.act_mean]))
        or (slot.gradients is not None and not math.isfinite(row[RECORD.grad_norm]))
        for slot, row in zip(slots, rows, strict=True)
    )


def make_records(slots, values: list[list[float]], weight_grad_scale: float = 1.0) -> list[LayerRecord]:
    """``LayerRecord``s from finalized rows already copied to the host (``tensor.tolist()``), read by
    ``RECORD_COLUMNS`` name (attribute by attribute: a dict per record would cost more than the record itself)."""
    records = []
    for index, (slot, row) in enumerate(zip(slots, values, strict=True)):
        r = RECORD
        records.append(
            LayerRecord(
                name=slot.name,
                kind=slot.kind,
                index=index,
                call=slot.call,
                act_mean=row[r.act_mean],
                act_std=row[r.act_std],
                act_min=row[r.act_min],
                act_max=row[r.act_max],
                act_second_moment=row[r.act_second_moment],
                nonfinite_act=int(row[r.nonfinite_act]) if math.isfinite(row[r.nonfinite_act]) else 0,
                saturated=row[r.saturated],
                dead=row[r.dead],
                grad_norm=row[r.grad_norm],
                nonfinite_grad=int(row[r.nonfinite_grad]) if math.isfinite(row[r.nonfinite_grad]) else 0,
                weight_grad_norm=row[r.weight_grad_norm] / weight_grad_scale,
                bias_grad_norm=row[r.bias_grad_norm] / weight_grad_scale,
                weight_var=row[r.weight_var],
                update_ratio=row[r.update_ratio] if len(row) > r.update_ratio else math.nan,
            )
        )
    for current, following in itertools.pairwise(records):
        if math.isfinite(current.grad_norm) and math.isfinite(following.grad_norm) and following.grad_norm > 0:
            current.grad_ratio = current.grad_norm / following.grad_norm
    return records
