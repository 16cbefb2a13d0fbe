"""``probe``: one forward and backward pass on a batch, recording how signal and gradient travel.

The model is left exactly as found: parameters, their ``.grad``, buffers (BatchNorm's running
statistics), train/eval mode, hooks and the global random state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from steadygrad import _keras, theory
from steadygrad.losses import resolve_loss, tensors
from steadygrad.measure.layers import LayerSelector, default_layer_types, select_layers
from steadygrad.measure.monitor import Monitor
from steadygrad.measure.records import FlowReport
from steadygrad.structure import describe

__all__ = ["LayerSelector", "default_layer_types", "probe", "select_layers"]


def _prepare_inputs(inputs):
    """Detached copies that require grad (floating tensors only), in the same structure."""
    if isinstance(inputs, torch.Tensor):
        copy = inputs.detach().clone()
        return copy.requires_grad_(True) if copy.is_floating_point() else copy
    if isinstance(inputs, Mapping):
        return {k: _prepare_inputs(v) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_prepare_inputs(v) for v in inputs)
    return inputs


def _call(model: nn.Module, inputs):
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def probe(
    model: nn.Module,
    inputs,
    targets: torch.Tensor | None = None,
    loss: Callable | None = None,
    layers: LayerSelector = None,
    *,
    seed: int = 0,
    theory_prediction: bool = True,
) -> FlowReport:
    """One forward and backward pass on ``inputs``; per layer, how the signal and the gradient fared.

    Args:
        model: any ``nn.Module``; it is left exactly as found.
        inputs: a tensor, a tuple of tensors (``model(*inputs)``) or a dict (``model(**inputs)``).
        targets: integer class labels (cross-entropy) or float targets (mean squared error).
        loss: ``loss(output, targets)`` (or ``loss(output)`` without targets), replacing the default.
            Without targets or loss, the loss is a fixed random projection of the output, so that the
            gradient entering the last layer has the same scale for every model.
        layers: which modules to record (``select_layers``).
        seed: seeds the random projection; the global random state is left untouched either way.
        theory_prediction: for a built MLP with no norm and no skips, attach the mean-field prediction.

    Returns:
        A ``FlowReport`` with one ``LayerRecord`` per call of a selected module, in execution order.

    Example:
        >>> net = build(NetSpec(depth=20, width=64, activation="tanh", init="glorot_uniform"))
        >>> report = probe(net, torch.randn(128, 64))
        >>> print(report.summary())  # doctest: +SKIP
        Gradient shrinks about 0.95x per layer over 21 layers; ...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"probe needs an nn.Module; got {type(model).__name__}.{_keras.backend_hint(model)}")

    parameters = list(model.parameters())
    saved_grads = [p.grad for p in parameters]
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]
    # One Monitor step with no optimizer: the same recorder, records, labels and arithmetic (eager, or the
    # compiled taps under steadygrad.fast.enable()) as a training run's logged steps. The update ratio is NaN:
    # nothing is updated. Under data parallelism the probe measures this rank's batch, not the global one.
    monitor = Monitor(model, every=1, layers=layers, global_batch=False)  # selects, or says what did not match
    devices = sorted({p.device.index for p in parameters if p.device.type == "cuda" and p.device.index is not None})
    try:
        for p in parameters:
            p.grad = None
        monitor.attach()
        with torch.random.fork_rng(devices=devices):
            prepared = _prepare_inputs(inputs)
            output = _call(model, prepared)
            loss_value = resolve_loss(output, targets, loss, seed=seed)
            if not loss_value.requires_grad:
                raise ValueError("The loss does not depend on any parameter or input that requires grad.")
            loss_value.backward()
        monitor.observe_loss(loss_value)
        report = monitor.step()
        if report is None:  # no selected layer ran: an empty report that says which were never called
            report = FlowReport(
                records=[], loss=float(loss_value.detach()), label=monitor.label, skipped=dict(monitor.skipped)
            )
            report.unused = [name for name, _ in monitor.layers]
        report.step = None  # a probe is not an optimizer step
        input_grads = [t.grad for t in tensors(prepared) if t.is_floating_point() and t.grad is not None]
        report.input_grad_norm = (
            float(torch.cat([g.detach().double().flatten() for g in input_grads]).norm()) if input_grads else math.nan
        )
        if theory_prediction and layers is None:
            _attach_theory(model, report, inputs)
        return report
    finally:
        monitor.detach()
        for p, grad in zip(parameters, saved_grads, strict=True):
            p.grad = grad
        with torch.no_grad():
            for buffer, saved in saved_buffers:
                buffer.copy_(saved)


def _attach_theory(model: nn.Module, report: FlowReport, inputs) -> None:
    """Mean-field predictions beside the measurements of a built MLP without norm or skips."""
    structure = describe(model)
    plain = structure is not None and structure.chain and not structure.normalized and structure.skip == "none"
    activation = getattr(structure.spec, "activation", None) if plain else None
    if activation is None or not isinstance(inputs, torch.Tensor) or not isinstance(structure.head, nn.Linear):
        return
    linears = [layer for layer, _ in structure.chain] + [structure.head]
    sigma_w2 = [float(m.weight.detach().double().var()) * m.in_features for m in linears]
    sigma_b2 = [
        float(m.bias.detach().double().var()) if m.bias is not None and m.bias.numel() > 1 else 0.0 for m in linears
    ]
    q_input = float(inputs.detach().double().square().mean())
    second_moments, relative = theory.mlp_prediction(sigma_w2, sigma_b2, activation, q_input)
    names = {name for name, module in structure.blocks if module is not structure.head}
    blocks = [r for r in report.records if r.name in names]
    if len(blocks) != len(structure.chain):
        return  # a block called more or fewer times than once: the prediction does not apply
    last = blocks[-1].grad_norm
    for record, moment, rel in zip(blocks, second_moments, relative, strict=True):
        record.predicted_second_moment = float(moment)
        record.predicted_grad_norm = float(last * rel) if math.isfinite(last) else math.nan
    report.theory = (
        "mean-field prediction (Poole et al. 2016; Schoenholz et al. 2017) from the measured weight scales "
        "sigma_w^2 = Var[W] * fan_in and the input's second moment, anchored at the last block's gradient."
    )
