"""The rules on real models: quiet on healthy ones as their authors initialize them, the right finding on broken
ones. The models are in ``tests/zoo.py``."""

import importlib

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


@pytest.mark.parametrize("case", zoo.HEALTHY, ids=lambda c: c.name)
def test_healthy_models_stay_quiet_over_a_few_adam_steps(case):
    """The rules that need a Monitor's history (update ratios, growth over steps) on the optimizer and learning
    rate these models train with; a zero-initialized layer's first updates are all it has, not a high rate."""
    if case.needs:
        pytest.importorskip(case.needs)
    model, inputs = case.build()
    torch.manual_seed(zoo.SEED)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with Monitor(model, optimizer=optimizer) as monitor:
        for _ in range(4):
            optimizer.zero_grad()
            loss = projection_loss(call(model, inputs))
            loss.backward()
            monitor.observe_loss(loss)
            optimizer.step()
    findings = dg.diagnose(monitor.history.reports, model=model, inputs=inputs)
    assert [str(f) for f in findings if f.severity in SERIOUS] == []


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
