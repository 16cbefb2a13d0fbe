import json
import math

import pytest
import torch
import torch.nn.functional as F

import steadygrad.measure.monitor as monitor_module
from steadygrad import fast
from steadygrad.measure import JsonlSink, Monitor, TensorBoardSink, probe
from steadygrad.measure.records import LayerRecord
from steadygrad.nets import NetSpec, build

FIELDS = (
    "act_mean",
    "act_std",
    "act_min",
    "act_max",
    "act_second_moment",
    "saturated",
    "dead",
    "grad_norm",
    "grad_ratio",
    "weight_grad_norm",
    "bias_grad_norm",
    "weight_var",
    "nonfinite_act",
    "nonfinite_grad",
)


@pytest.fixture(params=["eager", "compiled", "numba"])
def mode(request):
    """Each Monitor test three times: the eager statistics, and the deferred ones of the compiled taps in C++
    and in numba."""
    backend = {"compiled": "cpp", "numba": "numba"}.get(request.param)
    if backend is not None:
        if not fast.available(backend):
            pytest.skip(f"steadygrad's {backend} kernels cannot be had here (no C++ compiler, or no numba)")
        fast.enable(backend)
    yield request.param
    fast.disable()


def net_and_data(norm="none", seed=0, activation="tanh", skip="none", dtype=torch.float32):
    net = build(
        NetSpec(depth=4, width=16, in_features=8, activation=activation, norm=norm, skip=skip),
        torch.Generator().manual_seed(seed),
    ).to(dtype)
    g = torch.Generator().manual_seed(100 + seed)
    return net, torch.randn(32, 8, generator=g, dtype=dtype), torch.randint(0, 10, (32,), generator=g)


def eager_probe(*args, **kwargs):
    """The float64 reference: the probe with the eager statistics, whichever backend the test enabled (the probe is
    one Monitor step, so under fast.enable() it takes the compiled taps too)."""
    backend = fast.backend()
    fast.disable()
    try:
        return probe(*args, **kwargs)
    finally:
        if backend is not None:
            fast.enable(backend)


def assert_same_records(a, b, rtol=1e-10, atol=1e-12):
    """Equal records; the compiled statistics sum float32 values in float32 within chunks of 4096 (then in
    float64), so they agree with the float64 reference to float32 rounding: rtol 1e-5 and atol 1e-7."""
    assert [r.label for r in a.records] == [r.label for r in b.records]
    for ra, rb in zip(a.records, b.records, strict=True):
        for field in FIELDS:
            va, vb = getattr(ra, field), getattr(rb, field)
            if isinstance(va, float) and math.isnan(va):
                assert math.isnan(vb), (ra.label, field)
            else:
                assert vb == pytest.approx(va, rel=rtol, abs=atol), (ra.label, field)


TOLERANCE = (1e-5, 1e-7)  # compiled mode: see assert_same_records


def hook_count(model, optimizer=None):
    n = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    if optimizer is not None:
        n += len(optimizer._optimizer_step_pre_hooks) + len(optimizer._optimizer_step_post_hooks)
    return n


@pytest.mark.parametrize(
    ("activation", "skip", "dtype"),
    [
        ("tanh", "none", torch.float32),
        ("relu", "none", torch.float32),  # dead units
        ("sigmoid", "none", torch.float32),  # saturation
        ("relu", "residual", torch.float32),  # the activation inside a block: a hook of its own
        ("tanh", "none", torch.float64),  # compiled mode falls back to the eager statistics
    ],
    ids=str,
)
def test_monitor_records_equal_the_probe(mode, activation, skip, dtype, monkeypatch):
    net, x, y = net_and_data(activation=activation, skip=skip, dtype=dtype)
    expected = eager_probe(net, x, y)
    compiled_calls = []
    if mode != "eager":  # count the compiled statistics' tables: float32 must take them, float64 must not
        statistics = monitor_module.deferred_table

        def counted(*args):
            computed = statistics(*args)
            compiled_calls.append(1)  # float64 models never get here: they take the exact eager statistics
            return computed

        monkeypatch.setattr(monitor_module, "deferred_table", counted)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with Monitor(net, optimizer=opt) as monitor:
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        monitor.observe_loss(loss)
        opt.step()
    (report,) = monitor.history.reports
    assert report.step == 1 and report.loss == pytest.approx(expected.loss)
    exact = mode == "eager" or dtype == torch.float64
    assert len(compiled_calls) == (0 if exact else 1)
    assert_same_records(expected, report, *((1e-10, 1e-12) if exact else TOLERANCE))
    assert all(0 < r.update_ratio < 1 for r in report.records)


def test_every_hook_is_gone_after_the_context(mode):
    net, x, _ = net_and_data()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = hook_count(net, opt)
    with Monitor(net, optimizer=opt):
        assert hook_count(net, opt) > before
        net(x).sum().backward()
        opt.step()
    assert hook_count(net, opt) == before


def test_gradient_accumulation_counts_optimizer_steps(mode):
    net, x, y = net_and_data()
    expected = eager_probe(net, x, y)  # the whole batch in one pass
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with Monitor(net, optimizer=opt) as monitor:
        opt.zero_grad()
        for xs, ys in zip(x.chunk(4), y.chunk(4), strict=True):  # four micro-batches, one step
            (F.cross_entropy(net(xs), ys) / 4).backward()
        opt.step()
    (report,) = monitor.history.reports
    assert monitor.step_count == 1
    # merged micro-batches == the whole batch
    assert_same_records(expected, report, *((1e-6, 1e-12) if mode == "eager" else TOLERANCE))


def test_schedule_logs_every_kth_step_and_skips_the_work_between(mode):
    net, x, y = net_and_data()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    layer_hooks = []
    with Monitor(net, every=10, optimizer=opt) as monitor:
        for _ in range(25):
            layer_hooks.append(hook_count(net))
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    assert [r.step for r in monitor.history.reports] == [1, 11, 21]
    # the layers carry hooks only during the logged steps: the other steps run the bare model
    assert [i + 1 for i, n in enumerate(layer_hooks) if n > 0] == [1, 11, 21]
    custom = Monitor(net, every=lambda step: step in (2, 3), optimizer=opt)
    with custom:
        for _ in range(4):
            opt.zero_grad()
            net(x).sum().backward()
            opt.step()
    assert [r.step for r in custom.history.reports] == [2, 3]


def test_manual_step_without_an_optimizer(mode):
    net, x, y = net_and_data()
    with Monitor(net) as monitor:
        F.cross_entropy(net(x), y).backward()
        report = monitor.step()
    assert report is not None and report.step == 1 and math.isnan(report.records[0].update_ratio)


def test_grad_scaler_is_divided_out(mode):
    net, x, y = net_and_data()
    reference = eager_probe(net, x, y)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with Monitor(net, optimizer=opt, scaler=scaler) as monitor:
        opt.zero_grad()
        scaler.scale(F.cross_entropy(net(x), y)).backward()
        scaler.step(opt)
        scaler.update()
    (report,) = monitor.history.reports
    assert_same_records(reference, report, *((1e-6, 1e-12) if mode == "eager" else TOLERANCE))


def test_non_finite_values_are_counted_per_layer(mode):
    net, x, y = net_and_data()
    with torch.no_grad():
        net.block02.linear.weight[0, 0] = math.nan
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with Monitor(net, optimizer=opt) as monitor:
        F.cross_entropy(net(x), y).backward()
        opt.step()
    records = {r.name: r for r in monitor.history.reports[0].records}
    assert records["block01"].nonfinite_act == 0
    assert records["block02"].nonfinite_act == 32  # one unit, every sample
    assert records["head"].nonfinite_act > 0
    assert math.isfinite(records["block02"].act_std)  # the finite values still give statistics


def test_history_as_dicts_and_dataframe():
    pd = pytest.importorskip("pandas")
    net, x, y = net_and_data()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with Monitor(net, optimizer=opt) as monitor:
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    rows = monitor.history.to_dicts()
    assert len(rows) == 3 * 5 and rows[0]["step"] == 1 and rows[0]["name"] == "block01"
    frame = monitor.history.to_dataframe()
    assert isinstance(frame, pd.DataFrame) and set(frame["step"]) == {1, 2, 3}


def test_jsonl_sink(tmp_path):
    net, x, y = net_and_data()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    path = tmp_path / "logs" / "monitor.jsonl"
    with Monitor(net, optimizer=opt, sinks=[JsonlSink(path)]):
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 10 and lines[-1]["step"] == 2 and lines[-1]["name"] == "head"


def test_tensorboard_events_with_nan_gradients_are_readable(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    net, x, y = net_and_data()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with Monitor(net, optimizer=opt, sinks=[TensorBoardSink(tmp_path)]):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        net.block01.linear.weight.grad[0, :3] = math.nan  # NaN in a gradient
        net.block02.linear.weight.grad[1, 0] = math.inf
        opt.step()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()
    assert "block01/grad_norm" in tags["scalars"] and "loss" not in tags["scalars"]
    assert "block01/weight_grad" in tags["histograms"]
    histogram = events.Histograms("block01/weight_grad")[0].histogram_value
    assert histogram.num == 16 * 8 - 3  # the NaNs left out
    assert "block02/weight_grad_norm" not in tags["scalars"]  # an Inf norm is skipped, not written
    assert "block02/grad_norm" in tags["scalars"]


def test_bad_arguments():
    net, _, _ = net_and_data()
    with pytest.raises(ValueError, match="every must be a positive integer"):
        Monitor(net, every=0)
    with pytest.raises(TypeError, match=r"needs an nn\.Module"):
        Monitor("model")
    with pytest.raises(ValueError, match="No layer of the model matches"):
        Monitor(net, layers="nothing*")


def test_a_monitor_closed_between_forward_and_backward_leaves_the_backward_working(mode):
    # the compiled taps' gradient hooks outlive the monitor on the graph: they must find it gone, not crash
    net, x, y = net_and_data()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    monitor = Monitor(net, optimizer=opt).attach()
    loss = F.cross_entropy(net(x), y)
    monitor.detach()
    del monitor
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())


class _Reused(torch.nn.Module):
    """One block applied twice per forward (two slots of one layer) and a branch whose gradient never comes."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
        self.side = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 10)
        for p in self.parameters():
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        self.side(x).detach()  # recorded, but no gradient flows back through it
        return self.head(self.block(self.block(x)))


@pytest.mark.parametrize("backend", ["cpp", "numba"])
def test_compiled_taps_equal_the_eager_statistics_for_reused_and_detached_layers(backend):
    if not fast.available(backend):
        pytest.skip(f"steadygrad's {backend} kernels cannot be had here (no C++ compiler, or no numba)")
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    reports = []
    for compiled in (False, True):
        fast.enable(backend) if compiled else fast.disable()
        net = _Reused()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        with Monitor(net, optimizer=opt, layers=["block", "side", "head"]) as monitor:
            for _ in range(2):  # two micro-batches: the taps merge them
                F.cross_entropy(net(x), y).backward()
            opt.step()
        reports.append(monitor.history.reports[0])
    fast.disable()
    eager, compiled = reports
    assert [r.label for r in compiled.records] == ["side", "block", "block (call 2)", "head"]
    assert math.isnan(compiled.records[0].grad_norm)  # the detached branch: seen, no gradient
    assert_same_records(eager, compiled, *TOLERANCE)
    # the update ratios too, each on its own layer (the slots' order is not the layers' order here)
    ratios = [(e.update_ratio, c.update_ratio) for e, c in zip(eager.records, compiled.records, strict=True)]
    assert [c for _, c in ratios] == pytest.approx([e for e, _ in ratios], rel=1e-4, abs=1e-9)
    assert len({c for _, c in ratios}) == 3  # side (not moved: 0), block (both calls) and head differ


@pytest.mark.parametrize("backend", ["cpp", "numba"])
def test_a_model_converted_after_attach_switches_between_compiled_and_eager_statistics(backend):
    # the choice is made before every logged step: float32 on the CPU takes the compiled taps, float64 the
    # exact eager statistics, whatever the model was when the monitor was attached
    if not fast.available(backend):
        pytest.skip(f"steadygrad's {backend} kernels cannot be had here (no C++ compiler, or no numba)")
    fast.enable(backend)
    try:
        net, x, y = net_and_data()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        monitor = Monitor(net, optimizer=opt)
        for dtype in (torch.float32, torch.float64, torch.float32):
            net.to(dtype)
            expected = eager_probe(net, x.to(dtype), y)  # with the monitor detached: it would record the probe too
            with monitor:
                opt.zero_grad()
                F.cross_entropy(net(x.to(dtype)), y).backward()
                opt.step()
            exact = dtype == torch.float64
            assert monitor._recorder.deferred is not exact
            assert_same_records(expected, monitor.history.reports[-1], *((1e-10, 1e-12) if exact else TOLERANCE))
    finally:
        fast.disable()


def test_user_hooks_keep_running_and_in_order_around_the_monitors(mode):
    # steadygrad's hooks come and go with the logged steps through torch's public API only (register and
    # handle.remove()), so a hook the user adds between steps runs on every later step, once, and the user's
    # hooks keep their registration order among themselves: after the monitor they are exactly as registered
    net, x, y = net_and_data()
    layer = next(m for m in net.modules() if isinstance(m, torch.nn.Linear))
    calls = []
    first = layer.register_forward_hook(lambda m, a, out: calls.append("first"))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with Monitor(net, every=2, optimizer=opt) as monitor:
        for step in range(1, 6):
            if step == 2:  # an unlogged step: steadygrad's hooks are off the layer
                added = layer.register_forward_hook(lambda m, a, out: calls.append("added"))
            calls.append(step)
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    assert [r.step for r in monitor.history.reports] == [1, 3, 5]
    assert calls == [1, "first", 2, "first", "added", 3, "first", "added", 4, "first", "added", 5, "first", "added"]
    assert list(layer._forward_hooks) == [first.id, added.id]  # steadygrad's own are gone, the user's in order
    first.remove()
    added.remove()


def test_steadygrad_never_writes_torchs_private_hook_dicts():
    # torch's hook dicts are kept in step with its handles (and with the kwargs and always-called tables);
    # writing them directly reorders hooks and bypasses that bookkeeping, so the package uses the public API only
    from pathlib import Path

    import steadygrad

    private = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    offenders = [
        f"{path.name}: {name}"
        for path in Path(steadygrad.__file__).parent.rglob("*.py")
        for name in private
        if name in path.read_text()
    ]
    assert offenders == []


def _ratios_by_hand(net, opt, x, y, steps: int, **monitor_options):
    """Train ``steps`` SGD steps under a Monitor, and each step's update ratio of the first layer, computed here."""
    first = net.block01.linear.weight
    expected = []
    with Monitor(net, optimizer=opt, **monitor_options) as monitor:
        for _ in range(steps):
            before = first.detach().clone()
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
            expected.append(((first.detach() - before).norm() / before.norm()).item())
    return monitor, expected


@pytest.mark.parametrize(
    ("every", "update_every", "measured_steps"),
    [
        (1, None, [1, 11, 21]),  # the default: logged steps at least 10 optimizer steps apart
        (10, None, [1, 11, 21]),  # every logged step
        (3, None, [1, 13]),  # ceil(10 / 3) = 4 logged steps apart
        (2, 3, [1, 7, 13, 19]),  # as asked: every 3rd logged step
        (1, 1, list(range(1, 22))),
    ],
)
def test_the_update_ratio_is_measured_on_every_kth_logged_step_only(mode, every, update_every, measured_steps):
    net, x, y = net_and_data()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    monitor, expected = _ratios_by_hand(net, opt, x, y, 21, every=every, update_every=update_every)
    assert [r.step for r in monitor.history.reports] == list(range(1, 22, every))
    for report in monitor.history.reports:
        measured = report.step in measured_steps
        assert {r.update_measured for r in report.records} == {measured}
        ratio = report.records[0].update_ratio
        note = [n for n in report.notes if n.startswith("update ratio not measured")]
        if measured:
            assert ratio == pytest.approx(expected[report.step - 1], rel=1e-5) and not note
        else:  # said so in the record and in the report, not a bare NaN
            assert math.isnan(ratio) and note and f"update_every={monitor.update_every}" in note[0]
        # every other statistic is measured on every logged step
        assert math.isfinite(report.records[0].grad_norm) and math.isfinite(report.records[0].weight_var)
    again = [LayerRecord.from_dict(r.to_dict()) for r in monitor.history.reports[1].records]
    assert [r.update_measured for r in again] == [r.update_measured for r in monitor.history.reports[1].records]


def test_the_eager_update_ratio_reuses_its_cpu_copies_and_follows_a_weight_that_changed_dtype():
    """The eager taps copy the CPU first weights into buffers kept between logged steps and subtract in place
    (Recorder.weight_snapshot): the buffers are the same objects step after step, the ratios stay the ones taken by
    hand, and a weight whose dtype changed gets a new buffer of its dtype."""
    fast.disable()
    net, x, y = net_and_data()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    first = net.block01.linear.weight

    def step_by_hand(inputs):
        before = first.detach().clone()
        opt.zero_grad()
        F.cross_entropy(net(inputs), y).backward()
        opt.step()
        return ((first.detach() - before).norm() / before.norm()).item()

    with Monitor(net, optimizer=opt, update_every=1) as monitor:
        expected = [step_by_hand(x)]
        kept = [id(b) for b in monitor._recorder._snapshots]
        expected += [step_by_hand(x), step_by_hand(x)]
        assert [id(b) for b in monitor._recorder._snapshots] == kept  # no new copies
        net.double()
        expected.append(step_by_hand(x.double()))
        assert monitor._recorder._snapshots[0].dtype == torch.float64
    got = [r.records[0].update_ratio for r in monitor.history.reports]
    assert got == pytest.approx(expected, rel=1e-5) and len(got) == 4


def test_update_every_refuses_what_is_not_a_positive_integer():
    net, _, _ = net_and_data()
    for bad in (0, -1, 2.5, True, "10"):
        with pytest.raises(ValueError, match="update_every must be a positive integer"):
            Monitor(net, update_every=bad)


def test_records_written_before_update_measured_existed_read_it_from_the_ratio():
    old = {"name": "a", "kind": "Linear", "index": 0, "update_ratio": 0.01}
    assert LayerRecord.from_dict(old).update_measured
    assert not LayerRecord.from_dict({**old, "update_ratio": None}).update_measured


def test_nan_and_inf_give_the_same_records_checked_on_the_spot_or_kept_to_the_steps_end(monkeypatch):
    """The eager taps check each CPU tensor's fast sums at once and keep nothing; on an accelerator they keep the
    tensors and recompute at the step's end (hooks._checked_now). Both give the same masked records."""
    import steadygrad.measure.hooks as hooks

    def run():
        net, x, y = net_and_data(activation="tanh")
        with torch.no_grad():
            net.block02.linear.weight[0, 0] = math.nan
            net.block03.linear.weight[1, 1] = math.inf
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        with Monitor(net, optimizer=opt) as monitor:
            for half in (x[:16], x[16:]):  # two micro-batches: masked and fast moments merge
                F.cross_entropy(net(half), y[: len(half)]).backward()
            opt.step()
        return monitor.history.reports[0]

    on_the_spot = run()
    monkeypatch.setattr(hooks, "_checked_now", lambda t: False)
    kept = run()
    assert_same_records(kept, on_the_spot, *TOLERANCE)  # the kept path recomputes a whole layer in float64
    records = {r.name: r for r in on_the_spot.records}
    assert records["block02"].nonfinite_act == 32 and records["block03"].nonfinite_act > 0
    assert math.isfinite(records["block02"].act_std) and records["block01"].nonfinite_grad > 0


def _training_step_records(net, x, y, scale: float = 1.0):
    """One logged step of SGD under the Monitor at its defaults, the loss multiplied by ``scale``."""
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # the weights stay put: the same records each time
    with Monitor(net, optimizer=opt) as monitor:
        opt.zero_grad()
        (F.cross_entropy(net(x), y) * scale).backward()
        opt.step()
    return {r.name: r for r in monitor.history.reports[0].records}


def test_a_vanishing_gradient_reads_as_its_size_not_as_zero(mode):
    """Float32 squares of values under ~1e-19 underflow to 0. Gradients are linear in the loss, so those of the loss
    times 1e-24 must read as 1e-24 times those of the loss, with every taps, not as exactly zero (which
    diagnose would call dead or zero-initialized, not vanishing)."""
    # width 256: the eager taps' CPU row sums (rows of at least 256 values) are float32 too
    net = build(NetSpec(depth=4, width=256, in_features=8, activation="sigmoid"), torch.Generator().manual_seed(0))
    _, x, y = net_and_data()
    plain = _training_step_records(net, x, y)
    tiny = _training_step_records(net, x, y, scale=1e-24)
    for name, record in plain.items():
        for field in ("grad_norm", "weight_grad_norm", "bias_grad_norm"):
            value = getattr(record, field)
            if math.isfinite(value):
                assert getattr(tiny[name], field) == pytest.approx(value * 1e-24, rel=1e-5, abs=0), (name, field)
    assert all(r.grad_norm > 0 for r in tiny.values())


def test_the_variance_of_a_weight_far_from_zero_is_exact(mode):
    """A LayerNorm gain of 1 + 1e-4 noise: sum(w^2) - sum(w)^2 / n keeps 1e-8 of sum(w^2), which float32 sums
    would lose (the eager taps then take that weight's sums again in float64; the compiled ones use shifted sums)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 4096), torch.nn.LayerNorm(4096), torch.nn.Linear(4096, 4))
    with torch.no_grad():
        net[1].weight.copy_(1 + 1e-4 * torch.randn(4096))
    records = _training_step_records(net, torch.randn(16, 8), torch.randint(0, 4, (16,)))
    truth = net[1].weight.detach().double().var().item()
    assert records["1"].weight_var == pytest.approx(truth, rel=1e-4)


def test_square_norms_are_float64_accurate_at_any_size_and_scale():
    """The step's end norms: float32 passes, chunked past 1 M values (one float32 accumulator loses 1e-3 at 16 M),
    and taken again in float64 where they underflowed; an all-zero tensor stays an exact 0."""
    from steadygrad.measure.hooks import square_norms

    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(3 << 20, generator=g) + 0.5,  # over 1 M values, not centred
        torch.randn(300, generator=g),
        torch.randn(64, 64, generator=g) * 1e-25,  # squares under float32's range
        torch.zeros(10),
        torch.randn(5, generator=g) * 1e20,  # squares over it
    ]
    got = square_norms(tensors).tolist()
    exact = [t.double().square().sum().item() for t in tensors]
    assert got[3] == 0.0
    for value, truth in zip(got, exact, strict=True):
        assert value == pytest.approx(truth, rel=1e-6, abs=0)


def test_tiny_activations_read_as_their_size_not_as_zero(mode):
    """Outputs of about 1e-24, whose float32 squares underflow: their std and second moment are those torch
    computes in float64, with every taps (an all-zero output keeps its exact zeros)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 256, bias=False), torch.nn.Tanh(), torch.nn.Linear(256, 4))
    x = torch.randn(32, 8) * 1e-24
    records = _training_step_records(net, x, torch.randint(0, 4, (32,)))
    out = net[0](x).detach().double()
    assert records["0"].act_std == pytest.approx(out.std().item(), rel=1e-4, abs=0)
    assert records["0"].act_second_moment == pytest.approx(out.square().mean().item(), rel=1e-4, abs=0)
