import json
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import steadygrad
from steadygrad.cli import app
from steadygrad.nets import NetSpec, build

runner = CliRunner(env={"COLUMNS": "200"})  # rich would wrap tables and help at 80


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert steadygrad.__version__ in result.output


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "inits" in result.output


def test_help_reflows_docstring_paragraphs():
    """A docstring's line breaks are source formatting: help text reflows each paragraph to the terminal, so at
    200 columns a sentence the source breaks stays on one line (rich markup mode kept the break)."""
    listing = runner.invoke(app, ["--help"]).output
    assert "weight: closed-form variance beside the variance of one draw." in listing
    own = runner.invoke(app, ["inits", "--help"]).output
    assert "gives a variance near 2/10 = 0.2, Glorot-uniform near 2/(10+32) = 0.0476." in own


def test_inits_table_and_json(tmp_path):
    out = tmp_path / "sub" / "inits.json"
    result = runner.invoke(app, ["inits", "--fan-in", "100", "--fan-out", "128", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "he_uniform" in result.output
    payload = json.loads(out.read_text())
    rows = {row["scheme"]: row for row in payload["schemes"]}
    assert rows["he_uniform"]["expected_variance"] == pytest.approx(0.02)
    assert rows["glorot_uniform"]["expected_variance"] == pytest.approx(2 / 228)
    assert rows["he_uniform"]["measured_variance"] == pytest.approx(0.02, rel=0.1)
    assert rows["identical"]["bad_choice"] is True


@pytest.mark.parametrize("args", [["inits", "--fan-in", "0"], ["inits", "--fan-in", "ten"], ["nope"]])
def test_usage_errors_exit_2_without_traceback(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_a_usage_error_exits_2_with_one_paragraph_and_no_traceback():
    """A UsageError raised by the CLI's own parsing: exit 2, stderr is ``Error: <message>``, nothing else."""
    result = runner.invoke(app, ["demo", "--only", "a,b"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert text.startswith("Error: --only takes claim numbers separated by commas, e.g. --only 1,5,19")


def test_a_library_value_error_is_a_usage_error():
    """The library's ValueErrors report bad input (here a NetSpec value): exit 2 with the library's message."""
    result = runner.invoke(app, ["probe", "--norm", "instance", "--depth", "2"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--norm='instance' needs spatial positions" in " ".join(result.output.split())


@pytest.mark.parametrize("error", [TypeError("unsupported operand"), KeyError("block01"), RuntimeError("boom")])
def test_a_bug_in_steadygrad_prints_its_traceback_and_exits_1(monkeypatch, error):
    """An exception that is not a usage error (a TypeError included) is steadygrad's bug: never exit 2."""

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr("steadygrad.cli.probe.probe", broken)
    result = runner.invoke(app, ["probe", "--depth", "2", "--width", "8"])
    assert result.exit_code == 1, result.output
    assert "Traceback (most recent call last)" in result.output
    assert f"{type(error).__name__}: " in result.output and "in broken" in result.output
    assert "This is a bug in steadygrad" in " ".join(result.output.split())


def test_a_bug_in_the_console_script_exits_1_with_its_traceback(tmp_path):
    """The same through the installed entry point, in a real process (no test runner catching anything)."""
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "import steadygrad.cli.train as train\n"
        "def broken(*args, **kwargs):\n"
        "    raise TypeError('a bug')\n"
        "train.build = broken\n"
        "from steadygrad.cli import main\n"
        "sys.argv = ['steadygrad', 'train', '--depth', '2', '--no-progress', '--logdir', sys.argv[1]]\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert "Traceback (most recent call last)" in done.stderr and "TypeError: a bug" in done.stderr


def test_network_options_come_from_netspec_fields():
    """probe offers one option per NetSpec field with CLI metadata, train the same minus the sizes its data
    sets; both print the field's own help text."""
    from steadygrad.nets import SPEC_OPTIONS, spec_cli_options

    # the help as words, without rich's box borders between wrapped lines
    probe_help = " ".join(runner.invoke(app, ["probe", "--help"]).output.replace("│", " ").split())
    train_help = " ".join(runner.invoke(app, ["train", "--help"]).output.replace("│", " ").split())
    for name, field, option in spec_cli_options():
        assert f"--{name} " in probe_help, name
        assert (f"--{name} " in train_help) is (not option.from_data), name
        assert SPEC_OPTIONS[name] == field.name
    assert "Hidden blocks (weight layers before the head). [default: 10]" in probe_help
    assert "Hidden blocks (weight layers before the head). [default: 10]" in train_help
    assert (
        "sigmoid, tanh, relu, leaky_relu, gelu, selu, identity. "
        "[default: relu; tanh for kind rnn; gelu for kind transformer]" in probe_help
    )
    assert "Comma-separated values compare several networks" not in train_help
    for option in ("--kind", "--act", "--norm-position", "--residual-scale", "--norm-groups", "--bias", "--cell"):
        assert f"{option} " in train_help


def test_probe_takes_every_netspec_option():
    result = runner.invoke(
        app, ["probe", "--skip", "residual", "--branch-layers", "1,2", "--depth", "3", "--width", "8", "--bias", "no"]
    )
    assert result.exit_code == 0, result.output
    assert "branch_layers" in result.output  # the side-by-side table names the field that varies


def test_unknown_network_option_is_a_usage_error(tmp_path):
    from steadygrad.nets import expand_specs

    with pytest.raises(ValueError, match=r"Unknown network option 'activation'\. Accepted: kind, depth"):
        expand_specs({"activation": "relu"})
    result = runner.invoke(app, ["sweep", "--grid", "activation=relu", "--db", str(tmp_path / "s.sqlite")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--grid has no network option 'activation'. Accepted: kind" in " ".join(result.output.split())


def test_unwritable_json_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = runner.invoke(app, ["inits", "--json", str(blocker / "x.json")])
    assert result.exit_code == 2
    assert "Could not write" in result.output


def test_console_script_and_module_entry_points():
    script = shutil.which("steadygrad", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert script, "the steadygrad console script is not installed next to this python"
    done = subprocess.run([script, "--version"], capture_output=True, text=True, check=True)
    assert steadygrad.__version__ in done.stdout
    done = subprocess.run([sys.executable, "-m", "steadygrad", "--help"], capture_output=True, text=True, check=True)
    assert "Usage" in done.stdout


def test_probe_single_network_with_theory(tmp_path):
    result = runner.invoke(
        app,
        [
            "probe",
            "--depth",
            "12",
            "--width",
            "64",
            "--act",
            "tanh",
            "--init",
            "glorot_uniform",
            "--theory",
            "--json",
            str(tmp_path / "p.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "block12" in result.output and "theory:" in result.output
    assert "Mean-field theory predicts" in result.output
    payload = json.loads((tmp_path / "p.json").read_text())
    (report,) = payload["reports"]
    assert report["spec"]["depth"] == 12 and len(report["layers"]) == 13
    assert report["layers"][0]["predicted_grad_norm"] is not None


def test_probe_compares_comma_separated_specs(tmp_path):
    plot = tmp_path / "flow.png"
    result = runner.invoke(
        app,
        [
            "probe",
            "--depth",
            "4",
            "--width",
            "32",
            "--in-features",
            "10",
            "--act",
            "sigmoid",
            "--skip",
            "none,residual,dense",
            "--plot",
            str(plot),
            "--json",
            str(tmp_path / "s.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Side by side" in result.output
    reports = json.loads((tmp_path / "s.json").read_text())["reports"]
    assert [r["spec"]["skip"] for r in reports] == ["none", "residual", "dense"]
    grads = {r["spec"]["skip"]: r["input_grad_norm"] for r in reports}
    assert grads["residual"] > grads["none"] and grads["dense"] > grads["none"]
    assert plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_probe_mode_decides_batchnorms_statistics(tmp_path, mode):
    args = ["--depth", "2", "--width", "8", "--norm", "batch", "--batch", "16", "--json", str(tmp_path / "m.json")]
    result = runner.invoke(app, ["probe", *args, "--mode", mode])
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "m.json").read_text())
    head = payload["reports"][0]["layers"][-1]
    # the reference: the same net and batch as the command builds them, run in that mode by torch itself
    generator = torch.Generator().manual_seed(0)
    net = build(NetSpec(depth=2, width=8, norm="batch"), generator)
    x = torch.randn(16, 64, generator=generator)
    with torch.no_grad():
        expected = float(net.train(mode == "train")(x).double().square().mean())
    assert payload["mode"] == mode and head["name"] == "head"
    assert head["act_second_moment"] == pytest.approx(expected, rel=1e-5)
    assert payload["reports"][0]["loss_name"].startswith("cross-entropy (N, C)")


def test_probe_product_of_lists():
    result = runner.invoke(app, ["probe", "--depth", "3,5", "--act", "relu,tanh", "--width", "16"])
    assert result.exit_code == 0, result.output
    assert result.output.count("mlp-") >= 4


def test_probe_other_kinds():
    for args in (
        ["--kind", "cnn", "--norm", "batch", "--depth", "3", "--width", "8", "--in-features", "3"],
        ["--kind", "rnn", "--cell", "lstm", "--act", "tanh", "--depth", "2", "--width", "8"],
    ):
        result = runner.invoke(app, ["probe", *args, "--batch", "8"])
        assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--act", "swish"], "Unknown --act 'swish'. Accepted: sigmoid, tanh"),
        (["--depth", "abc"], "--depth takes integers"),
        (["--depth", "0"], "--depth must be a positive integer"),
        (["--bias", "maybe"], "--bias takes yes or no"),
        (["--norm", "group", "--width", "10"], "--norm-groups (8) must divide --width (10)"),
        (["--init", "he"], "Unknown initialization scheme 'he'"),
        (["--layers", "nothing*"], "No layer of the model matches"),
        (["--batch", "1"], "--batch"),
        (["--depth", ","], "--depth got no value"),
        (["--mode", "inference"], "--mode must be train or eval; got 'inference'"),
    ],
    ids=["act", "depth_text", "depth_zero", "bias", "groups", "init", "layers", "batch", "empty", "mode"],
)
def test_probe_bad_options_exit_2_with_a_message(args, message):
    result = runner.invoke(app, ["probe", *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_probe_help_teaches():
    result = runner.invoke(app, ["probe", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "Comma-separated values compare several networks" in text
    assert "--skip none,residual,dense" in text


def test_train_writes_its_log_directory(tmp_path):
    logdir = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train",
            "--depth",
            "3",
            "--width",
            "16",
            "--epochs",
            "2",
            "--logdir",
            str(logdir),
            "--tensorboard",
            "--clip",
            "norm:1.0",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Held-out metrics per epoch" in result.output
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["spec"]["in_features"] == 64
    assert summary["config"]["clip"] == "norm:1" and len(summary["epochs"]) == 2
    assert len((logdir / "history.jsonl").read_text().splitlines()) == 2
    assert (logdir / "checkpoint.pt").is_file() and (logdir / "monitor.jsonl").is_file()
    assert any((logdir / "tensorboard").iterdir())


def test_train_mlflow_logs_a_run_into_the_logdir(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    logdir = tmp_path / "run"
    args = ["train", "--depth", "3", "--width", "8", "--epochs", "1", "--monitor-every", "5", "--no-progress"]
    result = runner.invoke(app, [*args, "--logdir", str(logdir), "--mlflow"])
    assert result.exit_code == 0, result.output
    summary = json.loads((logdir / "summary.json").read_text())
    uri, run_id = summary["mlflow"]["tracking_uri"], summary["mlflow"]["run_id"]
    assert uri == f"sqlite:///{logdir.resolve().as_posix()}/mlflow.db" and summary["config"]["mlflow"] is True
    assert f"mlflow ui --backend-store-uri {uri}" in result.output
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.001" and run.data.params["data"] == "digits"
    assert run.data.tags["steadygrad.findings"] == str(len(summary["findings"]))
    assert (logdir / "mlartifacts" / run_id / "artifacts" / "findings.json").is_file()
    rows = [json.loads(line) for line in (logdir / "monitor.jsonl").read_text().splitlines()]
    grad = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "block01/grad_norm"))
    assert grad == [(row["step"], row["grad_norm"]) for row in rows if row["name"] == "block01"]
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert loss == sorted({(row["step"], row["loss"]) for row in rows}) and len(loss) == 5  # steps 1, 6, ..., 21


def test_train_mlflow_without_mlflow_exits_2(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    result = runner.invoke(app, ["train", "--mlflow-uri", "sqlite:///x.db", "--logdir", str(tmp_path)])
    assert result.exit_code == 2 and "pip install 'steadygrad[mlflow]'" in result.output
    assert not (tmp_path / "summary.json").exists()


def test_train_prints_findings_for_a_deep_sigmoid_net(tmp_path):
    result = runner.invoke(
        app,
        [
            "train",
            "--depth",
            "10",
            "--act",
            "sigmoid",
            "--init",
            "glorot_uniform",
            "--epochs",
            "1",
            "--logdir",
            str(tmp_path),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0
    assert "Gradients vanish" in result.output and "try: reinit" in result.output


def test_train_other_kinds_and_data(tmp_path):
    for args in (
        ["--kind", "cnn", "--depth", "2", "--width", "8"],
        ["--kind", "rnn", "--cell", "gru", "--depth", "1"],
        ["--data", "teacher", "--depth", "2"],
        ["--data", "spirals", "--depth", "3"],
    ):
        result = runner.invoke(app, ["train", *args, "--epochs", "1", "--logdir", str(tmp_path), "--no-progress"])
        assert result.exit_code == 0, (args, result.output)


def test_train_divergence_exits_1_with_the_layer(tmp_path):
    diverging = ["train", "--depth", "4", "--lr", "1e6", "--optimizer", "sgd", "--epochs", "1"]
    diverging += ["--logdir", str(tmp_path), "--no-progress"]
    result = runner.invoke(app, diverging)
    assert result.exit_code == 1 and "bug in steadygrad" not in result.output  # a deliberate exit, not a crash
    assert "Training diverged at step" in result.output and "first appear in" in " ".join(result.output.split())
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "stopped_nonfinite"
    rolled = runner.invoke(app, [*diverging, "--on-nonfinite", "rollback"])
    assert rolled.exit_code in (0, 1) and "Rolled back to step" in rolled.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "nowhere.npz"], "No data file at nowhere.npz"),
        (["--optimizer", "lbfgs"], "Unknown optimizer 'lbfgs'"),
        (["--clip", "norm"], "Clipping is MODE:THRESHOLD"),
        (["--on-nonfinite", "ignore"], "Unknown on_nonfinite policy"),
        (["--depth", "3,4"], "train takes one value per option"),
        (["--kind", "cnn", "--data", "blobs"], "kind='cnn' needs image data"),
        (["--lr", "0"], "lr must be a finite number > 0"),
    ],
    ids=["missing_data", "optimizer", "clip", "policy", "list", "cnn_on_tabular", "lr"],
)
def test_train_bad_options_exit_2(tmp_path, args, message):
    result = runner.invoke(app, ["train", *args, "--logdir", str(tmp_path), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_train_unwritable_logdir_exits_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    args = ["--data", "blobs", "--depth", "2", "--width", "8", "--epochs", "1", "--no-progress"]
    result = runner.invoke(app, ["train", *args, "--logdir", str(blocker / "run")])
    assert result.exit_code == 2, result.output
    assert "Choose a writable --logdir" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_train_bad_data_files_exit_2(tmp_path):
    import numpy as np

    np.savez(tmp_path / "nan.npz", X=np.array([[np.nan, 1.0]] * 10), y=np.arange(10) % 2)
    np.savez(tmp_path / "shape.npz", X=np.zeros((10, 2)), y=np.zeros(7))
    np.savez(tmp_path / "labels.npz", X=np.zeros((10, 2)), y=np.arange(10) - 5)
    for name, message in (
        ("nan.npz", "NaN or infinite"),
        ("shape.npz", "one entry per row"),
        ("labels.npz", "must be 0 .. C-1"),
    ):
        result = runner.invoke(
            app, ["train", "--data", str(tmp_path / name), "--logdir", str(tmp_path / "r"), "--no-progress"]
        )
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_train_resume_from_a_corrupted_checkpoint_exits_2(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00" * 64)
    result = runner.invoke(app, ["train", "--resume", "--logdir", str(tmp_path), "--no-progress"])
    assert result.exit_code == 2 and "not a readable checkpoint" in " ".join(result.output.split())
    result = runner.invoke(app, ["train", "--resume", "--logdir", str(tmp_path / "empty"), "--no-progress"])
    assert result.exit_code == 2 and "No checkpoint at" in result.output


def test_demo_list_and_a_quick_partial_run(tmp_path):
    listed = runner.invoke(app, ["demo", "--list"])
    assert listed.exit_code == 0 and "He-uniform weights have variance" in listed.output
    result = runner.invoke(app, ["demo", "--quick", "--only", "1,10", "--out", str(tmp_path / "lab")])
    assert result.exit_code == 0, result.output
    assert "2 reproduced" in result.output
    assert (tmp_path / "lab" / "index.html").is_file()
    claims = json.loads((tmp_path / "lab" / "results.json").read_text())["claims"]
    assert [c["number"] for c in claims] == [1, 10]


@pytest.mark.parametrize(
    ("args", "message"), [(["--only", "a,b"], "--only takes claim numbers"), (["--only", "0"], "No claim numbered 0")]
)
def test_demo_bad_options_exit_2(args, message):
    result = runner.invoke(app, ["demo", *args])
    assert result.exit_code == 2 and message in result.output


def test_report_of_a_run_and_of_a_probe(tmp_path):
    run = tmp_path / "run"
    assert (
        runner.invoke(app, ["train", "--depth", "3", "--epochs", "1", "--logdir", str(run), "--no-progress"]).exit_code
        == 0
    )
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    page = (run / "index.html").read_text()
    assert "Held-out metrics" in page and "Findings" in page and "data:image/png;base64," in page
    probe_json = tmp_path / "p.json"
    assert runner.invoke(app, ["probe", "--act", "tanh,relu", "--depth", "5", "--json", str(probe_json)]).exit_code == 0
    result = runner.invoke(app, ["report", str(probe_json), "--out", str(tmp_path / "page")])
    assert result.exit_code == 0, result.output
    assert "Side by side" in (tmp_path / "page" / "index.html").read_text()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "nowhere", "Nothing at"),
        (lambda p: _touch(p / "s.sqlite"), "holds no runs yet"),
        (lambda p: _touch(p / "x.json", "{}"), "neither a training log directory"),
    ],
    ids=["missing", "sqlite", "foreign_json"],
)
def test_report_bad_inputs_exit_2(tmp_path, make, message):
    result = runner.invoke(app, ["report", str(make(tmp_path))])
    assert result.exit_code == 2 and message in " ".join(result.output.split())


def _touch(path, text=""):
    path.write_text(text)
    return path


USER_MODELS = """
import torch
from torch import nn


def deep_sigmoid(depth=8):
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(64, 64), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(64, 10))


def broken():
    return helper()


def helper():
    raise RuntimeError("the user's own bug")


def not_a_model():
    return 42


def conv():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(USER_MODELS)
    return path


def test_doctor_on_a_users_file(user_file, tmp_path):
    before = user_file.read_text()
    result = runner.invoke(
        app,
        [
            "doctor",
            f"{user_file}:deep_sigmoid",
            "--arg",
            "depth=10",
            "--data",
            "digits",
            "--budget",
            "600",  # a cap a loaded machine must not reach: the assertions need the candidates to have run
            "--json",
            str(tmp_path / "d.json"),
            "--out",
            str(tmp_path / "page"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Gradients vanish" in result.output and "Patch:" in result.output
    payload = json.loads((tmp_path / "d.json").read_text())
    assert {"kind", "severity", "layers", "evidence"} <= set(payload["findings"][0])
    assert "held_out_loss" in payload["control"] and len(payload["control"]["repeats"]) == 3
    assert {"fix", "held_out_loss", "held_out_spread", "improvement", "grad_ratio", "repeats", "error"} <= set(
        payload["candidates"][0]
    )
    losses = [c["held_out_loss"] for c in payload["candidates"] if c["held_out_loss"] is not None]
    assert losses == sorted(losses)  # best first
    assert (tmp_path / "page" / "index.html").is_file()
    assert user_file.read_text() == before  # the user's files are never touched


def test_doctor_with_synthetic_inputs(user_file):
    result = runner.invoke(
        app,
        ["doctor", f"{user_file}:conv", "--input-shape", "3,8,8", "--classes", "10", "--budget", "10", "--steps", "10"],
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("target", "extra", "message"),
    [
        ("nowhere.py:make", [], "No file nowhere.py"),
        ("{file}:missing", [], "has no callable 'missing'. Callables there: broken, conv, deep_sigmoid"),
        ("{file}:broken", [], "raised:"),
        ("{file}:not_a_model", [], "returned int, not an nn.Module"),
        ("{file}:conv", ["--input-shape", "5,8,8"], "tensor of shape (32, 5, 8, 8)"),
        ("{file}", [], "Give the model factory as FILE.py:FUNCTION"),
        ("no_such_package.mod:make", [], "Cannot import no_such_package.mod"),
        ("{file}:deep_sigmoid", ["--arg", "depth"], "--arg takes KEY=VALUE"),
    ],
    ids=["no_file", "no_function", "factory_raises", "not_a_module", "bad_shape", "no_colon", "no_module", "bad_arg"],
)
def test_doctor_bad_input_exits_2_with_a_clear_message(user_file, target, extra, message):
    args = extra if "--input-shape" in extra else [*extra, "--input-shape", "64", "--classes", "10"]
    result = runner.invoke(app, ["doctor", target.format(file=user_file), *args, "--budget", "5"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert message in text
    if "raised" in message:
        assert "helper()" in text and "the user's own bug" in text  # the relevant lines of the user's traceback
    assert "Traceback (most recent call last)" not in result.output
