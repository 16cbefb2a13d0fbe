"""``Monitor``: the probe's per-layer records while a model trains, at almost no cost between logs."""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from steadygrad import _keras
from steadygrad._autograd import in_backward
from steadygrad._layout import REPAIRED, SUMS_PARAMETERS, SUMS_WIDTH
from steadygrad.measure import compiled as compile_support
from steadygrad.measure.attention import AttentionTap
from steadygrad.measure.hooks import (
    Recorder,
    deferred_table,
    make_records,
    needs_repair,
    rows_from_sums,
    square_norms,
)
from steadygrad.measure.layers import LayerSelector, select_layers, skipped_modules
from steadygrad.measure.records import FlowReport
from steadygrad.measure.sinks import HistorySink, Sink
from steadygrad.measure.stats import local_part, weight_sums_from
from steadygrad.structure import describe

__all__ = ["PASSES_WITHOUT_A_STEP", "UPDATE_RATIO_SPACING", "Monitor", "resolve_update_every", "unwrap_optimizer"]

Schedule = Callable[[int], bool]

# A Monitor that has recorded this many forward passes into one step without seeing that step close warns once. The
# longest gradient accumulation in common use is well below it (64 micro-batches is already rare), so reaching it
# means no optimizer step of the model's parameters is being seen: the weights are updated by hand, or by an
# optimizer that holds copies of them (DeepSpeed's ZeRO keeps flat float32 partitions).
PASSES_WITHOUT_A_STEP = 256


def unwrap_optimizer(optimizer):
    """The ``torch.optim.Optimizer`` whose ``step`` updates the weights, inside the wrappers frameworks hand out:
    accelerate's ``AcceleratedOptimizer`` (``.optimizer``; it never runs torch's ``Optimizer.__init__``, so it has no
    step hooks of its own) and Lightning's ``LightningOptimizer`` (``._optimizer``). An optimizer that has torch's
    step hooks is taken as it is, so a wrapper that is a real torch optimizer (a Lookahead) is followed itself."""
    seen = optimizer
    for _ in range(8):  # wrappers of wrappers, never a cycle
        if isinstance(seen, torch.optim.Optimizer) and hasattr(seen, "_optimizer_step_pre_hooks"):
            if type(seen).__name__.startswith("Lightning") and isinstance(
                getattr(seen, "_optimizer", None), torch.optim.Optimizer
            ):
                return seen._optimizer
            return seen
        inner = getattr(seen, "optimizer", None) or getattr(seen, "_optimizer", None)
        if inner is None or inner is seen:
            break
        seen = inner
    raise TypeError(
        f"optimizer must be a torch.optim.Optimizer, or a wrapper that holds one as .optimizer (accelerate's "
        f"AcceleratedOptimizer) or ._optimizer (Lightning's LightningOptimizer); got {type(optimizer).__name__}. "
        "Or leave optimizer out: the Monitor then finds the steps of any torch optimizer that updates the model."
    )


@dataclass
class _PendingStep:
    """A logged step between the optimizer's pre- and post-step hooks: its statistics, taken before the update,
    and what the update ratio needs after it.

    ``taps`` made ``table`` and turn it into rows: the compiled ones copied the first weights into their own
    buffers when ``snapshot``; for the eager ones ``weights_before`` holds a copy of each watched layer's first
    weight (None where it has none, or without ``snapshot``; of a sharded weight, this process's part), and, for a
    sharded model, ``parameters`` this process's part of each layer's parameter sums (``Recorder.parameter_sums``)."""

    slots: list
    table: torch.Tensor
    taps: _Taps
    snapshot: bool
    weights_before: list[torch.Tensor | None] = field(default_factory=list)
    parameters: torch.Tensor | None = None


def _per_slot(recorder: Recorder, slots: list, values: list) -> list:
    """Per slot, its layer's entry of ``values`` (one per watched layer, in ``recorder.selected`` order)."""
    return [values[recorder.layer_index(slot.module)] for slot in slots]


class _Taps:
    """How a logged step's statistics are taken: one interface for the eager statistics and the compiled taps,
    chosen by the Monitor for each logged step (``Monitor._arm``) and kept in its ``_PendingStep``.

    ``before_update`` runs in the optimizer's pre-step hook, when the gradients are final and the weights not yet
    changed; ``rows`` in the post-step hook, giving (loss, one RECORD_COLUMNS row per slot)."""

    deferred = False  # whether the recorder hands tensors to the compiled taps (Recorder.arm)

    def before_update(self, recorder: Recorder, snapshot: bool) -> _PendingStep:
        raise NotImplementedError

    def rows(self, recorder: Recorder, pending: _PendingStep, loss: torch.Tensor | None):
        raise NotImplementedError


class _EagerTaps(_Taps):
    """Float64 torch reductions on the layers' device, merged across ranks under data parallelism; one host copy
    of a healthy step (a second when a layer met NaN/Inf and is recomputed with masking)."""

    def __init__(self, global_batch: bool = True) -> None:
        self.global_batch = global_batch

    def before_update(self, recorder: Recorder, snapshot: bool) -> _PendingStep:
        from steadygrad.distributed import is_distributed

        if self.global_batch and is_distributed():  # statistics of the global batch, not of this rank's share
            recorder.all_reduce()
        slots, table = recorder.finalize(repair=False)  # checked on the host copy, see rows
        before = recorder.weight_snapshot() if snapshot else [None] * len(recorder.selected)
        parts = recorder.parameter_sums(table.device) if recorder.sharded else None  # merged in rows
        return _PendingStep(slots, table, self, snapshot=snapshot, weights_before=before, parameters=parts)

    @staticmethod
    def _update_norms(recorder: Recorder, pending: _PendingStep, device) -> torch.Tensor:
        """Per watched layer: [||W_after - W_before||^2, ||W_before||^2] (of this process's part when sharded), NaN
        where no copy was taken; the norms each in one multi-tensor pass, the differences taken in place in the
        copies (``Recorder.weight_snapshot``), so that no second copy of the weights is allocated."""
        norms = torch.full((len(pending.weights_before), 2), math.nan, dtype=torch.float64, device=device)
        pairs = [
            (i, local_part(new.detach()), old)
            for i, (old, new) in enumerate(zip(pending.weights_before, recorder.first_weights(), strict=True))
            if old is not None and new is not None
        ]
        if pairs:
            index = torch.tensor([i for i, _, _ in pairs], device=device)
            before = [old for _, _, old in pairs]
            squares_before = square_norms(before)
            torch._foreach_sub_(before, [new for _, new, _ in pairs])  # before - after: the change, negated
            norms[index] = torch.stack([square_norms(before), squares_before], dim=1).to(device)
        return norms

    def rows(self, recorder: Recorder, pending: _PendingStep, loss: torch.Tensor | None):
        slots, table = pending.slots, pending.table
        device = table.device
        if pending.snapshot or pending.parameters is not None:
            norms = self._update_norms(recorder, pending, device)
        else:  # the update ratio is not measured on this step
            norms = torch.full((len(recorder.selected), 2), math.nan, dtype=torch.float64, device=device)
        if pending.parameters is not None:  # sharded: one all_reduce merges every layer's parameter and update sums
            import torch.distributed as dist

            merged = torch.cat([pending.parameters, norms], dim=1)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(merged)  # (a part held by several processes was divided by their number)
            table = table.clone()
            rows_of = [recorder.layer_index(slot.module) for slot in slots]
            table[:, SUMS_PARAMETERS] = weight_sums_from(merged[rows_of, :-2])
            norms = merged[:, -2:]
        ratios = list((norms[:, 0].sqrt() / norms[:, 1].sqrt()).unbind())
        column = torch.stack(_per_slot(recorder, slots, ratios))  # a pending step has slots (Monitor._before_step)
        loss = loss.double().reshape(1).to(device) if loss is not None else table.new_full((1,), math.nan)
        # the one host copy of a healthy step: each slot's sums, then its update ratio and the loss (_RATIO, _LOSS)
        host = torch.cat([table, column.reshape(-1, 1), loss.expand(len(slots), 1)], dim=1).tolist()
        scale = recorder.gradient_scale
        rows = [[*rows_from_sums(values[:SUMS_WIDTH], scale), values[_RATIO]] for values in host]
        if needs_repair(slots, rows):  # NaN/Inf met: recompute those layers' statistics, masked
            _, repaired = recorder.finalize(device, repair=True)
            # the weights have moved since before_update: keep its weight statistics, take the repaired rest
            rows = [
                [*rows_from_sums(fixed, scale)[REPAIRED], *row[REPAIRED.stop :]]
                for fixed, row in zip(repaired.tolist(), rows, strict=True)
            ]
        return host[0][_LOSS], rows


class _CompiledTaps(_Taps):
    """``steadygrad.fast``'s taps (C++ or numba): each tensor summed as it arrives, NaN and Inf already excluded
    and counted there; the update ratios from one more compiled pass over the weights and their copies."""

    deferred = True

    def before_update(self, recorder: Recorder, snapshot: bool) -> _PendingStep:
        slots, table = deferred_table(recorder, snapshot)  # copies the weights too when snapshot
        return _PendingStep(slots, table, self, snapshot=snapshot)

    def rows(self, recorder: Recorder, pending: _PendingStep, loss: torch.Tensor | None):
        scale = recorder.gradient_scale
        rows = [rows_from_sums(sums, scale) for sums in pending.table.tolist()]
        ratios = [math.nan] * len(recorder.selected)
        if pending.snapshot:
            for i, (change, size) in enumerate(recorder.collector().update_norms().tolist()):
                if size > 0:  # NaN (no copy) fails this too
                    ratios[i] = math.sqrt(change) / math.sqrt(size)
        for row, ratio in zip(rows, _per_slot(recorder, pending.slots, ratios), strict=True):
            row.append(ratio)
        return (loss.item() if loss is not None else math.nan), rows


_EAGER, _LOCAL_EAGER, _COMPILED = _EagerTaps(), _EagerTaps(global_batch=False), _CompiledTaps()


_RATIO, _LOSS = SUMS_WIDTH, SUMS_WIDTH + 1  # the columns the eager step's host copy appends to a slot's sums


# The update ratio costs a copy of every watched weight before the step and one more pass over both after it (about
# 7% of a step of the benchmark MLP, more than all the other statistics together). It moves slowly, and the rules
# read its median over a run, so by default it is measured on logged steps at least this many optimizer steps apart.
UPDATE_RATIO_SPACING = 10


def resolve_update_every(update_every: int | None, every: int | Schedule) -> int:
    """How many logged steps apart the update ratio is measured: as given, or by default ceil(10 / every), so that
    its cost is paid on at most one optimizer step in ten (1 for a callable schedule, whose spacing is unknown)."""
    if update_every is None:
        return 1 if callable(every) else max(1, math.ceil(UPDATE_RATIO_SPACING / every))
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ValueError(
            f"update_every must be a positive integer (the update ratio on every k-th logged step), or None for the "
            f"default; got {update_every!r}."
        )
    return update_every


def _schedule(every: int | Schedule) -> Schedule:
    if callable(every):
        return every
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive integer or a callable step -> bool; got {every!r}.")
    return lambda step: (step - 1) % every == 0  # steps 1, 1 + every, 1 + 2 every, ...


class Monitor:
    """Record how signal and gradient travel through ``model`` at every logged optimizer step.

    Each logged step gives a ``FlowReport`` of the same ``LayerRecord``s a ``probe`` makes, merged over
    all the forward and backward passes of that step (gradient accumulation counts optimizer steps, not
    backward calls), plus, on every ``update_every``-th logged step, each layer's update-to-weight ratio
    ||W_after - W_before|| / ||W_before||. On the other logged steps ``LayerRecord.update_measured`` is False and
    the report's notes say why its update ratios are NaN.

    ``optimizer.step(closure)`` (LBFGS, Lightning's automatic optimization) runs the step's last forward and
    backward inside ``step``: they belong to that step, and its statistics are taken when the closure returns,
    before the update. An optimizer that evaluates the closure again at moved weights (LBFGS's line search) adds
    nothing to the records. The closure's return value is the step's loss unless ``observe_loss`` was called.
    A forward pass of the model in eval mode under ``torch.no_grad()`` (validation between steps) is not recorded.
    After ``PASSES_WITHOUT_A_STEP`` recorded passes with no step closed, the Monitor warns once.
    Statistics accumulate on the device and reach the host once per logged step (twice when a layer met
    NaN/Inf and its statistics are recomputed with masking); on other steps the
    hooks return at once. NaN and Inf are counted per layer, never dropped silently, never a crash.

    Gradient checkpointing (torch's, either mode, or transformers' ``gradient_checkpointing_enable``) changes no
    record: its recompute is not a call (``Recorder``). A ``torch.compile(model)`` wrapper is measured under the
    original module's names and run eagerly on logged steps only (``steadygrad.measure.compiled``); the Monitor
    may be attached after its first compiled call. Give it the wrapper you train, not the module inside.

    Args:
        model: the module to watch.
        every: log every k-th optimizer step (steps 1, 1 + k, ...), or a callable ``step -> bool``.
        update_every: measure the update ratio on every k-th logged step (the first, the (1 + k)-th, ...). It is
            the one statistic that copies the weights, so by default (None) it is taken on logged steps at least
            ``UPDATE_RATIO_SPACING`` (10) optimizer steps apart: ceil(10 / every) logged steps (every 10th with
            ``every=1``, every logged step with ``every=10``), and on every logged step of a callable schedule.
            1 measures it on every logged step.
        layers: which modules to record, as for ``probe``.
        sinks: where reports go besides ``history``: ``JsonlSink``, ``TensorBoardSink`` or your own.
        optimizer: its steps delimit the monitor's steps (torch's step hooks); accelerate's and Lightning's
            wrappers are unwrapped to the torch optimizer inside (``unwrap_optimizer``). Without one, the Monitor
            follows the steps of the first ``torch.optim`` optimizer that updates the model's parameters (torch's
            global optimizer step hooks), or, once you call ``monitor.step()``, your calls instead.
        scaler: a ``torch.amp.GradScaler``: its scale is divided out, so the records show true gradients.
        global_batch: under data parallelism, merge every rank's statistics into those of the global batch
            (the default); False records this rank's share alone, as ``probe`` does.

    Example:
        >>> with Monitor(model, every=10, optimizer=opt) as monitor:
        ...     for x, y in batches:
        ...         opt.zero_grad(); loss = F.cross_entropy(model(x), y); loss.backward()
        ...         monitor.observe_loss(loss); opt.step()
        >>> monitor.history.to_dataframe()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        every: int | Schedule = 1,
        layers: LayerSelector = None,
        sinks: Sequence[Sink] = (),
        optimizer: torch.optim.Optimizer | None = None,
        scaler=None,
        *,
        global_batch: bool = True,
        update_every: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Monitor needs an nn.Module; got {type(model).__name__}.{_keras.backend_hint(model)}")
        self.model = model
        self.schedule = _schedule(every)
        self.update_every = resolve_update_every(update_every, every)
        # a torch.compile'd model runs eagerly on logged steps and is measured under its own module's names
        self._eager = compile_support.EagerStance(model) if compile_support.is_compiled(model) else None
        measured = compile_support.unwrap(model)
        self.layers = select_layers(measured, layers)  # a nested compile wrapper's _orig_mod step dropped
        if not self.layers:
            names = ", ".join(name for name, _ in select_layers(measured, "*"))  # what a pattern can match (Keras' too)
            raise ValueError(f"No layer of the model matches layers={layers!r}. Its modules: {names}.")
        # which module classes were left out, and why: a default selection that misses a layer must say so
        self.skipped = skipped_modules(measured, self.layers) if layers is None else {}
        self.history = HistorySink()
        self.sinks: list[Sink] = [self.history, *sinks]
        self.optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
        self.scaler = scaler
        self.global_batch = global_batch
        structure = describe(measured)
        self.label = structure.label if structure is not None else type(measured).__name__
        self.step_count = 0  # optimizer steps seen so far
        self.logged_count = 0  # logged steps reported so far (the update ratio's schedule counts them)
        self.loss_name = ""  # which loss the steps take, in words, as observe_loss was last told
        self._recorder = Recorder(self.layers)
        # entropy and largest logit of each attention layer, on the passes the recorder records
        self._attention = AttentionTap(measured, armed=lambda: self._recorder.active and not self._recorder.paused)
        self._handles: list = []
        self._pass_hook = None  # the model's forward pre-hook, only while a logged step runs
        self._pending: _PendingStep | None = None  # between the step hooks
        self._taps: _Taps = _EAGER  # how the next logged step's statistics are taken, chosen in _arm
        self._loss: torch.Tensor | None = None
        self._attached = False
        # finding the steps: the optimizer the global hooks follow (weakly: a finished run's optimizer may go), which
        # optimizers hold the model's parameters (by id, each with a weak reference that tells a reused id), whether
        # the user closes steps by hand, the optimizer whose step() is running (a wrapper's step that calls an inner
        # optimizer's is one step), and whether that step's closure has run yet (None: it was given none)
        self._followed: weakref.ref | None = None
        self._holds: dict[int, tuple[weakref.ref, bool]] = {}
        self._model_parameters: set[int] | None = None
        self._manual = False
        self._stepping = None
        self._closure_ran: bool | None = None
        self._holding = False
        self._passes = 0  # forward passes recorded into the step being accumulated
        self._held: dict[int, tuple[weakref.ref, set[int]]] = {}  # per optimizer, the ids of its parameters
        self._closed_since_update = False  # a GradScaler's update() came after a closed step, or a skipped one
        self._scaler_update = None
        self._warned: set[str] = set()

    # -- lifecycle -------------------------------------------------------------------------------------
    def attach(self) -> Monitor:
        if self._attached:
            return self
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._on_step_begin))
            self._handles.append(self.optimizer.register_step_post_hook(self._on_step_end))
        else:
            from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

            self._handles.append(register_optimizer_step_pre_hook(self._on_step_begin))
            self._handles.append(register_optimizer_step_post_hook(self._on_step_end))
        if self.scaler is not None and hasattr(self.scaler, "update"):
            self._wrap_scaler_update()
        self._attention.attach()
        self._attached = True
        self._arm(self.schedule(self.step_count + 1))
        return self

    def _wrap_scaler_update(self) -> None:
        """A GradScaler skips ``optimizer.step()`` when the scaled gradients overflowed (by design, not a fault), so
        no step hook fires: its ``update()`` is then where that step ends. It is closed as a skipped step (counted,
        as the training frameworks count it, and its records dropped), so the overflow's passes and Inf gradients
        are not merged into the next step's records."""
        scaler, original = self.scaler, self.scaler.update
        self._closed_since_update = False

        def update(*args, **kwargs):
            if self._attached and not self._closed_since_update:
                self._skip_step()
            self._closed_since_update = False
            return original(*args, **kwargs)

        object.__setattr__(scaler, "update", update)
        self._scaler_update = original

    def _skip_step(self) -> None:
        """End the step being accumulated without a report: its update did not happen."""
        self.step_count += 1
        self._pending = None
        self._loss = None
        self._passes = 0
        self._stepping, self._closure_ran = None, None
        self._recorder.reset()
        self._attention.reset()
        self._arm(self.schedule(self.step_count + 1))

    def detach(self) -> None:
        """Remove every hook this monitor added and close its sinks."""
        self._arm(False)
        self._recorder.detach()
        self._attention.detach()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if getattr(self, "_scaler_update", None) is not None:
            del self.scaler.update  # the instance attribute: the class's method shows again
            self._scaler_update = None
        for sink in self.sinks:
            sink.close()
        self._attached = False

    def __enter__(self) -> Monitor:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _arm(self, logged: bool) -> None:
        """Hooks on the layers only for a step that will be logged: the others run the bare model."""
        from steadygrad import fast
        from steadygrad.distributed import is_distributed

        if logged and self._attached:
            # deferred: the compiled taps sum each tensor as it arrives (float32 CPU models; the eager statistics
            # stay exact in float64 and run on the device elsewhere), chosen anew for each logged step
            merge = self.global_batch and is_distributed()
            compiled = fast.enabled() and not merge and not self._recorder.sharded and self._float32_cpu()
            self._taps = _COMPILED if compiled else (_EAGER if merge or not is_distributed() else _LOCAL_EAGER)
            self._recorder.arm(deferred=self._taps.deferred)
            if self._pass_hook is None:
                self._pass_hook = self.model.register_forward_pre_hook(self._on_forward)
            if self._eager is not None:
                self._eager.attach()
        else:
            if logged:  # not attached yet: the step counts as logged once attach arms it
                self._recorder.arm(deferred=False)
                self._recorder.park()
            else:
                self._recorder.disarm()
            if self._pass_hook is not None:
                self._pass_hook.remove()
                self._pass_hook = None
            if self._eager is not None:
                self._eager.park()

    # -- the training loop's side ---------------------------------------------------------------------
    @property
    def logging(self) -> bool:
        """Whether the optimizer step now being accumulated will be logged."""
        return self._recorder.active

    def observe_loss(self, loss: torch.Tensor, name: str | None = None) -> None:
        """Attach this step's loss to its report (kept on the device until the step is logged), and, when
        given, the loss's name in words (``steadygrad.losses.resolve_loss_named``) to this and later reports."""
        if name is not None:
            self.loss_name = name
        if self._recorder.active:
            self._loss = loss.detach()

    def watched_weights(self) -> list[tuple[str, torch.Tensor | None]]:
        """Each watched layer's name and the weight whose variance and update ratio its records report (None where
        it has none)."""
        return [(name, w) for (name, _), w in zip(self.layers, self._recorder.first_weights(), strict=True)]

    def _release_gradients(self, parameters: list[torch.Tensor]) -> None:
        """The probe's one pass: sum each parameter's gradient as it is accumulated and let it go
        (``Recorder.release_gradients``), and keep no layer's output or output gradient to the pass's end (on an
        accelerator the eager taps then take their exact masked statistics at once: a one-off pass can pay that
        arithmetic, where a training step keeps the tensors and checks them with one host read). Never for
        training: the optimizer would find no gradients."""
        self._recorder.release_gradients(parameters)
        self._recorder.keep_nothing = True

    @contextlib.contextmanager
    def paused(self):
        """Passes run inside this block are not recorded (an extra forward and backward that is no part of
        training: the step being accumulated keeps what it has)."""
        held, paused = self._holding, self._recorder.paused
        self._holding = True
        self._recorder.pause()
        try:
            yield self
        finally:
            self._holding = held
            self._recorder.pause(paused)

    def restart_step(self) -> None:
        """Forget what the step being accumulated recorded so far (a forward pass that failed half way and is run
        again), keeping the step's schedule."""
        self._recorder.reset()
        self._attention.reset()
        self._loss = None

    def step(self) -> FlowReport | None:
        """Close the current step by hand; returns its report if logged. Call it after the backward pass(es) and
        before the update: the update ratio is NaN, since no update happens in between. Without ``optimizer=``, the
        first call makes your calls the steps: the optimizers' steps are no longer followed."""
        if self.optimizer is None and not self._manual:
            self._manual = True
            if self._following() is not None:
                self._warn_once(
                    "manual",
                    "monitor.step() was called while the Monitor was following the steps of "
                    f"{type(self._following()).__name__}: from now on your calls close the steps, and the "
                    "optimizer's do not. Call monitor.step() only when the weights are updated without a torch "
                    "optimizer.",
                )
        self._before_step(snapshot=False)
        return self._after_step()

    # -- hooks ------------------------------------------------------------------------------------------
    def _on_forward(self, module, args) -> None:
        if in_backward() or self._holding:  # a checkpointed model's recompute is no new pass
            return
        evaluating = not torch.is_grad_enabled() and not module.training  # validation between steps
        self._recorder.pause(evaluating)
        if evaluating:
            return
        self._recorder.new_pass()
        self._passes += 1
        if self._passes == PASSES_WITHOUT_A_STEP:
            self._warn_once(
                "no step",
                f"Monitor: {self._passes} forward passes of {self.label} went into one step and no step has "
                "closed, so no report has come out. The Monitor closes a step when a torch.optim optimizer "
                "that updates the model's parameters steps (or the optimizer= you give it): if you update the "
                "weights yourself, or through an optimizer that holds copies of them, call monitor.step() after "
                "each backward pass and before the update.",
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _following(self):
        """The optimizer whose steps the global hooks follow, if it is still alive."""
        return self._followed() if self._followed is not None else None

    def _updates_model(self, optimizer) -> bool:
        """Whether ``optimizer`` holds any of the model's parameters (computed once per optimizer)."""
        known = self._holds.get(id(optimizer))
        if known is not None and known[0]() is optimizer:
            return known[1]
        if self._model_parameters is None:
            self._model_parameters = {id(p) for p in compile_support.unwrap(self.model).parameters()}
        holds = any(id(p) in self._model_parameters for group in optimizer.param_groups for p in group["params"])
        self._holds[id(optimizer)] = (weakref.ref(optimizer), holds)
        return holds

    def _follows(self, optimizer) -> bool:
        """Whether ``optimizer``'s step is a step of this monitor. The given optimizer's always is (its own hooks);
        otherwise the first optimizer seen updating the model is followed, until it is gone (a new run's optimizer
        then takes its place). A second one updating the model at the same time is ignored, with a warning."""
        if self.optimizer is not None:
            return optimizer is self.optimizer
        if self._manual:
            return False
        followed = self._following()
        if followed is optimizer:
            return True
        if not self._updates_model(optimizer):
            return False
        if followed is None:
            self._followed = weakref.ref(optimizer)
            return True
        self._warn_once(
            "second optimizer",
            f"Two optimizers update {self.label}'s parameters ({type(followed).__name__} and "
            f"{type(optimizer).__name__}): the Monitor closes its steps on the first one's steps only. Give the one "
            "you mean as Monitor(model, optimizer=...).",
        )
        return False

    def _on_step_begin(self, optimizer, args, kwargs):
        """torch's pre-step hook: the step's statistics, or, when ``step`` was given a closure, a closure that takes
        them once the step's own forward and backward have run (returned to torch as the step's new arguments)."""
        if self._stepping not in (None, optimizer) or not self._follows(optimizer):
            return None  # a wrapper's step calling its inner optimizer's is the same step (the same one again: the
            # last step raised before its end)
        self._stepping = optimizer
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        if closure is None:
            self._closure_ran = None
            self._before_step()
            return None
        self._closure_ran = False
        measured = self._measuring(closure)
        if len(args) > 1:
            return (args[0], measured, *args[2:]), kwargs
        return args, {**kwargs, "closure": measured}

    def _measuring(self, closure):
        def closure_of_the_step():
            if self._closure_ran:  # evaluated again at moved weights (a line search): not this step's measurement
                with self.paused():
                    return closure()
            self._closure_ran = True
            loss = closure()
            if self._loss is None and isinstance(loss, torch.Tensor):
                self.observe_loss(loss)
            self._before_step()
            return loss

        return closure_of_the_step

    def _on_step_end(self, optimizer, args, kwargs) -> None:
        if self._stepping is not optimizer:
            return
        self._stepping = None
        if self._closure_ran is False:  # given a closure it never called: what was recorded before the step counts
            self._before_step(snapshot=False)
        self._closure_ran = None
        self._after_step(optimizer)

    def _before_step(self, snapshot: bool = True) -> None:
        if not self._recorder.active or self._recorder.empty:
            self._pending = None
            return
        if self.scaler is not None and self.scaler.is_enabled():
            # the output gradients were taken of the scaled loss; the weight gradients are unscaled by
            # now (GradScaler.step unscales before optimizer.step), so only the former are divided
            self._recorder.set_gradient_scale(self.scaler.get_scale())
        measure_update = snapshot and self.logged_count % self.update_every == 0
        self._pending = self._taps.before_update(self._recorder, measure_update)

    def _after_step(self, optimizer=None) -> FlowReport | None:
        self.step_count += 1
        self._closed_since_update = True
        report = None
        if self._pending is not None:
            pending = self._pending
            loss, rows = pending.taps.rows(self._recorder, pending, self._loss)
            unused, functional = self._never_called()
            report = FlowReport(
                records=make_records(pending.slots, rows),
                loss=loss,
                step=self.step_count,
                label=self.label,
                unused=unused,
                skipped=dict(self.skipped),
                loss_name=self.loss_name,
            )
            if functional:
                report.notes.append(
                    "used through its weights, not its forward (so it has no record): " + ", ".join(functional)
                )
            self.logged_count += 1
            self._update_measured(pending.snapshot, report)
            if optimizer is not None:
                self._not_updated_by(optimizer, report)
            self._attention_records(report)
            for sink in self.sinks:
                sink.write(report, self.layers)
        self._pending = None
        self._loss = None
        self._passes = 0
        self._recorder.reset()  # and its gradient scale, and a pause
        self._attention.reset()
        self._arm(self.schedule(self.step_count + 1))
        return report

    def _attention_records(self, report: FlowReport) -> None:
        """Each measured attention layer's statistics on the record that stands for it: its own, else the last
        recorded one inside it (its output projection), else the nearest recorded module around it (a built
        transformer's block); attention layers whose probabilities were fused away are named in a note."""
        names = [r.name for r in report.records]
        for layer, stats in self._attention.stats().items():
            inner = [n for n in names if n.startswith(layer + ".")]
            outer = [n for n in names if layer.startswith(n + ".")]
            if layer in names:
                target = layer
            elif inner:
                target = inner[-1]
            else:
                target = max(outer, key=len, default=None)
            for record in report.records:
                if record.name == target and math.isnan(record.attn_entropy):
                    record.attn_entropy, record.attn_entropy_min = stats.entropy, stats.entropy_min
                    record.attn_max_logit, record.attn_entropy_fraction = stats.max_logit, stats.fraction
                    break
        if self._attention.unmeasured:
            report.notes.append(
                "attention probabilities not measured, these layers do not return them (fused attention such as "
                "SDPA never computes them; HF models return them with attn_implementation='eager', some only with "
                "output_attentions=True): " + ", ".join(sorted(self._attention.unmeasured))
            )

    def _update_measured(self, measured: bool, report: FlowReport) -> None:
        """Mark whether this step measured the update ratio, and say so where ``update_every`` sampled it out (a step
        closed by ``monitor.step()`` has no update to measure: its docstring says so, and the probe is one)."""
        for record in report.records:
            record.update_measured = measured
        if not measured and (self.logged_count - 1) % self.update_every:
            report.notes.append(
                f"update ratio not measured on this step: Monitor(update_every={self.update_every}) measures it once "
                f"every {self.update_every} logged steps"
            )

    def _not_updated_by(self, optimizer, report: FlowReport) -> None:
        """A layer whose weight the step's optimizer does not hold (frozen, or another optimizer's) was not updated
        by this step: its update ratio is NaN, not a measured 0 that would read as "barely changes"."""
        held = self._held.get(id(optimizer))
        if held is None or held[0]() is not optimizer:
            ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
            held = (weakref.ref(optimizer), ids)
            self._held[id(optimizer)] = held
        outside = {name for name, w in self.watched_weights() if w is not None and id(w) not in held[1]}
        if outside:
            for record in report.records:
                if record.name in outside:
                    record.update_ratio = math.nan
            report.notes.append(
                f"not updated by {type(optimizer).__name__} (frozen, or another optimizer's), so no update ratio: "
                + ", ".join(sorted(outside))
            )

    def _never_called(self) -> tuple[list[str], list[str]]:
        """The selected layers whose forward never ran this step: (unused, used functionally). A layer whose
        parameters got a gradient was used through them (``nn.MultiheadAttention`` calls ``F.linear`` with its
        ``out_proj``'s weight; a tied embedding serves as a head): that is not dead code, and is said apart."""
        never = [(n, m) for n, m in self.layers if n not in self._recorder.called]
        # its own parameters, as the recorder reads them (Keras' too); a gradient kept from an earlier step as
        # zeros (zero_grad(set_to_none=False)) is no use this step
        functional = {
            n for n, m in never if any(self._recorder.had_gradient(p) for _, p in self._recorder.parameters[id(m)])
        }
        return [n for n, _ in never if n not in functional], [n for n, _ in never if n in functional]

    def _float32_cpu(self) -> bool:
        """Whether the watched layers' parameters are float32 on the CPU (what the compiled taps are for).

        It runs before every logged step, so it stays cheap: it reads the recorder's parameter list (made once;
        ``model.parameters()`` walks the module tree, 75 µs for a 20-layer MLP), and only the first and the
        last are checked, since ``model.to()`` and ``model.double()`` move them all. A model mixed on purpose
        is still right: the taps convert what is not float32 on the CPU."""
        watched = self._recorder.watched_parameters
        return all(p.dtype == torch.float32 and p.device.type == "cpu" for p in watched[:1] + watched[-1:])
