"""The Monitor finds its own steps: torch's global optimizer hooks, ``step(closure)``, wrapped optimizers, and
the warning when no step ever closes. Each form must give the records of the explicit form
``Monitor(model, optimizer=opt)`` with ``observe_loss``, which the rest of the suite checks against references."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from steadygrad.measure import Monitor
from steadygrad.measure import monitor as monitor_module

X = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(2))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def _loss(model):
    return F.cross_entropy(model(X), Y)


def _train(form: str, steps: int = 5, evaluate: bool = True) -> list:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with Monitor(model, every=2, **({"optimizer": opt} if form == "explicit" else {})) as monitor:
        for _ in range(steps):
            if form == "closure":

                def closure():
                    opt.zero_grad()
                    loss = _loss(model)
                    loss.backward()
                    return loss

                opt.step(closure)
            else:
                opt.zero_grad()
                loss = _loss(model)
                loss.backward()
                monitor.observe_loss(loss)
                opt.step()
            if evaluate:  # a validation pass between steps: not part of any step
                model.eval()
                with torch.no_grad():
                    model(X)
                model.train()
    return monitor.history.reports


def _same(got: list, expected: list) -> None:
    assert [r.step for r in got] == [r.step for r in expected]
    for a, b in zip(got, expected, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-6)
        assert [r.name for r in a.records] == [r.name for r in b.records]
        for ra, rb in zip(a.records, b.records, strict=True):
            for key, value in ra.to_dict().items():
                other = rb.to_dict()[key]
                if not isinstance(value, float):
                    assert value == other, (ra.name, key)
                elif math.isnan(value):
                    assert math.isnan(other), (ra.name, key)
                else:
                    assert value == pytest.approx(other, rel=1e-6, abs=1e-12), (ra.name, key)


def test_the_explicit_form_ignores_validation_passes_between_steps():
    with_validation = _train("explicit", evaluate=True)
    _same(with_validation, _train("explicit", evaluate=False))
    assert [r.step for r in with_validation] == [1, 3, 5]
    assert all(
        math.isfinite(rec.update_ratio) and rec.update_ratio > 0
        for rec in with_validation[0].records
        if rec.kind == "Linear"
    )


@pytest.mark.parametrize("form", ["found", "closure"])
def test_found_steps_and_closure_steps_give_the_explicit_records(form):
    _same(_train(form), _train("explicit"))


def test_lbfgs_measures_the_first_evaluation_and_the_whole_update():
    model = _model()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    first = model[0].weight.detach().clone()
    evaluations = []

    def closure():
        opt.zero_grad()
        loss = _loss(model)
        loss.backward()
        evaluations.append(loss.item())
        return loss

    with Monitor(model) as monitor:
        opt.step(closure)
    assert len(evaluations) > 1  # the line search evaluated again, at moved weights
    (report,) = monitor.history.reports
    assert report.step == 1
    assert report.loss == pytest.approx(evaluations[0])  # the closure's first value: the loss before the update
    record = report.records[0]
    expected = (model[0].weight.detach() - first).norm() / first.norm()
    assert record.update_ratio == pytest.approx(expected.item(), rel=1e-6)
    # the statistics are those of one forward and backward at the weights before the step
    reference = _model()
    reference.zero_grad()
    with Monitor(reference) as probe_like:
        _loss(reference).backward()
        probe_like.step()
    assert record.grad_norm == pytest.approx(probe_like.history.reports[0].records[0].grad_norm, rel=1e-6)
    assert record.act_std == pytest.approx(probe_like.history.reports[0].records[0].act_std, rel=1e-6)


def test_observe_loss_wins_over_the_closure_value():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, optimizer=opt) as monitor:

        def closure():
            opt.zero_grad()
            loss = _loss(model)
            loss.backward()
            monitor.observe_loss(loss * 3)
            return loss

        opt.step(closure)
    assert monitor.history.reports[0].loss == pytest.approx(3 * _loss(_model()).item(), rel=1e-6)


class _Wrapper:
    """accelerate's AcceleratedOptimizer in shape: no torch hooks of its own, the optimizer as .optimizer."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self, closure=None):
        return self.optimizer.step(closure)


def test_a_wrapped_optimizer_is_unwrapped():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = _Wrapper(opt)
    with Monitor(model, optimizer=wrapped) as monitor:
        for _ in range(2):
            opt.zero_grad()
            _loss(model).backward()
            wrapped.step()
    assert monitor.optimizer is opt
    assert [r.step for r in monitor.history.reports] == [1, 2]
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer, or a wrapper"):
        Monitor(model, optimizer=object())


def test_an_optimizer_of_another_model_closes_no_step():
    model, other = _model(), _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    unrelated = torch.optim.SGD(other.parameters(), lr=0.1)
    with Monitor(model) as monitor:
        opt.zero_grad()
        _loss(model).backward()
        _loss(other).backward()
        unrelated.step()
        assert monitor.step_count == 0
        opt.step()
    assert monitor.step_count == 1


def test_a_second_optimizer_of_the_same_model_is_ignored_with_a_warning():
    model = _model()
    first = torch.optim.SGD(model[:2].parameters(), lr=0.1)
    second = torch.optim.SGD(model[2:].parameters(), lr=0.1)
    with Monitor(model) as monitor, pytest.warns(RuntimeWarning, match="Two optimizers update"):
        for _ in range(2):
            _loss(model).backward()
            first.step()
            second.step()
    assert monitor.step_count == 2


def test_steps_closed_by_hand_stop_the_following_with_a_warning():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model) as monitor:
        _loss(model).backward()
        opt.step()
        with pytest.warns(RuntimeWarning, match="from now on your calls close the steps"):
            monitor.step()
        opt.step()  # no longer a step of the monitor's
    assert monitor.step_count == 2


def test_a_monitor_whose_step_never_closes_warns_once(monkeypatch):
    monkeypatch.setattr(monitor_module, "PASSES_WITHOUT_A_STEP", 5)
    model = _model()
    with warnings.catch_warnings(record=True) as caught, Monitor(model) as monitor:
        warnings.simplefilter("always")
        for _ in range(12):  # updated by hand: no torch optimizer to see
            _loss(model).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * p.grad
                    p.grad = None
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "5 forward passes" in messages[0] and "monitor.step()" in messages[0]
    assert monitor.history.reports == []


def test_no_warning_when_steps_close():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Monitor(model, every=1000):  # one logged step, then hooks off
            for _ in range(monitor_module.PASSES_WITHOUT_A_STEP + 5):
                opt.zero_grad()
                model(X[:2]).sum().backward()
                opt.step()


def test_a_gradscalers_skipped_steps_end_without_a_report():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    # The largest gradient of 1000 x the loss is ~127: scaled by 2^127 it overflows float32 (max ~2^128) until the
    # scaler has halved its scale about six times.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    taken = []
    opt.register_step_post_hook(lambda *_: taken.append(True))
    with Monitor(model, scaler=scaler) as monitor:
        for _ in range(12):
            opt.zero_grad()
            scaler.scale(1000 * _loss(model)).backward()
            scaler.step(opt)
            scaler.update()
    assert 0 < len(taken) < 12  # some steps were skipped by the scaler
    assert monitor.step_count == 12
    assert len(monitor.history.reports) == len(taken)
    for report in monitor.history.reports:
        assert all(r.call == 1 and r.nonfinite_grad == 0 for r in report.records)
    assert "update" not in vars(scaler)  # unwrapped on detach


def test_a_frozen_layer_has_no_update_ratio():
    model = _model()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with Monitor(model, optimizer=opt) as monitor:
        _loss(model).backward()
        opt.step()
    records = {r.name: r for r in monitor.history.reports[0].records}
    assert math.isnan(records["0"].update_ratio) and records["2"].update_ratio > 0
    assert any("not updated by SGD" in note for note in monitor.history.reports[0].notes)
