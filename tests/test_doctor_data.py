"""The doctor on the user's pieces: data in every form, the loss, the optimizer and schedule, the precision; the
held-out split, the repeats, the recommendation rule, and failures shown in words."""

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import steadygrad as sg
from steadygrad.diagnose import Finding, Fix
from steadygrad.doctor import Batch, DoctorReport, Repeat, Settings, Trial, split_data
from steadygrad.doctor._candidates import Candidate
from steadygrad.doctor._run import _applicable, prior_loss
from steadygrad.doctor._trial import Changes, make_training_optimizer
from steadygrad.fixes import insert_norm

G = torch.Generator().manual_seed(0)
X = torch.randn(128, 8, generator=G)
Y = (X[:, 0] > 0).long()


def mlp():
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))


# -- data ---------------------------------------------------------------------------------------------------------


def _rows(split) -> set[tuple]:
    return {tuple(row.tolist()) for part in split for b in part for row in b.inputs}


def test_rows_are_split_into_disjoint_training_and_held_out_batches():
    split = split_data((X, Y), batch_size=16, seed=0)
    train, held = _rows([split.train]), _rows([split.held_out])
    assert not train & held and len(train) + len(held) == 128
    assert len(held) == int(128 * 0.2) and all(len(b.inputs) == 16 for b in split.train[:-1])
    for b in split.train:  # the targets travel with their rows
        assert torch.equal(b.targets, (b.inputs[:, 0] > 0).long())


@pytest.mark.parametrize(
    "form",
    ["dataset", "loader", "generator", "dicts"],
)
def test_every_form_of_data_gives_batches_with_some_held_out(form):
    dataset = TensorDataset(X, Y)
    data = {
        "dataset": dataset,
        "loader": DataLoader(dataset, batch_size=16),
        "generator": ((X[i : i + 16], Y[i : i + 16]) for i in range(0, 128, 16)),
        "dicts": [{"x": X[i : i + 16]} for i in range(0, 128, 16)],
    }[form]
    split = split_data(data, batch_size=16)
    assert split.train and split.held_out
    assert all(isinstance(b, Batch) for b in split.train + split.held_out)
    if form == "dicts":
        assert isinstance(split.train[0].inputs, dict) and split.train[0].targets is None


def test_one_batch_from_a_loader_is_split_by_rows_and_bad_data_says_what_is_accepted():
    split = split_data(DataLoader(TensorDataset(X, Y), batch_size=128), batch_size=16)
    assert split.held_out and not _rows([split.train]) & _rows([split.held_out])
    with pytest.raises(ValueError, match="yielded no batch"):
        split_data([], batch_size=16)
    with pytest.raises(ValueError, match="A batch of 3 items is ambiguous"):
        split_data([(X, Y, Y), (X, Y, Y)])
    with pytest.raises(TypeError, match="a Dataset, a DataLoader or an iterable"):
        split_data(42)
    with pytest.raises(ValueError, match="at least 4 examples"):
        split_data((X[:3], Y[:3]))


def test_without_targets_a_teacher_makes_learnable_ones():
    report = sg.doctor(mlp, data=X, budget=300)
    assert any("teacher" in n for n in report.notes)
    assert report.control.ok and not [f for f in report.findings if f.kind == "not_learning"]
    assert report.control.loss_drop > 0.1  # the held-out loss falls: there is something to learn


def test_an_hf_batch_trains_the_models_own_loss():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    ids = (torch.randint(0, 32, (64, 1), generator=G) + torch.arange(8)) % 32
    report = sg.doctor(
        lambda: transformers.GPT2LMHeadModel(config),
        data={"input_ids": ids, "labels": ids},
        optimizer="adamw",
        steps=5,
        repeats=1,
        budget=300,
    )
    assert report.loss_name == "the model's own loss (output.loss)"
    assert report.control.ok
    # next-token targets given as targets: the sequence cross-entropy, per position
    report = sg.doctor(
        lambda: transformers.GPT2LMHeadModel(config),
        data=(ids[:, :-1], ids[:, 1:]),
        optimizer="adamw",
        steps=5,
        repeats=1,
        budget=300,
    )
    assert "per position" in report.loss_name and report.control.ok


# -- optimizer, schedule, precision, loss -------------------------------------------------------------------------


def test_the_users_optimizer_and_schedule_are_the_ones_trained_with():
    made, stepped = [], []

    def optimizer(params):
        opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1, betas=(0.8, 0.99))
        made.append(opt)
        return opt

    class Counting(torch.optim.lr_scheduler.LambdaLR):
        def step(self, *args, **kwargs):
            stepped.append(1)
            super().step(*args, **kwargs)

    report = sg.doctor(
        mlp,
        data=(X, Y),
        optimizer=optimizer,
        schedule=lambda o: Counting(o, lambda s: 1.0),
        steps=7,
        repeats=2,
        workers=1,
        budget=300,
    )
    assert report.control.ok and made and made[0].defaults["betas"] == (0.8, 0.99)
    runs = 2 * (1 + len(report.candidates))
    assert len(stepped) == 8 * runs  # every run builds its schedule (one step there) and steps it once per step
    scaled = make_training_optimizer(Settings(optimizer, None), Changes(lr_factor=0.1), [nn.Parameter(torch.ones(1))])
    assert scaled.param_groups[0]["lr"] == pytest.approx(3e-4)


def test_bf16_autocast_trains():
    report = sg.doctor(mlp, data=(X, Y), precision="bf16", steps=5, repeats=1, budget=300)
    assert report.control.ok
    with pytest.raises(ValueError, match=r"Unknown precision 'fp8'\. Accepted: float32, bf16"):
        sg.doctor(mlp, data=(X, Y), precision="fp8")


def test_a_loss_that_cannot_train_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match=r"returned \(128, 2\)|not a scalar"):
        sg.doctor(mlp, data=(X, Y), loss=lambda out, y: out)
    with pytest.raises(ValueError, match="while the model's outputs are finite"):
        sg.doctor(mlp, data=(X, Y), loss=lambda out, y: out.sum() * math.inf)
    with pytest.raises(ValueError, match="either data= or inputs="):
        sg.doctor(mlp, X, data=X)


def test_the_prior_loss_is_the_label_frequencies_cross_entropy():
    split = split_data((X, Y), batch_size=16)
    train = torch.cat([b.targets for b in split.train])
    held = torch.cat([b.targets for b in split.held_out])
    p = (torch.bincount(train, minlength=2).double() + 0.5) / (len(train) + 1.0)
    expected = torch.nn.functional.nll_loss(p.log()[None].expand(len(held), 2), held)
    assert prior_loss(split, "cross-entropy (N, C), ignore_index=-100") == pytest.approx(float(expected))


# -- the rule, the table and the JSON -----------------------------------------------------------------------------


def _trial(name, losses, action="reinit", prompted=True, **repeat):
    return Trial(
        name,
        action,
        "patch",
        prompted,
        [Repeat(s, held_out_loss=v, initial_held_out_loss=2.0, **repeat) for s, v in enumerate(losses)],
    )


def _report(candidates, severity="warning"):
    finding = Finding("k", severity, [], {}, "m")
    return DoctorReport([finding], _trial("control", [1.0, 1.0, 1.0], ""), candidates, repeats=3)


def test_a_fix_is_recommended_only_when_it_wins_in_every_seed():
    every = _trial("every", [0.9, 0.9, 0.94])
    median = _trial("median", [0.5, 0.6, 1.2])
    assert _report([every]).recommended is every
    report = _report([median, every])
    assert report.recommended is every  # the better median loses a seed: the steady one is recommended
    only_median = _report([median])
    assert only_median.recommended is None and only_median.uncertain is median
    assert "not in every seed" in only_median.summary() and only_median.patch() == "patch"
    assert _report([every], severity="info").recommended is None  # a healthy model: tuning, not a fix
    setting, fix = _trial("lr", [0.2, 0.2, 0.2], "lower_lr", False), _trial("fix", [0.8, 0.8, 0.8])
    assert _report([setting, fix]).recommended is fix  # the cause before the workaround


def test_a_failure_shows_in_words_never_a_bare_nan():
    crashed = _trial("crashed", [math.nan], error="RuntimeError: mat1 and mat2 shapes cannot be multiplied")
    diverged = _trial("diverged", [math.nan] * 3, nonfinite_step=4)
    report = _report([crashed, diverged])
    text = str(report)
    assert "RuntimeError: mat1 and mat2" in text and "diverged (NaN/Inf at step 4) in 3 of 3 repeats" in text
    assert "nan" not in text.lower().replace("nan/inf", "")
    blob = json.dumps(report.to_dict(), allow_nan=False)  # strict JSON: NaN would raise
    assert "RuntimeError: mat1" in blob


def test_a_fix_that_cannot_apply_is_skipped_with_its_error():
    class Tokens(nn.Module):  # (N, T, C) activations: BatchNorm1d would read T as channels
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    c = Candidate("insert BatchNorm after each layer", Fix("add_norm"), lambda m: insert_norm(m, "batch"), "")
    skipped = []
    kept = _applicable([c], lambda s: Tokens(), 0, Batch(torch.randn(4, 5, 8)), Settings(), skipped)
    assert kept == [] and skipped and "does not apply to this model (ValueError: batch_norm" in skipped[0]


def test_the_json_has_the_documented_schema():
    report = sg.doctor(mlp, data=(X, Y), steps=5, budget=300)
    out = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert {
        "findings",
        "control",
        "candidates",
        "recommended",
        "uncertain",
        "margin",
        "repeats",
        "skipped",
        "notes",
        "patch",
        "loss_name",
        "seconds",
    } <= set(out)
    assert len(out["control"]["repeats"]) == 3 and out["repeats"] == 3
    first = out["candidates"][0]
    assert {"fix", "action", "held_out_loss", "held_out_spread", "improvement", "repeats", "error"} <= set(first)
    assert [r["seed"] for r in first["repeats"]] == [0, 1, 2]
    assert all("held_out_loss" in r for r in first["repeats"])


def test_each_seed_draws_its_own_reinitialization():
    report = sg.doctor(mlp, data=(X, Y), steps=3, budget=300)
    reinit = next(t for t in report.candidates if t.action == "reinit" and t.fix.startswith("re-initialize"))
    starts = [r.initial_held_out_loss for r in reinit.repeats]
    assert len(set(starts)) == len(starts) == 3  # not one draw repeated


def test_a_fix_no_better_than_predicting_without_inputs_is_not_recommended():
    control = _trial("control", [50.0, 50.0, 50.0], "")
    blown, learns = _trial("blown", [5.0, 5.0, 5.0]), _trial("learns", [0.5, 0.5, 0.5], "lower_lr", False)
    finding = Finding("dead_units", "warning", [], {}, "m")
    report = DoctorReport([finding], control, [blown, learns], repeats=3, prior_loss=1.4)
    assert report.recommended is learns
    # only the control's own training is wrong: only the fixes its finding names may be recommended
    slow = Finding("not_learning", "warning", [], {}, "m", [Fix("raise_lr")])
    fast = _trial("lr x 10", [0.5, 0.5, 0.5], "raise_lr", False)
    report = DoctorReport([slow], control, [_trial("reinit", [0.4, 0.4, 0.4]), fast], repeats=3, prior_loss=1.4)
    assert report.recommended is fast
