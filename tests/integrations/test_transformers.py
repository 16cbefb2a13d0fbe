"""SteadygradCallback in real Hugging Face Trainer runs, and the Monitor in a plain accelerate loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")
from steadygrad.integrations.transformers import SteadygradCallback  # noqa: E402
from steadygrad.measure import Monitor  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, length=16, vocab=64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=128):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x[:, :4].argmax(1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class MLP(nn.Module):
    """Any nn.Module the Trainer can train: it returns a dict with its loss."""

    def __init__(self, depth=3, width=16, activation=nn.Tanh, nan_from=None):
        super().__init__()
        torch.manual_seed(0)
        layers = []
        for i in range(depth):
            layers += [nn.Linear(8 if i == 0 else width, width), activation()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 4))
        self.nan_from, self.calls = nan_from, 0

    def forward(self, x, labels=None):
        if self.training and torch.is_grad_enabled():
            self.calls += 1
        if self.nan_from is not None and self.calls >= self.nan_from:
            x = x.clone()
            x[0, 0] = float("nan")
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(config)


def _args(tmp_path, **kwargs):
    options = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 8,
        "max_steps": 6,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "disable_tqdm": True,
        "use_cpu": True,
        "learning_rate": 1e-3,
        "seed": 0,
    }
    options.update(kwargs)
    return transformers.TrainingArguments(**options)


def test_gpt2_records_the_trainers_loss_at_the_scheduled_steps(tmp_path):
    callback = SteadygradCallback(every=2, update_every=1)
    trainer = transformers.Trainer(
        model=_gpt2(), args=_args(tmp_path, report_to=["tensorboard"]), train_dataset=Tokens(), callbacks=[callback]
    )
    trainer.train()
    assert [r.step for r in callback.reports] == [1, 3, 5]
    trainer_losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    for report in callback.reports:  # the loss the Trainer computed and logged for that step
        assert report.loss == pytest.approx(trainer_losses[report.step], rel=1e-4)
    linear = [rec for rec in callback.reports[1].records if rec.kind in ("Conv1D", "Linear")]
    assert linear and all(math.isfinite(rec.update_ratio) and rec.update_ratio > 0 for rec in linear)
    ours = [e for e in trainer.state.log_history if "steadygrad/loss" in e]
    assert [e["step"] for e in ours] == [1, 3, 5]
    assert callback.findings == []  # a freshly initialized GPT-2 is healthy
    final = trainer.state.log_history[-1]
    assert final["steadygrad_findings"] == []
    saved = json.loads((tmp_path / "steadygrad_findings.json").read_text())
    assert saved["logged_steps"] == [1, 3, 5]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for run in Path(tmp_path).rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(run))
        events.Reload()
        tags |= set(events.Tags()["scalars"])
    assert "steadygrad/loss" in tags and "steadygrad/transformer.h.0.attn.c_attn/grad_norm" in tags
    model = trainer.model
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    callback = SteadygradCallback(every=1)
    trainer = transformers.Trainer(
        model=MLP(),
        args=_args(tmp_path, gradient_accumulation_steps=2, max_steps=3),
        train_dataset=Rows(),
        callbacks=[callback],
    )
    trainer.train()
    assert [r.step for r in callback.reports] == [1, 2, 3]
    trainer_losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    for report in callback.reports:
        assert report.loss == pytest.approx(trainer_losses[report.step], rel=1e-4)


def test_a_deep_sigmoid_model_is_found_vanishing(tmp_path):
    callback = SteadygradCallback(every=2, print_findings=False)
    transformers.Trainer(
        model=MLP(depth=12, width=32, activation=nn.Sigmoid),
        args=_args(tmp_path),
        train_dataset=Rows(),
        callbacks=[callback],
    ).train()
    assert "vanishing_gradients" in {f.kind for f in callback.findings}


def test_the_nonfinite_policy_stops_training_and_names_the_layer(tmp_path):
    model = MLP(nan_from=3)
    callback = SteadygradCallback(every=5, nonfinite="stop", print_findings=False)
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path, max_steps=10), train_dataset=Rows(), callbacks=[callback]
    )
    trainer.train()
    assert trainer.state.global_step == 3  # the third step was not applied, and nothing came after it
    assert "step 3" in callback.stopped and "the output of net.0 (Linear)" in callback.stopped
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("broken", [False, True])
def test_a_plain_accelerate_loop(tmp_path, broken):
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model = MLP(depth=12, width=32, activation=nn.Sigmoid) if broken else MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(Rows(), batch_size=32)
    prepared, wrapped, loader = accelerator.prepare(model, optimizer, loader)
    assert type(wrapped).__name__ == "AcceleratedOptimizer"
    with Monitor(accelerator.unwrap_model(prepared), every=2, optimizer=wrapped, update_every=1) as monitor:
        for batch in loader:
            loss = prepared(**batch)["loss"]
            accelerator.backward(loss)
            monitor.observe_loss(loss)
            wrapped.step()
            wrapped.zero_grad()
    assert [r.step for r in monitor.history.reports] == [1, 3]
    assert all(math.isfinite(r.loss) for r in monitor.history.reports)
    assert all(math.isfinite(rec.update_ratio) for rec in monitor.history.reports[1].records if rec.kind == "Linear")
    from steadygrad import diagnose

    kinds = {f.kind for f in diagnose(monitor.history.reports, model=model)}
    assert ("vanishing_gradients" in kinds) == broken, kinds
