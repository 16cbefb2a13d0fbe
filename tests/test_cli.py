import json
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import steadygrad
from steadygrad.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert steadygrad.__version__ in result.output


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "inits" in result.output


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
    done = subprocess.run(
        [sys.executable, "-m", "steadygrad", "--help"], capture_output=True, text=True, check=True
    )
    assert "Usage" in done.stdout
