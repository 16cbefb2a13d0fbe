"""steadygrad.fast's switch: which backend runs, what happens where one cannot be had, and that nothing is
compiled unless asked."""

import dataclasses
import sys

import pytest
import torch

from steadygrad import fast
from steadygrad.norm import functional as F


@pytest.fixture(autouse=True)
def restore_state():
    builds = {name: dataclasses.replace(build) for name, build in fast._BUILDS.items()}
    enabled = fast.backend()
    yield
    fast._BUILDS.update(builds)
    fast._STATE["enabled"] = enabled


def forget(backend, error=None):
    """As if ``backend`` had never been built in this process (with ``error``: as if it had failed so)."""
    fast._BUILDS[backend] = fast._Build(error=error)


def test_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="'auto', 'cpp', 'numba'"):
        fast.enable("triton")
    with pytest.raises(ValueError, match="'cpp' or 'numba'"):
        fast.available("triton")
    with pytest.raises(ValueError, match="'cpp' or 'numba'"):
        fast.compile_seconds("triton")


def test_auto_falls_back_to_numba_where_cpp_cannot_be_built():
    pytest.importorskip("numba")
    forget("cpp", error="steadygrad's compiled kernels could not be built (no compiler).")
    with pytest.warns(RuntimeWarning, match="numba-compiled kernels are used instead"):
        assert fast.enable()
    assert fast.backend() == "numba"
    y = F.layer_norm(torch.randn(3, 8, requires_grad=True), (8,))
    assert "Numba" in y.grad_fn.name()
    assert fast.compile_seconds("numba") is not None


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_numba_can_be_enabled_where_gradients_are_off(context):
    # enable() runs a backward pass to compile the kernels: it must not depend on the caller's grad mode
    pytest.importorskip("numba")
    forget("numba")
    with context():
        assert fast.enable("numba")
    assert fast.backend() == "numba"


def test_a_numba_that_cannot_compile_the_kernels_warns_and_keeps_the_eager_path(monkeypatch):
    pytest.importorskip("numba")
    from steadygrad.fast import jit

    def broken():
        raise TypeError("no typing for this numba")

    forget("numba")
    monkeypatch.setattr(jit, "warm_up", broken)
    with pytest.warns(RuntimeWarning, match="numba kernels could not be compiled .TypeError: no typing"):
        assert not fast.enable("numba")
    assert fast.backend() is None
    assert not fast.available("numba")  # the reason is kept: no second attempt


def test_no_backend_at_all_warns_with_both_reasons_and_keeps_the_eager_path(monkeypatch):
    forget("cpp", error="no compiler here.")
    forget("numba")
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba raises ImportError
    with pytest.warns(RuntimeWarning, match=r"no compiler here\. numba cannot be imported"):
        assert not fast.enable()
    assert not fast.enabled()
    assert fast.backend() is None
    assert not fast.available("numba")


def test_the_monitor_takes_the_taps_of_the_backend_enabled_before_each_logged_step():
    pytest.importorskip("numba")
    from torch import nn

    from steadygrad.fast import jit_collector
    from steadygrad.measure import Monitor

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    backends = ["numba", "cpp"] if fast.available("cpp") else ["numba"]
    with Monitor(model, optimizer=opt) as monitor:
        for backend in backends:  # switched between steps: the next step's taps are the new backend's
            assert fast.enable(backend)
            opt.zero_grad()
            model(torch.randn(8, 4)).sum().backward()
            opt.step()
            assert monitor._recorder.deferred
            assert isinstance(monitor._recorder.collector(), jit_collector.Collector) == (backend == "numba")
    # the two Linears and the ReLU module between them (its dead units)
    assert [len(report.records) for report in monitor.history.reports] == [3] * len(backends)


def test_numba_kernels_compile_in_enable_and_never_again():
    # enable() compiles every kernel for the one signature real calls use: a second signature would be a
    # silent compile of seconds in the middle of training
    pytest.importorskip("numba")
    from steadygrad import norm
    from steadygrad.fast import jit

    assert fast.enable("numba")
    kernels = [k for k in vars(jit).values() if hasattr(k, "signatures") and k.__name__.startswith("_")]
    compiled = {k.__name__: len(k.signatures) for k in kernels}
    cases = [
        (norm.BatchNorm1d(64), (32, 64)),
        (norm.BatchNorm1d(6, affine=False), (7, 6, 3)),
        (norm.BatchNorm2d(8), (4, 8, 5, 5)),
        (norm.LayerNorm(16), (3, 16)),
        (norm.LayerNorm(16, elementwise_affine=False), (3, 16)),
        (norm.GroupNorm(2, 8), (4, 8, 3)),
    ]
    for layer, shape in cases:
        layer(torch.randn(shape, requires_grad=True)).sum().backward()
    assert {k.__name__: len(k.signatures) for k in kernels} == compiled
