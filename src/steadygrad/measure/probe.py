"""``probe``: one forward and backward pass on a batch, recording how signal and gradient travel.

The model is left exactly as found: parameters, their ``.grad``, buffers (BatchNorm's running
statistics), every module's train/eval flag, dropout rates, hooks and the global random state.

It measures in a declared mode (``MODES``): ``"train"`` (the default) is training mode with every dropout
module off, so that two probes of one model agree and the gradients are those of the deterministic network;
``"eval"`` is ``model.eval()``; None measures the model in whatever mode each module is. The random state is
seeded from ``seed`` inside a forked RNG either way, so functional dropout (``F.dropout(x, training=True)``)
draws the same mask every time.

Inputs may be a tensor (``model(x)``), a tuple or list (``model(*inputs)``) or any mapping, Hugging Face's
``BatchEncoding`` included (``model(**inputs)``). Integer tensors (token ids, masks) get no gradient, and
the report says so in its notes when no input is floating-point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from steadygrad import _keras, theory
from steadygrad.losses import first_tensor, resolve_loss_named, tensors
from steadygrad.measure.layers import LayerSelector, default_layer_types, select_layers
from steadygrad.measure.monitor import Monitor
from steadygrad.measure.records import FlowReport
from steadygrad.structure import describe

__all__ = ["MODES", "LayerSelector", "call_model", "default_layer_types", "probe", "select_layers"]

MODES = ("train", "eval", None)
INTEGER_INPUTS_NOTE = "inputs are integer (token ids): no input gradient, no input statistics"


NO_INPUT_GRADIENT_NOTE = (
    "the model sets requires_grad on a tensor computed from its input itself, so the probe measured without "
    "the input gradient"
)


def _prepare_inputs(inputs, requires_grad: bool = True):
    """Detached copies, in the same structure; floating tensors require grad (for the input gradient) unless
    ``requires_grad`` is False."""
    if isinstance(inputs, torch.Tensor):
        copy = inputs.detach().clone()
        return copy.requires_grad_(requires_grad) if copy.is_floating_point() else copy
    if isinstance(inputs, Mapping):
        return {k: _prepare_inputs(v, requires_grad) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        items = [_prepare_inputs(v, requires_grad) for v in inputs]
        return type(inputs)(*items) if hasattr(inputs, "_fields") else type(inputs)(items)  # a namedtuple
    return inputs


def call_model(model: nn.Module, inputs, **kwargs):
    """Mappings as keywords, tuples and lists as positional arguments, anything else as the one argument."""
    if isinstance(inputs, Mapping):
        return model(**inputs, **kwargs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs, **kwargs)
    return model(inputs, **kwargs)


# The class names of stochastic regularizers in other libraries: dropout (HF's ``StableDropout``), and the ones
# that drop whole residual branches: stochastic depth (timm's ``DropPath``, torchvision's ``StochasticDepth``) and
# ``DropBlock``. Each reads its module's ``training`` flag, so eval mode switches it off.
_STOCHASTIC = ("dropout", "droppath", "stochasticdepth", "dropblock")


def _is_dropout(module: nn.Module) -> bool:
    """torch's dropouts, and any other library's stochastic regularizer by its class name (``_STOCHASTIC``)."""
    name = type(module).__name__.lower()
    return isinstance(module, nn.modules.dropout._DropoutNd) or any(part in name for part in _STOCHASTIC)


def _enter_mode(model: nn.Module, mode: str | None) -> tuple[Callable[[], None], int]:
    """Put ``model`` in ``mode``; returns the function that restores every module as found, and how many
    dropout modules were switched off.

    In ``"train"`` a dropout module is put in eval mode and its rate ``p`` set to 0 as well: Hugging Face's
    attention passes ``self.dropout.p`` to ``scaled_dot_product_attention`` whenever the attention module
    itself is training, whatever the dropout module's own flag says.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}.")
    if _keras.is_keras_layer(model):  # torch's flags do not reach Keras layers: they take training= (call_model)
        return _keras.enter_mode(model, mode)
    flags = [(m, m.training) for m in model.modules()]  # per module: a root's flag says nothing of its children
    rates: list[tuple[nn.Module, float]] = []
    if mode == "eval":
        model.eval()
    elif mode == "train":
        model.train()
        for m in model.modules():
            if _is_dropout(m):
                m.eval()
                if isinstance(getattr(m, "p", None), float):
                    rates.append((m, m.p))
                    m.p = 0.0

    def restore() -> None:
        for m, training in flags:
            m.training = training  # not m.train(): that would overwrite the children's flags again
        for m, p in rates:
            m.p = p

    return restore, sum(1 for m, _ in flags if _is_dropout(m)) if mode == "train" else 0


def probe(
    model: nn.Module,
    inputs,
    targets: torch.Tensor | None = None,
    loss: Callable | None = None,
    layers: LayerSelector = None,
    *,
    task: str | None = None,
    mode: str | None = "train",
    seed: int = 0,
    theory_prediction: bool = True,
) -> FlowReport:
    """One forward and backward pass on ``inputs``; per layer, how the signal and the gradient fared.

    Args:
        model: any ``nn.Module``; it is left exactly as found.
        inputs: a tensor, a tuple or list of them (``model(*inputs)``) or a mapping (``model(**inputs)``).
        targets: integer class labels (cross-entropy) or float targets (mean squared error).
        loss: ``loss(output, targets)`` (or ``loss(output)`` without targets), replacing the default.
            Without it, the model's own ``output.loss`` when it computed one (Hugging Face, given
            ``labels``), else the targets' loss, else a fixed random projection of the output, so that the
            gradient entering the last layer has the same scale for every model (``steadygrad.losses``).
            ``report.loss_name`` says which was taken.
        layers: which modules to record (``select_layers``).
        task: ``"classification"`` or ``"regression"`` for the targets, or None to infer it from their dtype.
        mode: ``"train"`` (training mode, dropout off), ``"eval"``, or None (each module as it is).
        seed: seeds the random projection and the random state of the pass; the global random state is left
            untouched either way.
        theory_prediction: for a built MLP with no norm and no skips, attach the mean-field prediction.

    Returns:
        A ``FlowReport`` with one ``LayerRecord`` per call of a selected module, in execution order.

    Example:
        >>> net = build(NetSpec(depth=20, width=64, activation="tanh", init="glorot_uniform"))
        >>> report = probe(net, torch.randn(128, 64))
        >>> print(report.summary())  # doctest: +SKIP
        Gradient shrinks about 0.95x per layer over 21 layers; ...
    """
    empty = [tuple(t.shape) for t in tensors(inputs) if t.dim() >= 1 and t.shape[0] == 0]
    if empty:
        raise ValueError(
            f"The batch is empty (inputs of shape {empty[0]}): the probe needs at least one sample to measure."
        )
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
    notes: list[str] = []
    restore_mode, dropouts = _enter_mode(model, mode)  # the last change before the try that undoes them all
    try:
        for p in parameters:
            p.grad = None
        monitor.attach()
        # each weight gradient summed and let go as it comes: a deep model's never all live at once (the user's are
        # put back below)
        monitor._release_gradients(parameters)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)  # functional dropout and any other draw: the same in every probe
            prepared = _prepare_inputs(inputs)
            try:
                output = call_model(model, prepared, **_keras.call_kwargs(model, mode))
            except RuntimeError as error:
                if "requires_grad flags of leaf" not in str(error):
                    raise
                # the model sets requires_grad on a tensor it computed from its input (wav2vec2 does, so that its
                # gradient checkpointing has a grad-requiring input): that only works when the input is a leaf
                # that needs no grad, so the probe measures again without the input gradient
                monitor.restart_step()
                torch.manual_seed(seed)
                prepared = _prepare_inputs(inputs, requires_grad=False)
                output = call_model(model, prepared, **_keras.call_kwargs(model, mode))
                notes.append(NO_INPUT_GRADIENT_NOTE)
            loss_value, loss_name = resolve_loss_named(output, targets, loss, task, seed)
            if not loss_value.requires_grad:
                raise ValueError("The loss does not depend on any parameter or input that requires grad.")
            loss_value.backward()
        monitor.observe_loss(loss_value, loss_name)
        report = monitor.step()
        if report is None:  # no selected layer ran: an empty report that says which were never called
            report = FlowReport(
                records=[],
                loss=float(loss_value.detach()),
                label=monitor.label,
                unused=[name for name, _ in monitor.layers],
                skipped=dict(monitor.skipped),
                loss_name=loss_name,
            )
        report.step = None  # a probe is not an optimizer step (the Monitor's report has the loss's name already)
        report.notes += notes + _notes(prepared, dropouts) + _probability_note(output, loss_name)
        report.chance_loss = _chance_loss(output, loss_name)
        input_grads = [t.grad for t in tensors(prepared) if t.is_floating_point() and t.grad is not None]
        report.input_grad_norm = (
            float(torch.cat([g.detach().double().flatten() for g in input_grads]).norm()) if input_grads else math.nan
        )
        if theory_prediction and layers is None:
            _attach_theory(model, report, inputs)
        return report
    finally:
        monitor.detach()
        restore_mode()
        for p, grad in zip(parameters, saved_grads, strict=True):
            p.grad = grad
        with torch.no_grad():
            for buffer, saved in saved_buffers:
                buffer.copy_(saved)


def _notes(prepared, dropouts: int) -> list[str]:
    """What the reader of the records must know about how this pass was taken."""
    notes = []
    inputs = tensors(prepared)
    if inputs and not any(t.is_floating_point() for t in inputs):
        notes.append(INTEGER_INPUTS_NOTE)
    if dropouts:
        notes.append(f"measured in train mode with {dropouts} dropout module{'s' * (dropouts > 1)} switched off")
    return notes


PROBABILITIES_NOTE = (
    "the output looks like probabilities (non-negative, each row sums to 1), and cross-entropy applies a softmax "
    "again: end the model at its logits, or pass loss="
)


def _probability_note(output, loss_name: str) -> list[str]:
    """A model that ends in ``nn.Softmax`` fed to cross-entropy (which wants logits) trains on a squashed
    signal: its gradient is the softmax's Jacobian times a second softmax's. Say so rather than measure it
    silently."""
    y = first_tensor(output)
    if y is None or not loss_name.startswith("cross-entropy") or y.dim() < 2 or not y.numel():
        return []
    y = y.detach()
    sums = y.sum(dim=-1) if "per position" in loss_name else y.sum(dim=1)
    probabilities = bool((y >= 0).all()) and torch.allclose(sums, torch.ones_like(sums), atol=1e-4)
    return [PROBABILITIES_NOTE] if probabilities else []


def _chance_loss(output, loss_name: str) -> float:
    """ln(C), the cross-entropy of uniform predictions over C classes (or a vocabulary of C tokens): what a model
    that knows nothing scores. NaN unless the loss is a cross-entropy of these logits (the task's, or the model's
    own loss beside ``logits``)."""
    y = first_tensor(output)
    if y is None or y.dim() < 2:
        return math.nan
    if loss_name.startswith("cross-entropy"):
        classes = y.shape[-1] if "per position" in loss_name else y.shape[1]
    elif loss_name.startswith("the model's own loss") and _has_logits(output):
        classes = y.shape[-1]  # HF's language-model and classification heads: logits (..., classes)
    else:
        return math.nan
    return math.log(classes) if classes > 1 else math.nan


def _has_logits(output) -> bool:
    return (isinstance(output, Mapping) and "logits" in output) or hasattr(output, "logits")


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
    if not all(math.isfinite(v) for v in (*sigma_w2, *sigma_b2, q_input)):
        report.notes.append("no mean-field prediction: a weight, a bias or the input holds NaN or Inf")
        return
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
