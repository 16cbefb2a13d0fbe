"""SteadygradCallback in real Lightning fits: scheduled reports with the real loss and update ratios, the loggers'
scalars, findings on a broken model and none on a healthy one, the non-finite stop, accumulation, bf16, DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("lightning")
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from steadygrad.integrations.lightning import SteadygradCallback
from tests.integrations.lightning_models import Classifier, dataset, loader, quiet_trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def _no_hooks_left(model: nn.Module) -> None:
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    from torch.optim import optimizer as torch_optimizer

    assert not torch_optimizer._global_optimizer_pre_hooks and not torch_optimizer._global_optimizer_post_hooks


def test_reports_at_the_scheduled_steps_with_the_real_loss(tmp_path):
    model = Classifier()
    first = dataset()[:32]
    expected_loss = F.cross_entropy(Classifier()(first[0]), first[1]).item()
    callback = SteadygradCallback(every=3, update_every=1)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=CSVLogger(tmp_path), limit_val_batches=2)
    trainer.fit(model, loader(), loader(n=64))
    reports = callback.reports
    assert [r.step for r in reports] == [1, 4, 7]  # 8 batches, every 3rd optimizer step
    assert reports[0].loss == pytest.approx(expected_loss, rel=1e-6)
    assert all(math.isfinite(r.loss) for r in reports)
    linear = [rec for rec in reports[1].records if rec.kind == "Linear"]
    assert linear and all(math.isfinite(rec.update_ratio) and rec.update_ratio > 0 for rec in linear)
    # the loggers got the scalars, at the steps Lightning counts
    metrics = (Path(trainer.log_dir) / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    assert "steadygrad/loss" in header and "steadygrad/net.0/grad_norm" in header
    # findings: printed, kept, and in the log directory's JSON file
    saved = json.loads((Path(trainer.log_dir) / "steadygrad_findings.json").read_text())
    assert saved["logged_steps"] == [1, 4, 7]
    assert saved["findings"] == [f.to_dict() for f in callback.findings]
    _no_hooks_left(model)


def test_gradient_accumulation_counts_optimizer_steps_and_averages_the_loss(tmp_path):
    model = Classifier()
    x, y = dataset()[:64]
    reference = Classifier()
    expected = (F.cross_entropy(reference(x[:32]), y[:32]) + F.cross_entropy(reference(x[32:]), y[32:])).item() / 2
    callback = SteadygradCallback(every=1)
    quiet_trainer(tmp_path, callbacks=[callback], logger=False, accumulate_grad_batches=2).fit(model, loader())
    assert [r.step for r in callback.reports] == [1, 2, 3, 4]  # 8 batches, 2 per step
    assert callback.reports[0].loss == pytest.approx(expected, rel=1e-6)


def test_a_deep_sigmoid_model_is_found_vanishing_and_a_healthy_one_is_not(tmp_path, capsys):
    broken = SteadygradCallback(every=2)
    quiet_trainer(tmp_path / "b", callbacks=[broken], logger=False).fit(
        Classifier(depth=12, width=32, activation=nn.Sigmoid), loader()
    )
    assert "vanishing_gradients" in {f.kind for f in broken.findings}
    assert "gradients vanish" in capsys.readouterr().out.lower()
    healthy = SteadygradCallback(every=2)
    quiet_trainer(tmp_path / "h", callbacks=[healthy], logger=False).fit(Classifier(), loader())
    assert healthy.findings == []
    assert "No findings" in capsys.readouterr().out


def test_the_nonfinite_policy_stops_the_fit_and_names_the_layer(tmp_path):
    model = Classifier(nan_at=3)
    callback = SteadygradCallback(every=5, nonfinite="stop")
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False, max_epochs=3)
    trainer.fit(model, loader())
    assert trainer.global_step <= 4  # stopped in the first epoch, not after 3 epochs
    assert "step 4" in callback.stopped and "the output of net.0 (Linear)" in callback.stopped
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad update was not applied
    saved = json.loads((Path(trainer.log_dir or tmp_path) / "steadygrad_findings.json").read_text())
    assert saved["stopped"] == callback.stopped
    _no_hooks_left(model)


def test_bf16_mixed_and_tensorboard_histograms(tmp_path):
    callback = SteadygradCallback(every=4)
    logger = TensorBoardLogger(tmp_path)
    quiet_trainer(tmp_path, callbacks=[callback], logger=logger, precision="bf16-mixed").fit(Classifier(), loader())
    assert [r.step for r in callback.reports] == [1, 5]
    assert all(math.isfinite(r.loss) for r in callback.reports)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    assert "steadygrad/net.0/weight" in events.Tags()["histograms"]
    assert "steadygrad/net.0/grad_norm" in events.Tags()["scalars"]


def test_ddp_on_two_cpu_processes_reports_the_global_batch(tmp_path):
    """DDP (2 processes, gloo): each rank's records are those of the global batch: one process on both shards."""
    script = Path(__file__).with_name("lightning_ddp.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), *sys.path])}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # Lightning's DistributedSampler shuffles as torch's does: randperm with seed 0 + epoch, rank r takes every
    # other index from r; the global batch is the two ranks' first 32
    order = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    rows = torch.cat([order[0::2][:32], order[1::2][:32]]).tolist()
    single = SteadygradCallback(every=1)
    quiet_trainer(tmp_path / "single", callbacks=[single], logger=False, max_steps=1).fit(
        Classifier(), torch.utils.data.DataLoader(torch.utils.data.Subset(dataset(), rows), batch_size=64)
    )
    expected = {rec.name: rec for rec in single.reports[0].records}
    for records in ranks:
        for got in records:
            want = expected[got["name"]]
            for field in ("act_mean", "act_std", "grad_norm", "weight_grad_norm"):
                if got[field] is None:
                    continue
                assert got[field] == pytest.approx(getattr(want, field), rel=1e-4, abs=1e-7), (got["name"], field)


def test_a_gradscalers_skipped_steps_are_counted_not_merged(tmp_path):
    """16-mixed (a CPU GradScaler here): the scaler skips the steps whose scaled gradients overflow, by design.
    They must neither stop the run under the non-finite policy nor fold their Inf gradients into the next step;
    the recorded loss is the true one, the scale divided out."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    true_losses = []

    class Regression(Classifier):
        def training_step(self, batch, batch_idx):
            x, _ = batch
            loss = F.mse_loss(self.net(x).float()[:, :1], x.sum(1, keepdim=True) * 100)
            true_losses.append(loss.item())
            return loss

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)  # the first steps overflow, as large losses do on GPUs
    callback = SteadygradCallback(every=1, nonfinite="stop")
    trainer = quiet_trainer(
        tmp_path, callbacks=[callback], logger=False, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    )
    trainer.fit(Regression(), loader())
    assert callback.stopped is None and trainer.global_step == 8
    reports = callback.reports
    assert 0 < len(reports) < 8 and reports[0].step > 1, [r.step for r in reports]  # skipped steps: no report
    assert callback.monitor.step_count == trainer.global_step
    for report in reports:
        assert all(rec.call == 1 and rec.nonfinite_grad == 0 for rec in report.records)
        assert report.loss == pytest.approx(true_losses[report.step - 1], rel=1e-5)
