"""The CLI on the user's own code and data: ``doctor`` and ``probe --model`` with ``--data`` in every form, synthetic
token ids, ``--loss``, and ``report`` on every JSON steadygrad writes; bad input exits 2 with what and where."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from steadygrad.cli import app

runner = CliRunner()

USER = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class LM(nn.Module):
    def __init__(self, vocab=50):
        super().__init__()
        self.embed, self.hidden, self.head = nn.Embedding(vocab, 32), nn.Linear(32, 32), nn.Linear(32, vocab)

    def forward(self, ids):
        if ids.is_floating_point():
            raise TypeError("token ids must be integers")  # the test's check that ids stay integers
        return self.head(torch.tanh(self.hidden(self.embed(ids))))


def lm():
    return LM()


def mlp():
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def loader():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(96, 64, generator=g), torch.randint(0, 10, (96,), generator=g)),
                      batch_size=16)


def empty():
    return []


def crashing_data():
    return helper_for_data()


def helper_for_data():
    raise RuntimeError("the user's data bug")


def vector_loss(output, targets):
    return (output - 0).abs()


def raising_loss(output, targets):
    raise KeyError("the user's loss bug")
"""


@pytest.fixture
def user(tmp_path):
    path = tmp_path / "user.py"
    path.write_text(USER)
    return path


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_probe_a_users_model_on_synthetic_token_ids_and_report_its_json(user, tmp_path):
    out = tmp_path / "probe.json"
    result = invoke(
        "probe",
        "--model",
        f"{user}:lm",
        "--input-dtype",
        "long",
        "--vocab",
        50,
        "--seq-len",
        8,
        "--batch",
        16,
        "--json",
        out,
    )
    assert result.exit_code == 0, result.output
    assert "integer (token ids)" in " ".join(result.output.split())
    payload = json.loads(out.read_text())
    assert [layer["name"] for layer in payload["layers"]][:1] == ["embed"] and "findings" in payload
    result = invoke("report", out, "--out", tmp_path / "page")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "page" / "index.html").is_file()


def test_probe_and_doctor_take_a_users_dataloader(user, tmp_path):
    result = invoke("probe", "--model", f"{user}:mlp", "--data", f"{user}:loader")
    assert result.exit_code == 0, result.output
    assert "Findings" in result.output
    out = tmp_path / "doctor.json"
    result = invoke(
        "doctor",
        f"{user}:mlp",
        "--data",
        f"{user}:loader",
        "--steps",
        5,
        "--repeats",
        2,
        "--budget",
        600,
        "--json",
        out,
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert payload["repeats"] == 2 and "batches of the data to train on" in payload["notes"][0]
    result = invoke("report", out, "--out", tmp_path / "page")
    assert result.exit_code == 0, result.output
    assert "held-out loss" in (tmp_path / "page" / "index.html").read_text()


def test_doctor_keeps_integer_arrays_of_an_npz_as_token_ids(user, tmp_path):
    ids = np.random.default_rng(0).integers(0, 50, (64, 8))
    np.savez(tmp_path / "tokens.npz", X=ids, y=ids)
    result = invoke(
        "doctor",
        f"{user}:lm",
        "--data",
        tmp_path / "tokens.npz",
        "--optimizer",
        "adamw",
        "--lr",
        3e-3,
        "--steps",
        3,
        "--repeats",
        1,
        "--budget",
        600,
    )
    assert result.exit_code == 0, result.output  # LM raises on float ids
    assert "per position" in " ".join(result.output.split())


def test_doctor_on_synthetic_token_ids(user):
    result = invoke(
        "doctor",
        f"{user}:lm",
        "--input-dtype",
        "long",
        "--vocab",
        50,
        "--seq-len",
        8,
        "--samples",
        64,
        "--steps",
        3,
        "--repeats",
        1,
        "--budget",
        600,
    )
    assert result.exit_code == 0, result.output
    assert "teacher of the tokens" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["doctor", "{u}:mlp", "--data", "{u}:empty"], "The data yielded no batch"),
        (["doctor", "{u}:mlp", "--data", "{u}:crashing_data"], "The data function"),
        (["doctor", "{u}:mlp", "--data", "digits", "--loss", "{u}:vector_loss"], "not a scalar"),
        (["doctor", "{u}:mlp", "--data", "digits", "--loss", "{u}:raising_loss"], "loss= raised on the first batch"),
        (["doctor", "{u}:lm", "--input-shape", "8"], "The model rejects the first batch"),
        (["doctor", "{u}:lm", "--input-dtype", "long"], "give --vocab N and --seq-len T"),
        (["probe", "--model", "{u}:mlp", "--data", "{u}:empty"], "--data yielded no batch"),
        (["doctor", "{u}:mlp", "--data", "digits", "--precision", "fp8"], "Unknown precision 'fp8'"),
    ],
    ids=[
        "empty_loader",
        "data_raises",
        "vector_loss",
        "loss_raises",
        "batch_rejected",
        "no_vocab",
        "probe_empty",
        "precision",
    ],
)
def test_bad_input_exits_2_with_what_and_where(user, args, message):
    result = (
        invoke(*[a.format(u=user) for a in args], "--budget", "60")
        if args[0] == "doctor"
        else invoke(*[a.format(u=user) for a in args])
    )
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert message in text and "Traceback (most recent call last)" not in result.output
    if "data_raises" in message or "The data function" in message:
        assert "helper_for_data" in text and "the user's data bug" in text
    if "loss= raised" in message:
        assert "raising_loss" in text and "the user's loss bug" in text
