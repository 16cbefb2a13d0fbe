import copy
import importlib
import math

import pytest
import torch
from torch import nn

from steadygrad.measure import FlowReport, LayerRecord
from steadygrad.nets import NetSpec, build

dg = importlib.import_module("steadygrad.diagnose")  # the module: steadygrad.diagnose is the function


def report(grads=(1.0, 1.0, 1.0), stds=(1.0, 1.0, 1.0), step=None, **fields):
    records = []
    for i, (g, s) in enumerate(zip(grads, stds, strict=True)):
        extra = {k: v[i] for k, v in fields.items()}
        records.append(LayerRecord(name=f"layer{i}", kind="Linear+Tanh", index=i, grad_norm=g, act_std=s, **extra))
    # the output layer, after the hidden ones: the depth rules read the hidden layers' series
    records.append(LayerRecord(name="head", kind="Linear", index=len(records), grad_norm=1.0, act_std=1.0))
    return FlowReport(records=records, step=step)


def kinds(findings):
    return [f.kind for f in findings]


def test_healthy_report_has_no_findings():
    assert dg.diagnose(report()) == []


def test_vanishing_is_relative_across_depth():
    found = dg.diagnose(report(grads=(1e-5, 1e-2, 1.0)))
    assert kinds(found) == ["vanishing_gradients"]
    assert found[0].layers == ["layer0"] and found[0].evidence["first_to_last_ratio"] == pytest.approx(1e-5)
    assert {f.action for f in found[0].fixes} >= {"reinit", "add_norm", "add_skips", "swap_activation"}
    assert kinds(dg.diagnose(report(grads=(2e-3, 1.0, 1.0)))) == []  # above the 1e-3 threshold
    # uniformly small gradients are a small loss, not a vanishing one: the same net with the loss scaled by 1e-8
    assert kinds(dg.diagnose(report(grads=(1e-8, 5e-8, 5e-8)))) == []


def test_exploding_across_layers_and_over_steps():
    assert kinds(dg.diagnose(report(grads=(1e4, 10.0, 1.0)))) == ["exploding_gradients"]
    early = report(step=1, weight_grad_norm=(1.0, 1.0, 1.0))
    late = report(step=50, weight_grad_norm=(500.0, 1.0, 1.0))
    found = dg.diagnose([early, late])
    assert kinds(found) == ["exploding_gradients"] and found[0].evidence["growth_over_steps"] > 100
    clip = next(f for f in found[0].fixes if f.action == "clip")
    assert clip.params["mode"] == "norm" and clip.params["threshold"] > 0


def test_nonfinite_is_critical_and_first():
    found = dg.diagnose(report(step=7, nonfinite_act=(0, 3, 9), grads=(1e-6, 1.0, 1.0)))
    assert found[0].kind == "nonfinite" and found[0].severity == "critical"
    assert found[0].evidence["first_layer"] == "layer1" and "step 7" in found[0].message


def test_saturation_dead_and_signal():
    assert kinds(dg.diagnose(report(saturated=(0.2, 0.7, math.nan)))) == ["saturated_activations"]
    assert kinds(dg.diagnose(report(dead=(0.9, 0.1, math.nan)))) == ["dead_units"]
    assert kinds(dg.diagnose(report(dead=(0.5, 0.1, math.nan)))) == []  # "over half": 0.5 is not
    assert kinds(dg.diagnose(report(stds=(1.0, 0.5, 0.01)))) == ["poor_signal_propagation"]
    assert kinds(dg.diagnose(report(stds=(1.0, 0.01, 5.0)))) == []  # first to last depth: 5x, within 10x


def test_update_ratio_out_of_range():
    high = [report(step=s, update_ratio=(0.5, 0.3, 1e-3)) for s in (1, 2, 3)]
    low = [report(step=s, update_ratio=(1e-7, 1e-3, 1e-3)) for s in (1, 2, 3)]
    assert kinds(dg.diagnose(high)) == ["update_ratio_high"] and dg.diagnose(high)[0].severity == "warning"
    # one layer's steps large against the others': its weights are small (a small-init head), not the rate high
    one = dg.diagnose([report(step=s, update_ratio=(0.5, 1e-3, 1e-3)) for s in (1, 2, 3)])
    assert kinds(one) == ["update_ratio_high"] and one[0].severity == "info" and one[0].layers == ["layer0"]
    assert kinds(dg.diagnose(low)) == ["update_ratio_low"]
    # a norm's gain barely moving is no sign of a low learning rate (a fine-tune at 5e-5 keeps LayerNorms near 1)
    for r in low:
        r.records[0].kind = "LayerNorm"
    assert kinds(dg.diagnose(low)) == []
    # weights that were exactly zero before an update (ratio inf) grow from zero: their ratio is ~1/t, not the rate
    from_zero = [report(step=s, update_ratio=(r, 1e-3, 1e-3)) for s, r in ((1, math.inf), (2, 1.0), (3, 0.5))]
    assert kinds(dg.diagnose(from_zero)) == []


def test_model_rules_symmetry_and_bias_before_batchnorm():
    net = build(NetSpec(depth=2, width=8, in_features=4, init="identical"))
    found = dg.diagnose(report(), model=net)
    assert found[0].kind == "symmetric_units" and "block01.linear" in found[0].layers
    bn = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8))
    found = dg.diagnose(report(), model=bn)
    assert kinds(found) == ["bias_before_batchnorm"] and found[0].layers == ["0"]


def test_input_rule():
    positive = torch.rand(100, 5) * 16
    assert kinds(dg.diagnose(report(), inputs=positive)) == ["noncentred_inputs"]
    assert kinds(dg.diagnose(report(), inputs=torch.randn(100, 5))) == []


def test_findings_serialize_and_read_well():
    (finding,) = dg.diagnose(report(grads=(1e-5, 1e-2, 1.0)))
    data = finding.to_dict()
    assert data["kind"] == "vanishing_gradients" and data["fixes"][0]["action"] == "reinit"
    assert str(finding).startswith("[warning] Gradients vanish")
    with pytest.raises(TypeError, match="takes a FlowReport"):
        dg.diagnose([])


def test_an_unknown_fix_action_is_rejected_where_the_fix_is_made():
    with pytest.raises(ValueError, match=r"Unknown fix action 'reinitialise'\. Accepted: reinit, add_norm"):
        dg.Fix("reinitialise")
    assert all(str(dg.Fix(action)) == action for action in dg.ACTIONS)


def test_structural_rules_deep_plain_stack_and_exposed_tanh():
    deep = nn.Sequential(*[m for _ in range(20) for m in (nn.Linear(4, 4), nn.Tanh())])
    found = dg.architecture_findings(deep)
    assert kinds(found) == ["deep_without_skips", "saturating_without_norm"]
    assert found[0].layers == ["0", "38"] and found[0].evidence == {"weight_layers": 20}
    assert found[1].evidence == {"activations": 20}
    shallow = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    assert dg.architecture_findings(shallow) == []
    assert dg.architecture_findings(build(NetSpec(depth=25, width=8, in_features=4, skip="residual"))) == []


class _RNN(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.rnn = nn.RNN(3, 16, batch_first=True)
        with torch.no_grad():
            self.rnn.weight_hh_l0.normal_(0, scale / 16**0.5, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return self.rnn(x)[0][:, -1]


def test_recurrent_rule_along_time():
    x = torch.randn(16, 40, 3, generator=torch.Generator().manual_seed(0))

    def loss(out):
        return out.pow(2).mean()

    exploding = _RNN(3.0)
    before = copy.deepcopy(exploding.state_dict())
    found = dg.recurrent_findings(exploding, x, loss)
    assert kinds(found) == ["exploding_over_time"] and found[0].layers == ["rnn"]
    assert found[0].evidence["steps"] == 40 and [f.action for f in found[0].fixes] == ["clip", "reinit", "lower_lr"]
    assert all(torch.equal(v, before[k]) for k, v in exploding.state_dict().items())  # ran on a copy
    assert kinds(dg.recurrent_findings(_RNN(0.05), x, loss)) == ["vanishing_over_time"]
    assert dg.recurrent_findings(_RNN(3.0), x[:, :1], loss) == []  # one step: nothing to compare
    assert dg.recurrent_findings(nn.Linear(3, 3), x, loss) == []  # no recurrent layer


def test_relu6_after_a_layer_is_not_a_saturating_unit():
    """MobileNet-style blocks feed ReLU6 (which torch derives from Hardtanh) straight from a convolution: a
    rectifier, so the saturating-without-norm rule stays quiet, while tanh in the same place is reported."""
    healthy = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU6(), nn.Conv2d(8, 8, 1), nn.ReLU6(), nn.Flatten())
    assert not [f for f in dg.architecture_findings(healthy) if f.kind == "saturating_without_norm"]
    exposed = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    assert [f.kind for f in dg.architecture_findings(exposed)] == ["saturating_without_norm"]


@pytest.mark.parametrize("radius, expected", [(1.6, "exploding_over_time"), (0.3, "vanishing_over_time"), (1.0, None)])
def test_a_recurrence_written_by_hand_is_deep_in_time(radius, expected):
    from steadygrad.measure import probe

    torch.manual_seed(0)
    from tests.zoo import HandWrittenRecurrence

    model, steps = HandWrittenRecurrence(radius), 20
    report = probe(model, torch.randn(8, steps, 4))
    findings = {f.kind: f for f in dg.diagnose(report)}
    over_time = {k for k in findings if k.endswith("_over_time")}
    assert over_time == ({expected} if expected else set())
    if expected:
        finding = findings[expected]
        assert set(finding.layers) == {"inp", "rec"}  # one finding for the recurrence, both its projections
        # the per-call records give radius^(T-1) exactly (orthogonal W: every direction scales alike)
        measured = finding.evidence["first_to_last_call_ratio"]["rec"]
        assert measured == pytest.approx(radius ** (steps - 1), rel=1e-3)
        assert finding.evidence["calls"]["rec"] == steps


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("transformer.h.3.attn.c_attn", "transformer.h.*.attn.c_attn"),
        ("layer2.1.conv1", "layer*.*.conv1"),  # a block's conv1 and conv2 are different roles
        ("layer2.0.mlp.2", "layer*.*.mlp.2"),  # an nn.Sequential inside a block: mlp.0 and mlp.2 differ too
        ("block07", "block*"),  # no enclosing index: the depth is in the layer's own name
        ("3", "*"),
        ("head", "head"),
    ],
)
def test_name_templates_replace_depth_indices(name, expected):
    assert dg.template(name) == expected


def named_report(rows):
    """rows: (name, kind, grad_norm, act_std)."""
    records = [LayerRecord(name=n, kind=k, index=i, grad_norm=g, act_std=s) for i, (n, k, g, s) in enumerate(rows)]
    return FlowReport(records=records)


def test_depth_rules_compare_the_same_layer_across_depth():
    """Attention queries get a tiny gradient at init (a near-uniform softmax) at every depth: a flat series, not
    vanishing; an embedding's std of 0.02 against a norm's 1 is not poor propagation."""
    rows = [("emb", "Embedding", 1.0, 0.02)]
    for depth in range(3):
        rows += [(f"h.{depth}.ln", "LayerNorm", 1.0, 1.0), (f"h.{depth}.q", "Linear", 1e-5, 0.1)]
        rows += [(f"h.{depth}.out", "Linear", 1.0, 0.01)]
    rows.append(("head", "Linear", 1.0, 0.1))
    assert dg.diagnose(named_report(rows)) == []
    rows[2] = ("h.0.q", "Linear", 1e-9, 0.1)  # the first query's gradient is 1e-4 of the last one's
    (found,) = dg.diagnose(named_report(rows))
    assert found.kind == "vanishing_gradients" and found.layers == ["h.0.q"]
    assert found.evidence["series"] == {"h.*.q (Linear)": pytest.approx(1e-4)}


def test_exactly_zero_gradients_say_why():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    nn.init.zeros_(model[2].weight)
    rows = [("0", "Linear", 0.0, 1.0), ("1", "ReLU", 0.0, 0.5), ("2", "Linear", 1.0, 0.0)]
    (found,) = dg.diagnose(named_report(rows), model=model)
    assert found.kind == "zero_gradients" and found.severity == "info" and found.layers == ["0 (Linear)", "1 (ReLU)"]
    assert found.evidence == {"cause": "zero_init", "blocked_by": {"2 (Linear)": 2}}
    dead = named_report([*rows[:1], ("1", "ReLU", 1.0, 0.0), ("2", "Linear", 1.0, 0.1)])
    dead.records[1].dead = 1.0
    found = [f for f in dg.diagnose(dead) if f.kind == "zero_gradients"]
    assert found[0].severity == "warning" and found[0].evidence["cause"] == "dead"
    unexplained = dg.diagnose(named_report([("a", "Linear", 0.0, 1.0), ("b", "Linear", 1.0, 1.0)]))
    assert [(f.kind, f.severity, f.evidence["cause"]) for f in unexplained] == [
        ("zero_gradients", "warning", "unknown")
    ]


def test_a_zero_head_is_not_a_symmetry_but_two_zero_layers_are():
    """Row i of a zero-initialized head gets output i's gradient, which differs per output; a zero hidden layer
    before a zero head gets no gradient difference (or any gradient) at all."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    nn.init.zeros_(model[4].weight)
    assert dg.diagnose(report(), model=model) == []
    nn.init.zeros_(model[2].weight)
    found = dg.diagnose(report(), model=model)
    assert kinds(found) == ["symmetric_units"] and found[0].layers == ["2"]


def test_integer_inputs_and_small_batches_get_no_centring_finding():
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    assert dg.diagnose(report(), inputs=ids) == []
    assert dg.diagnose(report(), inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)}) == []
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # |mean|/std ~ 0.4 by chance
    assert dg.diagnose(report(), inputs={"pixel_values": images}) == []
    assert kinds(dg.diagnose(report(), inputs={"pixel_values": images + 3})) == ["noncentred_inputs"]


def test_layer_gain_is_the_variance_scaling_factor():
    layer = nn.Linear(256, 128)
    nn.init.normal_(layer.weight, std=(2 / 256) ** 0.5, generator=torch.Generator().manual_seed(0))  # He
    assert dg.layer_gain(layer) == pytest.approx(2**0.5, rel=0.02)
    conv = nn.Conv2d(8, 16, 3)
    nn.init.normal_(conv.weight, std=(1 / 72) ** 0.5, generator=torch.Generator().manual_seed(0))  # LeCun
    assert dg.layer_gain(conv) == pytest.approx(1.0, rel=0.05)
    assert dg.layer_gain(nn.LayerNorm(8)) is None


def test_masks_and_tiny_batches_get_no_centring_finding_and_a_real_one_names_its_input():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(4, 17, (8,), generator=g)
    mask = (torch.arange(16)[None] < lengths[:, None]).float()  # HF takes float 0/1 masks
    x = torch.randn(8, 16, generator=g)
    assert dg.diagnose(report(), inputs={"x": x, "mask": mask}) == []
    assert dg.diagnose(report(), inputs=torch.randn(2, 64, generator=g) + 0.5) == []  # 2 samples say nothing
    (finding,) = dg.diagnose(report(), inputs={"mask": mask, "features": x.abs() + 1})  # the mask is skipped
    assert finding.layers == ["features"] and "input 'features' is not zero-centred" in finding.message


@pytest.mark.parametrize("gain, expected", [(3.0, {"exploding_over_time"}), (1.0, set())])
def test_an_nn_rnn_is_read_along_time_by_diagnose_as_a_python_loop_is(gain, expected):
    from steadygrad.measure import probe

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.RNN(16, 32, nonlinearity="relu", batch_first=True), nn.Linear(32, 2)
            nn.init.orthogonal_(self.rnn.weight_hh_l0, gain=gain)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    model, x = Recurrent(), torch.randn(8, 20, 16)
    found = {f.kind for f in dg.diagnose(probe(model, x), model=model, inputs=x)}
    assert {k for k in found if k.endswith("_over_time")} == expected


def test_the_loss_at_init_is_read_against_ln_classes():
    from steadygrad.measure import probe

    torch.manual_seed(0)
    head = nn.Linear(8, 10)
    x, y = torch.randn(64, 8), torch.randint(0, 10, (64,))
    report = probe(head, x, y)
    assert report.chance_loss == pytest.approx(math.log(10)) and "loss_at_init_high" not in kinds(dg.diagnose(report))
    with torch.no_grad():
        head.weight.mul_(100.0)  # confidently wrong logits
    loud = probe(head, x, y)
    (finding,) = [f for f in dg.diagnose(loud) if f.kind == "loss_at_init_high"]
    assert finding.evidence["times_chance"] == pytest.approx(loud.loss / math.log(10))
    assert loud.loss > dg.LOSS_AT_INIT * math.log(10)
    assert math.isnan(probe(head, x).chance_loss)  # the projection loss has no chance level


def test_only_the_features_are_read_for_centring_not_an_adjacency_after_them():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 12, 4, generator=g)
    adjacency = (torch.rand(8, 12, 12, generator=g) < 0.3).float()
    adjacency = adjacency / adjacency.sum(-1, keepdim=True).clamp(min=1)  # row-normalized: >= 0, not 0/1
    assert dg.diagnose(report(), inputs=(x, adjacency)) == []
    assert kinds(dg.diagnose(report(), inputs=(x.abs() + 1, adjacency))) == ["noncentred_inputs"]


def test_a_layer_that_gets_no_gradient_is_not_said_to_explode():
    from steadygrad.measure import probe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        model[2].weight.mul_(50.0)  # a huge layer ...
        model[2].bias.fill_(-1e4)  # ... whose ReLU is off on every sample
    x = torch.randn(16, 8)
    found = {f.kind: f for f in dg.diagnose(probe(model, x), model=model, inputs=x)}
    assert found["zero_gradients"].evidence["cause"] == "dead"
    assert "2 (Linear)" not in found.get("exploding_gradients", dg.Finding("", "", [], {}, "")).evidence.get(
        "layer_gain", {}
    )
