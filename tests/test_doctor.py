"""The doctor on a zoo of broken models: the expected finding, and a top fix that measurably trains better."""

import copy
import importlib

import pytest
import torch
from torch import nn

from steadygrad import data
from steadygrad import doctor as doctor_fn
from steadygrad.fixes import init_matched, insert_norm, standardize_inputs, swap_activation
from steadygrad.nets import NetSpec, build

dg = importlib.import_module("steadygrad.diagnose")  # the module: steadygrad.diagnose is the function

# A cap, not a timing assumption: every trial runs to its step count well within it on an idle machine, and a
# loaded CI machine must not turn a slow run into a different result (candidates skipped for the budget).
BUDGET = 600


@pytest.fixture(scope="module")
def digits():
    d = data.digits(standardize=False)
    mean, std = d.x_train.mean(0), d.x_train.std(0).clamp(min=1e-6)
    return (d.x_train[:512] - mean) / std, d.x_train[:512], d.y_train[:512]


def mlp(**spec):
    return lambda: build(NetSpec(in_features=64, width=64, **spec))


def dead_relus():
    net = build(NetSpec(depth=4, width=64, in_features=64, init="he_normal"))
    with torch.no_grad():
        for block in net.blocks:
            block.linear.bias.fill_(-5.0)  # every unit starts (and stays) off
    return net


class ExplodingRNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(4, 32, batch_first=True)
        self.out = nn.Linear(32, 1)
        with torch.no_grad():
            self.rnn.weight_hh_l0.normal_(0, 3.0 / 32**0.5)  # spectral radius about 3

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


ZOO = {
    "deep_sigmoid": (mlp(depth=10, activation="sigmoid", init="glorot_uniform"), "vanishing_gradients"),
    "tiny_init": (mlp(depth=8, activation="tanh", init="small_normal"), "vanishing_gradients"),
    "huge_init": (mlp(depth=8, activation="tanh", init="large_normal"), "saturated_activations"),
    "identical_init": (mlp(depth=4, activation="tanh", init="identical"), "symmetric_units"),
    "dead_relus": (dead_relus, "dead_units"),
    "plain_50_layers": (mlp(depth=50, activation="tanh", init="glorot_normal"), "deep_without_skips"),
}


@pytest.mark.parametrize("name", list(ZOO))
def test_broken_models_get_their_finding_and_a_fix_that_works(digits, name):
    factory, expected = ZOO[name]
    x, _, y = digits
    report = doctor_fn(factory, x, y, budget=BUDGET)
    assert expected in [f.kind for f in report.findings]
    best = report.recommended
    assert best is not None, report.summary()
    assert min(best.improvements(report.control)) >= report.margin  # in every seed, on held-out loss
    assert best is report.candidates[0] and best.patch


def test_exploding_rnn(digits):
    x = torch.randn(256, 50, 4, generator=torch.Generator().manual_seed(0))
    report = doctor_fn(ExplodingRNN, x, task="regression", budget=BUDGET)
    assert "exploding_over_time" in [f.kind for f in report.findings]
    assert report.recommended is not None and report.recommended.held_out_loss < 0.9 * report.control.held_out_loss


def test_unstandardized_inputs(digits):
    _, raw, y = digits
    report = doctor_fn(mlp(depth=3), raw * 16, y, budget=BUDGET)  # 0-255 pixels
    assert "noncentred_inputs" in [f.kind for f in report.findings]
    assert report.recommended is not None and report.recommended.fix == "standardize the inputs"


def test_a_healthy_model_gets_no_serious_finding_and_no_change(digits):
    x, _, y = digits
    report = doctor_fn(mlp(depth=6, init="he_normal", norm="batch", skip="residual", bias=False), x, y, budget=BUDGET)
    assert not [f for f in report.findings if f.severity in ("warning", "critical")]
    assert report.recommended is None and report.patch() == ""
    assert "No change recommended" in report.summary() or "no change recommended" in report.summary()


def test_the_users_model_is_never_modified(digits):
    x, _, y = digits
    model = build(NetSpec(depth=6, width=64, in_features=64, activation="sigmoid", init="glorot_uniform"))
    before = copy.deepcopy(model.state_dict())
    report = doctor_fn(model, x, y, budget=BUDGET)
    assert report.findings
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert all(type(m) is not nn.ReLU for m in model.modules())  # swap_activation worked on copies


class Odd(nn.Module):
    """Custom modules, dict output, a frozen layer and a buffer."""

    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2)
        self.head = nn.Linear(16, 3)
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        return {"logits": self.head(self.frozen(self.enc(x)).mean(1)) * self.scale, "aux": x.sum()}


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3))), None


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.GRU(4, 16, batch_first=True)
        self.out = nn.Linear(16, 5)

    def forward(self, x):
        return self.out(self.lstm(x)[0][:, -1])


@pytest.mark.parametrize(
    ("factory", "shape", "classes"),
    [(Odd, (6, 16), 3), (ConvNet, (3, 8, 8), 10), (LSTMNet, (12, 4), 5)],
    ids=["transformer", "conv", "gru"],
)
def test_models_it_has_never_seen(factory, shape, classes):
    x = torch.randn(128, *shape, generator=torch.Generator().manual_seed(0))
    report = doctor_fn(factory, x, classes=classes, budget=BUDGET)
    assert report.control.ok, report.control.error
    assert all(not t.error for t in report.candidates), [t.error for t in report.candidates]
    assert report.to_dict()["loss_name"] == "cross-entropy (N, C), ignore_index=-100"  # the trials' loss, said


def test_budget_skips_what_does_not_fit(digits):
    x, _, y = digits
    report = doctor_fn(mlp(depth=10, activation="sigmoid", init="glorot_uniform"), x, y, budget=0.0)
    assert report.candidates == [] and any("budget" in s for s in report.skipped)


def test_fixes_are_usable_directly(digits):
    x, raw, _ = digits
    net = build(NetSpec(depth=3, width=16, in_features=64, activation="tanh"))
    normed = insert_norm(net, "batch")
    assert sum("BatchNorm" in type(m).__name__ for m in normed.modules()) == 3  # not after the output layer
    assert normed(x[:4]).shape == (4, 10)
    swapped = swap_activation(net, "relu")
    assert not any(isinstance(m, nn.Tanh) for m in swapped.modules()) and any(
        isinstance(m, nn.Tanh) for m in net.modules()
    )
    init_matched(swapped)
    wrapped = standardize_inputs(net, raw)
    torch.testing.assert_close(
        wrapped(raw[:4]), net((raw[:4] - raw.mean(0)) / raw.std(0).clamp(min=1e-12)), atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match="found no Sigmoid or Tanh"):
        swap_activation(build(NetSpec(depth=2, width=8, in_features=4)), "relu")


def test_bad_arguments(digits):
    x, _, y = digits
    with pytest.raises(TypeError, match="needs a model factory"):
        doctor_fn(42, x, y)
    with pytest.raises(ValueError, match="Unknown optimizer"):
        doctor_fn(mlp(depth=2), x, y, optimizer="lbfgs")
    with pytest.raises(ValueError, match="targets has 3 entries"):
        doctor_fn(mlp(depth=2), x, y[:3])


candidates_module = importlib.import_module("steadygrad.doctor._candidates")


def test_every_fix_action_has_a_candidate_builder():
    # Fix() rejects any action outside ACTIONS, so this covers every fix a rule can produce; no action is advice-only
    assert candidates_module.check_registry() == []
    with pytest.raises(ValueError, match="unknown fix action 'prune'"):
        candidates_module.candidate("prune")
    with pytest.raises(ValueError, match="'add_norm' is already registered"):
        candidates_module.candidate("add_norm")(lambda fix, ctx: [])


def _context(model, x):
    from steadygrad.doctor import Settings

    return candidates_module.Context(model, x, 0.5, Settings("momentum", 1e-2), 0, 60)


def test_candidates_follow_the_findings_order_once_each():
    # every action but rebuild, which names the spec fields it changes (tests/test_diagnose_attention.py)
    actions = [action for action in reversed(dg.ACTIONS) if action != "rebuild"]
    fixes = [dg.Fix(action) for action in actions] + [dg.Fix("reinit", {"scheme": "orthogonal"})]
    finding = dg.Finding("k", "warning", [], {}, "m", fixes)
    x = torch.randn(8, 4)
    residual = build(NetSpec(depth=3, width=8, in_features=4, skip="residual"))
    candidates, skipped = candidates_module.candidates_for([finding], _context(residual, x))
    names = [c.name for c in candidates]
    # the prompted builders first, in the finding's order (ACTIONS reversed, the unprompted-only ones left out)
    assert names[0] == "drop the bias before each BatchNorm"
    assert names[1] == "swap sigmoid/tanh for relu (and re-initialize)"
    assert len(names) == len(set(names)) and skipped == []
    assert all(c.prompted for c in candidates if c.fix.action in {f.action for f in fixes})
    assert next(c for c in candidates if c.name.startswith("clip")).changes.clip_norm == 0.5
    assert "Fixup initialization" in names and "learning-rate warmup over 15 steps" in names
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    candidates, skipped = candidates_module.candidates_for([finding], _context(plain, x))
    assert "Fixup initialization" not in [c.name for c in candidates]
    assert len(skipped) == 1 and skipped[0].startswith("residual skips: the model is not")
