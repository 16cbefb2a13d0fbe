"""The rules on real models: quiet on healthy ones as their authors initialize them, the right finding on broken
ones. The models are in ``tests/zoo.py``."""

import importlib
import math

import pytest
import torch

from steadygrad.losses import projection_loss
from steadygrad.measure import Monitor, probe
from tests import zoo

dg = importlib.import_module("steadygrad.diagnose")  # the module: steadygrad.diagnose is the function

SERIOUS = ("warning", "critical")


def diagnosed(case: zoo.Case):
    if case.needs:
        pytest.importorskip(case.needs)
    model, inputs = case.build()
    torch.manual_seed(zoo.SEED)  # dropout draws from the global generator: the same masks on every run
    report = probe(model, inputs)
    return report, dg.diagnose(report, model=model, inputs=inputs)


@pytest.mark.parametrize("case", zoo.HEALTHY, ids=lambda c: c.name)
def test_healthy_models_get_nothing_serious(case):
    _, findings = diagnosed(case)
    assert [str(f) for f in findings if f.severity in SERIOUS] == []


@pytest.mark.parametrize("case", zoo.BROKEN, ids=lambda c: c.name)
def test_broken_models_get_their_finding(case):
    _, findings = diagnosed(case)
    found = {f.kind for f in findings}
    assert case.expect <= found, [str(f) for f in findings]
    assert not case.forbid & found, [str(f) for f in findings]


def call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def monitored(case: zoo.Case, lr: float, steps: int = 4):
    """The diagnosis of ``steps`` Adam steps under a Monitor (the rules that need a history: update ratios,
    growth over steps)."""
    if case.needs:
        pytest.importorskip(case.needs)
    model, inputs = case.build()
    torch.manual_seed(zoo.SEED)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    with Monitor(model, optimizer=optimizer, update_every=1) as monitor:  # every step's update ratio
        for _ in range(steps):
            optimizer.zero_grad()
            loss = projection_loss(call(model, inputs))
            loss.backward()
            monitor.observe_loss(loss)
            optimizer.step()
    return dg.diagnose(monitor.history.reports, model=model, inputs=inputs)


@pytest.mark.parametrize("case", zoo.HEALTHY, ids=lambda c: c.name)
def test_healthy_models_stay_quiet_over_a_few_adam_steps(case):
    """On the learning rate these models train with, a zero-initialized layer's first updates and a small head's
    growth out of its init are not a learning rate too high."""
    findings = monitored(case, lr=1e-3)
    assert [str(f) for f in findings if f.severity in SERIOUS] == []


def test_a_learning_rate_too_high_is_a_warning():
    findings = monitored(next(c for c in zoo.HEALTHY if c.name == "resnet18"), lr=0.3)
    assert [f.severity for f in by_kind(findings, "update_ratio_high")] == ["warning"]


def by_kind(findings, kind):
    return [f for f in findings if f.kind == kind]


def test_a_zero_initialized_head_is_expected_and_said_so():
    (_, findings) = diagnosed(next(c for c in zoo.HEALTHY if c.name == "mlp_zero_head"))
    (zero,) = by_kind(findings, "zero_gradients")
    assert zero.severity == "info" and zero.evidence == {"cause": "zero_init", "blocked_by": {"4 (Linear)": 4}}
    assert not by_kind(findings, "symmetric_units")  # each row of the head gets its own output's gradient


def test_zero_init_residual_blocks_name_their_last_norm():
    (_, findings) = diagnosed(next(c for c in zoo.HEALTHY if c.name == "resnet18"))
    (zero,) = by_kind(findings, "zero_gradients")
    assert zero.severity == "info" and zero.evidence["cause"] == "zero_init"
    assert set(zero.evidence["blocked_by"]) == {f"layer{s}.{b}.bn2" for s in (1, 2, 3, 4) for b in (0, 1)}
    assert "layer1.0.conv1" in zero.layers and "layer1.0.relu (call 2)" not in zero.layers


def test_a_dead_layer_blocks_the_gradient_and_says_which():
    (_, findings) = diagnosed(next(c for c in zoo.BROKEN if c.name == "dead_first_relu"))
    (zero,) = by_kind(findings, "zero_gradients")
    assert zero.severity == "warning" and zero.evidence == {"cause": "dead", "blocked_by": {"1 (ReLU)": 1}}


def test_a_zero_residual_gate_is_named_as_the_zero_init():
    (_, findings) = diagnosed(next(c for c in zoo.HEALTHY if c.name == "rezero"))
    (zero,) = by_kind(findings, "zero_gradients")
    assert zero.severity == "info" and zero.evidence["cause"] == "zero_init"
    assert "blocks" not in zero.message and "0.alpha" in zero.message  # the gate, not the head, blocks


def test_a_gate_stuck_at_one_is_named_as_the_cause_of_zero_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Hardsigmoid(), torch.nn.Linear(8, 2))
    with torch.no_grad():
        model[0].bias.fill_(10.0)  # hardsigmoid is flat at 1 above 3: its derivative is exactly zero
    x = torch.randn(16, 8)
    (zero,) = by_kind(dg.diagnose(probe(model, x), model=model, inputs=x), "zero_gradients")
    assert zero.evidence == {"cause": "saturated", "blocked_by": {"1 (Hardsigmoid)": 1}}
    assert zero.severity == "warning" and "saturated" in zero.message


@pytest.mark.parametrize("name", ["gpt2", "bert", "vit", "resnet18", "convnext", "mlp_zero_head"])
def test_healthy_models_trained_on_their_targets_start_near_chance(name):
    """loss_at_init_high on the models' own losses and cross-entropy: a fresh model scores about ln(classes)."""
    case = next(c for c in zoo.HEALTHY if c.name == name)
    if case.needs:
        pytest.importorskip(case.needs)
    model, inputs = case.build()
    if isinstance(inputs, dict):  # a Hugging Face model: its own loss from labels
        labels = inputs["input_ids"] if "input_ids" in inputs else torch.tensor([0, 1, 0, 1])
        report, targets = probe(model, {**inputs, "labels": labels}), None
    else:
        classes = model(inputs).shape[1]
        targets = torch.randint(0, classes, (inputs.shape[0],), generator=torch.Generator().manual_seed(3))
        report = probe(model, inputs, targets)
    assert math.isfinite(report.chance_loss)
    assert not by_kind(dg.diagnose(report, model=model), "loss_at_init_high")
