"""MLflowSink: what a Monitor writes is what MLflow's own client reads back."""

import getpass
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

from steadygrad.diagnose import Finding, Fix
from steadygrad.measure import FlowReport, LayerRecord, MLflowSink, Monitor
from steadygrad.measure.sinks import SCALARS, mlflow_key

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module's tests (creating its tables takes most of a second); each test has its
    own run in it."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow').as_posix()}/mlflow.db"


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """A run's artifacts go where MLflow puts them by default, ./mlruns: here, not in the repository."""
    monkeypatch.chdir(tmp_path)


def train(sink: MLflowSink, steps: int = 3) -> Monitor:
    """A small nn.Sequential (its labels, ``1 (Tanh)``, need sanitizing) trained for ``steps`` logged steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, optimizer=opt, sinks=[sink]) as monitor:
        for _ in range(steps):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            monitor.observe_loss(loss)
            opt.step()
    return monitor


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_logged_metrics_are_the_monitors_records(store):
    sink = MLflowSink(store, experiment="records", run_name="three steps")
    monitor = train(sink)  # leaving the Monitor closes its sinks: the run ends
    client = MlflowClient(store)
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "three steps"
    reports = monitor.history.reports
    assert [r.step for r in reports] == [1, 2, 3]
    assert history(client, sink.run_id, "loss") == [(r.step, r.loss) for r in reports]
    labels = [record.label for record in reports[0].records]
    assert "1 (Tanh)" in labels
    checked = 0
    for index, label in enumerate(labels):
        for name in SCALARS:
            expected = [(r.step, float(getattr(r.records[index], name))) for r in reports]
            expected = [(step, value) for step, value in expected if math.isfinite(value)]
            assert history(client, sink.run_id, f"{mlflow_key(label)}/{name}") == expected, (label, name)
            checked += len(expected)
    assert checked > 3 * 3 * 5  # grad_norm, act_std, nonfinite counts... of 3 layers at 3 steps
    assert "1 _Tanh_/act_std" in run.data.metrics  # the parentheses sanitized
    assert mlflow.active_run() is None  # the sink never touched the fluent API's global run
    assert run.info.user_id == getpass.getuser()  # as mlflow.start_run records it


def test_nan_and_inf_are_not_sent_but_counted(store):
    sink = MLflowSink(store, experiment="nonfinite")
    record = LayerRecord("block", "Linear", 0, grad_norm=math.nan, act_std=math.inf, act_mean=0.5, nonfinite_grad=3)
    sink.write(FlowReport(records=[record], loss=math.nan, step=7), [])
    sink.close()
    client = MlflowClient(store)
    metrics = client.get_run(sink.run_id).data.metrics
    assert metrics == {"block/act_mean": 0.5, "block/nonfinite_act": 0.0, "block/nonfinite_grad": 3.0}
    assert history(client, sink.run_id, "block/nonfinite_grad") == [(7, 3.0)]
    assert sink.failures == 0


def test_a_failing_store_warns_once_and_training_goes_on(store, monkeypatch):
    from mlflow.exceptions import MlflowException

    sink = MLflowSink(store, experiment="failing")

    def refuse(*args, **kwargs):
        raise MlflowException("the store is gone")

    monkeypatch.setattr(sink.client, "log_batch", refuse)
    with pytest.warns(RuntimeWarning, match="MLflow logging failed.*the store is gone") as warned:
        monitor = train(sink, steps=3)
    assert len(warned) == 1 and sink.failures == 3 and len(monitor.history.reports) == 3
    monkeypatch.setattr(sink.client, "log_text", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    sink.log_findings([])  # an OSError neither: counted, not warned again
    assert sink.failures == 4


def test_log_findings_writes_findings_json_and_a_count_tag(store, tmp_path):
    sink = MLflowSink(store, experiment="findings")
    findings = [
        Finding(
            "vanishing_gradients",
            "warning",
            ["block01"],
            {"ratio": 1e-6, "worst": math.nan},
            "Gradients vanish.",
            [Fix("reinit", {"scheme": "he_normal"})],
        ),
        Finding("dead_units", "info", ["block02"], {}, "Dead units."),
    ]
    sink.close()
    sink.log_findings(findings)  # after the Monitor has ended the run, as with a Monitor: MLflow takes it
    client = MlflowClient(store)
    run = client.get_run(sink.run_id)
    assert run.data.tags["steadygrad.findings"] == "2" and run.info.status == "FINISHED"
    path = client.download_artifacts(sink.run_id, "findings.json", str(tmp_path))
    loaded = json.loads(Path(path).read_text())
    assert loaded == [
        f.to_dict() | ({"evidence": {"ratio": 1e-6, "worst": None}} if i == 0 else {}) for i, f in enumerate(findings)
    ]


def test_an_existing_run_is_logged_into_and_left_open(store):
    client = MlflowClient(store)
    experiment = client.create_experiment("theirs")
    run_id = client.create_run(experiment).info.run_id
    sink = MLflowSink(store, run_id=run_id)
    assert not sink.owns_run
    train(sink, steps=2)
    sink.close("FAILED")  # not its run: nothing changes
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.metrics["loss"] > 0
    with pytest.raises(ValueError, match="MLflow could not start the run 'nope'"):
        MLflowSink(store, run_id="nope")
    with pytest.raises(ValueError, match="FINISHED, FAILED or KILLED"):
        sink.close("DONE")


def test_close_ends_the_run_with_the_status_given(store):
    sink = MLflowSink(store, experiment="status")
    sink.close("KILLED")
    sink.close()  # once only
    assert MlflowClient(store).get_run(sink.run_id).info.status == "KILLED"


def test_the_default_store_is_sqlite_in_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sink = MLflowSink()
    assert sink.tracking_uri == f"sqlite:///{tmp_path.resolve().as_posix()}/mlflow.db"
    assert (tmp_path / "mlflow.db").is_file()
    sink.log_findings([])
    sink.close()
    assert list(tmp_path.glob("mlruns/*/*/artifacts/findings.json"))  # MLflow's default artifact root, ./mlruns
    elsewhere = f"sqlite:///{tmp_path.resolve().as_posix()}/elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)  # the URI given to MLflow itself comes first
    sink = MLflowSink()
    sink.close()
    assert sink.tracking_uri == elsewhere and MlflowClient(elsewhere).get_run(sink.run_id).info.status == "FINISHED"


def test_metric_keys_are_sanitized_deterministically():
    assert mlflow_key("transformer.h.0.attn") == "transformer.h.0.attn"  # allowed characters are kept
    assert mlflow_key("3 (Tanh)") == "3 _Tanh_"
    assert mlflow_key("h[0]*:x") == "h_0___x"  # ':' too: MLflow refuses it on Windows
    assert mlflow_key("a//b/") == "a/b" and mlflow_key("./a/..") == "_/a/__" and mlflow_key("") == "_"
    assert mlflow_key("é") == "_"


def test_labels_that_sanitize_alike_get_distinct_keys(store):
    sink = MLflowSink(store, experiment="collisions")
    records = [LayerRecord("a(b", "Linear", 0, grad_norm=1.0), LayerRecord("a[b", "Linear", 1, grad_norm=2.0)]
    for step in (1, 2):
        sink.write(FlowReport(records=records, loss=1.0, step=step), [])
    sink.close()
    metrics = MlflowClient(store).get_run(sink.run_id).data.metrics
    assert metrics["a_b/grad_norm"] == 1.0 and metrics["a_b_2/grad_norm"] == 2.0  # the same key at every step


def test_a_large_model_is_split_into_batches_of_1000(store, monkeypatch):
    sink = MLflowSink(store, experiment="large")
    calls = []
    monkeypatch.setattr(sink.client, "log_batch", lambda run_id, metrics=(), **kw: calls.append(len(metrics)))
    records = [LayerRecord(f"layer{i}", "Linear", i, grad_norm=1.0, act_std=1.0) for i in range(300)]
    sink.write(FlowReport(records=records, loss=1.0, step=1), [])
    assert calls == [1000, 201]  # 300 layers x 4 finite scalars + the loss
    sink.close()


def test_importing_steadygrad_does_not_import_mlflow():
    code = (
        "import sys, steadygrad, steadygrad.measure, steadygrad.train, steadygrad.cli; print('mlflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), check=True)
    assert out.stdout.strip() == "False"


def test_without_mlflow_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'steadygrad\[mlflow\]'"):
        MLflowSink()
