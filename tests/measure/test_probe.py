import json
import math
import statistics

import pytest
import torch
from torch import nn

from steadygrad import theory
from steadygrad.init import init_model, orthogonal_
from steadygrad.measure import FlowReport, probe
from steadygrad.nets import NetSpec, build


def _x(*shape, seed=100):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def sigma_w_init(sigma_w2):
    """W ~ N(0, sigma_w^2 / fan_in), the mean-field papers' parametrization."""

    def init(tensor, generator=None):
        return tensor.normal_(0.0, math.sqrt(sigma_w2 / tensor.shape[1]), generator=generator)

    return init


# ---- oracles ---------------------------------------------------------------------------------------


def test_deep_linear_net_with_orthogonal_init_preserves_the_gradient_norm():
    spec = NetSpec(depth=40, width=64, in_features=64, activation="identity", init=orthogonal_, bias=False)
    net = build(spec).double()
    init_model(net, orthogonal_, generator=torch.Generator().manual_seed(0))  # orthogonal to float64 rounding
    report = probe(net, _x(32, 64).double())
    blocks = [r.grad_norm for r in report.records if r.name.startswith("block")]
    assert len(blocks) == 40
    torch.testing.assert_close(
        torch.tensor(blocks, dtype=torch.float64),
        torch.full((40,), blocks[-1], dtype=torch.float64),
        rtol=1e-12,
        atol=0,
    )


@pytest.mark.parametrize(
    ("sigma_w2", "expected"), [(0.5, 2.7e-8), (1.0, 0.12), (4.0, 1.6e3)], ids=["ordered", "sigma1", "chaotic"]
)
def test_tanh_gradient_ratio_follows_mean_field_theory(sigma_w2, expected):
    x = _x(128, 256)
    net = build(
        NetSpec(depth=50, width=256, in_features=256, activation="tanh", init=sigma_w_init(sigma_w2)),
        torch.Generator().manual_seed(1),
    )
    report = probe(net, x, layers="block*.linear")  # the pre-activations h_1 ... h_50
    measured = report.records[0].grad_norm / report.records[-1].grad_norm
    predicted = theory.gradient_ratio(50, sigma_w2, 0.0, "tanh", float(x.square().mean()))
    assert predicted == pytest.approx(expected, rel=0.05)  # the numbers
    assert abs(math.log(measured / predicted)) < 0.3


@pytest.mark.parametrize(("init", "sigma_w2"), [("he_normal", 2.0), ("glorot_normal", 1.0)])
def test_relu_second_moment_follows_the_closed_form(init, sigma_w2):
    # finite width makes q_L log-normal around the closed form (Hanin & Rolnick 2018), which holds in
    # expectation: average over seeds at a width where the spread is small
    ratios = []
    for seed in range(6):
        x = _x(64, 1024, seed=100 + seed)
        net = build(
            NetSpec(depth=30, width=1024, in_features=1024, activation="relu", init=init),
            torch.Generator().manual_seed(seed),
        )
        report = probe(net, x, layers="block*.linear")
        ratios.append(report.records[-1].act_second_moment / float(x.square().mean()))
    closed = theory.relu_second_moment(30, sigma_w2)  # He: 2, Glorot: 2^-29 ~= 1.9e-9
    assert abs(math.log(statistics.mean(ratios) / closed)) < math.log(2)


def test_relu_he_keeps_activation_variance_and_glorot_halves_it():
    # one draw at width 256 wanders by a factor e either way over 50 layers (log-variance ~ 5L/N):
    # the variance is kept in expectation, so average each layer's variance over seeds
    variances = torch.zeros(50, dtype=torch.float64)
    for seed in range(16):
        net = build(
            NetSpec(depth=50, width=256, in_features=256, init="he_normal"),
            torch.Generator().manual_seed(seed),
        )
        he = probe(net, _x(128, 256, seed=100 + seed))
        variances += torch.tensor([r.act_std**2 for r in he.records if r.name.startswith("block")]) / 16
    assert float(variances.max() / variances.min()) < 2
    x = _x(128, 256)
    glorot = probe(
        build(
            NetSpec(depth=50, width=256, in_features=256, init="glorot_normal"),
            torch.Generator().manual_seed(0),
        ),
        x,
    )
    second = [r.act_second_moment for r in glorot.records if r.name.startswith("block")]
    per_layer = (second[-1] / second[0]) ** (1 / 49)
    assert per_layer == pytest.approx(0.5, rel=0.05)
    assert 2.0**-55 < second[-1] / second[0] < 2.0**-43  # about 2^-49


def test_sigmoid_net_vanishes_and_large_tanh_saturates():
    x = _x(128, 64)
    sigmoid = probe(
        build(
            NetSpec(depth=20, width=64, activation="sigmoid", init="glorot_uniform"),
            torch.Generator().manual_seed(0),
        ),
        x,
    )
    assert sigmoid.gradient_ratio < 1e-5
    assert "shrinks" in sigmoid.summary()
    tanh = probe(
        build(
            NetSpec(depth=20, width=64, activation="tanh", init="large_normal"),
            torch.Generator().manual_seed(0),
        ),
        x,
    )
    saturated = [r.saturated for r in tanh.records if r.name.startswith("block")]
    assert min(saturated[1:]) > 0.6  # closed form at std 1, width 64: P(|h| > 2.65) ~= 0.71
    assert "saturated" in tanh.summary()


def test_skip_connections_raise_the_input_gradient_of_the_seeds_four_layer_net():
    means = {}
    for skip in ("none", "residual", "dense"):
        norms = []
        for seed in range(20):
            spec = NetSpec(
                depth=4,
                width=32,
                in_features=10,
                out_features=1,
                activation="sigmoid",
                init="glorot_uniform",
                skip=skip,
            )
            net = build(spec, torch.Generator().manual_seed(seed))
            norms.append(probe(net, _x(32, 10, seed=1000 + seed)).input_grad_norm)
        means[skip] = statistics.mean(norms)
    assert means["residual"] > 10 * means["none"]
    assert means["dense"] > 10 * means["none"]


def test_dead_relus_are_counted():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        net[0].bias[:8] = -100.0  # half the units can never fire
    report = probe(net, _x(64, 8), layers=(nn.ReLU,))
    assert report.records[0].dead == pytest.approx(0.5)


# ---- the model is left exactly as found --------------------------------------------------------------


def test_model_is_unchanged_after_a_probe():
    net = build(NetSpec(depth=4, width=16, in_features=8, norm="batch"), torch.Generator().manual_seed(0))
    net.train()
    for p in net.parameters():
        p.grad = torch.full_like(p, 7.0)
    net.block02.register_forward_hook(lambda *a: None)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    grads = [p.grad.clone() for p in net.parameters()]
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in net.modules())
    targets = torch.randint(0, 10, (32,))
    rng = torch.get_rng_state()
    report = probe(net, _x(32, 8), targets=targets)
    assert report.records and math.isfinite(report.loss)
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key  # parameters and running statistics
    for p, g in zip(net.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)
    assert net.training
    assert hooks == sum(
        len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in net.modules()
    )
    assert torch.equal(rng, torch.get_rng_state())
    net.eval()
    probe(net, _x(4, 8))
    assert not net.training


# ---- any module ---------------------------------------------------------------------------------------


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.unused = nn.Linear(6, 6)
        self.frozen = nn.Linear(6, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.shared(x))))  # the same module twice
        return {"logits": self.frozen(h), "aux": (h.sum(1),)}


def test_dict_tuple_outputs_shared_unused_and_frozen_modules():
    report = probe(TwoHeads(), _x(8, 6))
    labels = [r.label for r in report.records]
    assert labels == ["shared", "shared (call 2)", "frozen"]
    assert report.unused == ["unused"]
    assert all(math.isfinite(r.grad_norm) for r in report.records)
    assert math.isnan(report.records[2].weight_grad_norm)  # frozen: no gradient
    assert "Never called" in report.summary()


def test_convolutional_and_recurrent_models():
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    report = probe(cnn, _x(4, 3, 8, 8), targets=torch.tensor([0, 1, 2, 3]))
    # the activation module is recorded in its own right (its dead units), Flatten is not and says why
    assert [r.kind for r in report.records] == ["Conv2d", "BatchNorm2d", "ReLU", "Linear"]
    assert [r.label for r in report.records][2] == "2 (ReLU)"
    assert math.isfinite(report.records[2].dead) and "Flatten" in report.skipped
    lstm = build(NetSpec(kind="rnn", cell="lstm", depth=3, width=8, in_features=4, activation="tanh", seq_len=5))
    report = probe(lstm, _x(6, 5, 4))
    assert len(report.records) == 4 and all(math.isfinite(r.grad_norm) for r in report.records)
    raw = probe(nn.LSTM(4, 8, batch_first=True), _x(2, 5, 4))
    assert raw.records[0].kind == "LSTM" and math.isfinite(raw.records[0].weight_grad_norm)


def test_layer_selection_by_type_and_pattern():
    net = build(NetSpec(depth=3, width=8, in_features=4, norm="layer"))
    assert [r.name for r in probe(net, _x(4, 4), layers="*.norm").records] == [
        "block01.norm",
        "block02.norm",
        "block03.norm",
    ]
    assert len(probe(net, _x(4, 4), layers=nn.Linear).records) == 4
    with pytest.raises(ValueError, match=r"No layer of the model matches layers='conv\*'"):
        probe(net, _x(4, 4), layers="conv*")


def test_non_finite_values_are_counted_not_fatal():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight[0, 0] = math.inf
    report = probe(net, _x(3, 4))
    assert report.records[0].nonfinite_act > 0
    assert "Non-finite values first appear" in report.summary()


def test_bad_calls():
    with pytest.raises(TypeError, match=r"needs an nn\.Module"):
        probe(lambda x: x, _x(2, 2))
    with pytest.raises(ValueError, match="does not depend on any parameter"):
        probe(nn.Linear(2, 2), _x(2, 2), loss=lambda y: torch.tensor(1.0))


# ---- the report ---------------------------------------------------------------------------------------


def test_report_round_trips_and_renders(tmp_path):
    net = build(NetSpec(depth=6, width=32, activation="tanh", init="glorot_uniform"))
    report = probe(net, _x(16, 64))
    data = json.loads(report.to_json(tmp_path / "r.json"))
    assert data["layers"][0]["name"] == "block01" and data["gradient_ratio"] > 0
    again = FlowReport.from_dict(json.loads((tmp_path / "r.json").read_text()))
    assert again.summary() == report.summary()
    report.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = report._repr_html_()
    assert "<table>" in page and "data:image/png;base64," in page and "block01" in page
    assert report.table().row_count == 7


def test_theory_is_attached_to_a_built_mlp():
    net = build(
        NetSpec(depth=10, width=128, in_features=128, activation="tanh", init="glorot_normal"),
        torch.Generator().manual_seed(0),
    )
    report = probe(net, _x(64, 128))
    blocks = [r for r in report.records if r.name.startswith("block")]
    assert all(math.isfinite(r.predicted_grad_norm) for r in blocks)
    for r in blocks:
        assert abs(math.log(r.predicted_grad_norm / r.grad_norm)) < 0.3
        assert abs(math.log(r.predicted_second_moment / r.act_second_moment)) < 0.3
    assert "Mean-field theory predicts" in report.summary()
    residual = probe(build(NetSpec(depth=3, width=8, skip="residual")), _x(4, 64))
    assert all(math.isnan(r.predicted_grad_norm) for r in residual.records)


@pytest.mark.parametrize("backend", ["eager", "cpp", "numba"])
def test_probe_is_one_monitor_step(backend):
    """The probe and a Monitor's logged step on the same batch give the same records and label, with the eager
    statistics and with either backend's compiled taps (the probe is one Monitor step)."""
    import dataclasses

    import torch.nn.functional as F

    from steadygrad import fast
    from steadygrad.measure import Monitor
    from steadygrad.nets import NetSpec, build

    if backend != "eager":
        if not fast.available(backend):
            pytest.skip(f"steadygrad's {backend} kernels cannot be had here (no C++ compiler, or no numba)")
        fast.enable(backend)
    try:
        net = build(NetSpec(depth=4, width=32, in_features=16, activation="tanh"), torch.Generator().manual_seed(0))
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(64, 16, generator=gen), torch.randint(0, 10, (64,), generator=gen)
        probed = probe(net, x, y, theory_prediction=False)
        with Monitor(net, every=1) as monitor:
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            monitor.observe_loss(loss)
            stepped = monitor.step()
        net.zero_grad()
        assert probed.label == stepped.label == net.spec.label()
        assert probed.loss == pytest.approx(stepped.loss)
        assert len(probed.records) == len(stepped.records) > 0
        for a, b in zip(probed.records, stepped.records, strict=True):
            left, right = dataclasses.asdict(a), dataclasses.asdict(b)
            assert left.keys() == right.keys()
            for key in left:
                if isinstance(left[key], float):
                    assert left[key] == pytest.approx(right[key], rel=1e-6, abs=1e-12, nan_ok=True), (a.name, key)
                else:
                    assert left[key] == right[key], (a.name, key)
    finally:
        fast.disable()


def test_a_report_prints_as_words_and_shows_its_table():
    from rich.console import Console

    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 2))
    report = probe(model, _x(16, 8))
    text = str(report)
    assert text.startswith("Sequential (3 layer records; loss ") and report.summary() in text
    assert "Dropout (dropout: no weight" in text  # what was not recorded, and why
    assert repr(report) == f"FlowReport('Sequential', 3 records, loss={report.loss:.4g})"
    console = Console(record=True, width=200)
    report.show(console)
    shown = console.export_text()
    assert "1 (Tanh)" in shown and "3 (Linear)" in shown and report.summary().splitlines()[0] in shown
    assert "W var" in shown
    narrow = Console(record=True, width=80)  # a default terminal: the compact table, numbers never cut
    report.show(narrow)
    compact = narrow.export_text()
    assert "W var" not in compact and "grad norm" in compact and "…" not in compact
    assert f"{report.records[0].grad_norm:.3g}" in compact


def test_the_summary_reads_depth_along_like_layers_when_the_model_is_not_a_chain():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)) for _ in range(3))
            self.head = nn.Linear(8, 10)

        def forward(self, ids):
            h = self.embed(ids)
            for block in self.blocks:
                h = h + block(h)
            return self.head(h)

    torch.manual_seed(0)
    report = probe(Residual(), torch.randint(0, 10, (4, 5)))
    first, last = (r for r in report.records if r.name in ("blocks.0.0", "blocks.2.0"))
    ratio = first.grad_norm / last.grad_norm
    sentence = report.summary().splitlines()[0]
    assert "over 3 depths" in sentence and f"{ratio:.2g}" in sentence
    assert "at blocks.0.0 (LayerNorm)" in sentence and "at blocks.2.0 (LayerNorm)" in sentence


def test_a_model_that_sets_requires_grad_on_its_input_is_measured_without_the_input_gradient():
    class SetsRequiresGrad(nn.Module):  # what wav2vec2's feature encoder does in training
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 2)

        def forward(self, x):
            h = x[:, None]
            if self.training:
                h.requires_grad = True  # only allowed on a leaf: an input that needs no grad
            return self.linear(h.squeeze(1))

    from steadygrad.measure.probe import NO_INPUT_GRADIENT_NOTE

    model, x = SetsRequiresGrad(), _x(4, 8)
    report = probe(model, x)
    assert NO_INPUT_GRADIENT_NOTE in report.notes and math.isnan(report.input_grad_norm)
    assert [r.name for r in report.records] == ["linear"]  # one call, not the failed one and the retry
    assert report.records[0].grad_norm == pytest.approx(probe(model, x, mode="eval").records[0].grad_norm)


def test_a_softmax_output_under_cross_entropy_gets_a_note():
    from steadygrad.measure.probe import PROBABILITIES_NOTE

    targets = torch.tensor([0, 1, 2, 0])
    logits = nn.Sequential(nn.Linear(8, 3))
    probabilities = nn.Sequential(nn.Linear(8, 3), nn.Softmax(dim=1))
    assert PROBABILITIES_NOTE not in probe(logits, _x(4, 8), targets).notes
    assert PROBABILITIES_NOTE in probe(probabilities, _x(4, 8), targets).notes
    assert PROBABILITIES_NOTE not in probe(probabilities, _x(4, 8)).notes  # the projection loss takes any output


def test_an_empty_batch_is_refused_with_what_is_wrong():
    with pytest.raises(ValueError, match=r"The batch is empty \(inputs of shape \(0, 8\)\)"):
        probe(nn.Linear(8, 2), torch.randn(0, 8))


def test_a_layer_used_through_its_weights_is_a_note_not_never_called():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    report = probe(model, _x(4, 5, 16))
    out_proj = ["layers.0.self_attn.out_proj", "layers.1.self_attn.out_proj"]  # F.multi_head_attention_forward
    assert not set(out_proj) & set(report.unused)
    assert f"used through its weights, not its forward (so it has no record): {', '.join(out_proj)}" in report.notes


def test_the_probe_lets_each_weight_gradient_go_once_summed_and_measures_it_exactly():
    """The probe's memory: no layer's weight gradient is alive while an earlier layer's backward runs, and the
    records give the weight-gradient norms torch computes (the user's gradients are put back, the hooks gone)."""
    net = build(NetSpec(depth=6, width=32, in_features=8), torch.Generator().manual_seed(0))
    x, targets = _x(16, 8), torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    net.zero_grad()
    torch.nn.functional.cross_entropy(net(x), targets).backward()
    expected = {name: m.weight.grad.norm().item() for name, m in net.named_modules() if isinstance(m, nn.Linear)}
    user_grads = [p.grad.clone() for p in net.parameters()]
    alive = []
    for module in net.modules():
        if isinstance(module, nn.Linear):
            module.register_full_backward_pre_hook(
                lambda *_: alive.append(sum(p.grad is not None for p in net.parameters()))
            )
    report = probe(net, x, targets=targets)
    assert len(alive) == 7 and max(alive) == 0  # every gradient already summed and let go
    records = {r.name: r for r in report.records}
    for name, norm in expected.items():
        record = records[name.split(".")[0]]
        assert record.weight_grad_norm == pytest.approx(norm, rel=1e-6), name
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), user_grads, strict=True))
    assert not any(p._post_accumulate_grad_hooks for p in net.parameters())


def test_off_the_cpu_the_probe_keeps_no_output_or_gradient_and_its_nan_inf_records_are_unchanged(monkeypatch):
    """On an accelerator the eager taps keep each output and output gradient to the step's end, in case their
    fast statistics met NaN/Inf (hooks._checked_now, patched here to say "not on the CPU"). The probe's one pass
    takes the exact masked statistics at once instead: nothing is held, and the records are those of the CPU's
    checked-on-the-spot path, NaN and Inf counts included."""
    import steadygrad.measure.hooks as hooks

    net = build(NetSpec(depth=5, width=32, in_features=8, activation="tanh"), torch.Generator().manual_seed(0))
    with torch.no_grad():
        net.block02.linear.weight[0, 0] = math.nan
        net.block03.linear.weight[1, 1] = math.inf
    x, targets = _x(16, 8), torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    on_the_cpu = probe(net, x, targets=targets)
    # a built MLP gets the mean-field prediction, which NaN/Inf weights have no value for: left out, and said so
    assert "no mean-field prediction: a weight, a bias or the input holds NaN or Inf" in on_the_cpu.notes

    held = []
    finalize = hooks.Recorder.finalize

    def spy(self, *args, **kwargs):
        held.extend(len(s.outputs) + len(s.grads) for s in self._slots.values())
        return finalize(self, *args, **kwargs)

    monkeypatch.setattr(hooks, "_checked_now", lambda t: False)
    monkeypatch.setattr(hooks.Recorder, "finalize", spy)
    off_the_cpu = probe(net, x, targets=targets)
    assert held and not any(held)  # no tensor kept to the pass's end
    assert [r.label for r in off_the_cpu.records] == [r.label for r in on_the_cpu.records]
    for kept_nothing, checked in zip(off_the_cpu.records, on_the_cpu.records, strict=True):
        a, b = kept_nothing.to_dict(), checked.to_dict()
        assert a.keys() == b.keys()
        for field, value in a.items():
            if isinstance(value, float):  # exact float64 against float32 sums checked on the spot
                assert b[field] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), (kept_nothing.label, field)
            else:
                assert b[field] == value, (kept_nothing.label, field)
    records = {r.name: r for r in off_the_cpu.records}
    assert records["block02"].nonfinite_act > 0 and records["block03"].nonfinite_act > 0
    assert math.isfinite(records["block02"].act_std) and records["block01"].nonfinite_grad > 0
