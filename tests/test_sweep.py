"""Sweeps: every combination, stored in SQLite, resumable after a kill, safe with two writers."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from steadygrad.cli import app
from steadygrad.sweep import Job, SweepDB, expand_grid, run_job, run_sweep

runner = CliRunner(env={"COLUMNS": "200"})


def rows(db):
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT key, status, metrics, error FROM runs").fetchall()


def test_grid_expansion_and_stable_keys():
    specs = expand_grid({"depth": "3,5", "act": "relu,tanh", "skip": "none,residual"})
    assert len(specs) == 8 and {s["activation"] for s in specs} == {"relu", "tanh"}
    a = Job(specs[0], "probe", 0)
    assert a.key == Job(dict(specs[0]), "probe", 0).key != Job(specs[0], "probe", 1).key
    with pytest.raises(ValueError, match="Unknown --act 'swish'"):
        expand_grid({"act": "swish"})


def test_probe_runs_record_metrics(tmp_path):
    db = SweepDB(tmp_path / "s.sqlite")
    jobs = [
        Job(spec, "probe", 0, batch=32) for spec in expand_grid({"depth": "4,8", "act": "relu,sigmoid", "width": "16"})
    ]
    summary = run_sweep(jobs, db, workers=1)
    assert (summary.ran, summary.skipped, summary.failed) == (4, 0, 0)
    recorded = db.rows()
    assert len(recorded) == 4 and all(r["status"] == "ok" for r in recorded)
    sigmoid8 = next(r for r in recorded if r["spec"]["activation"] == "sigmoid" and r["spec"]["depth"] == 8)
    relu8 = next(r for r in recorded if r["spec"]["activation"] == "relu" and r["spec"]["depth"] == 8)
    assert sigmoid8["metrics"]["gradient_ratio"] < relu8["metrics"]["gradient_ratio"]
    again = run_sweep(jobs, db, workers=1)  # the same sweep again: nothing to do, nothing duplicated
    assert (again.ran, again.skipped) == (0, 4) and len(db.rows()) == 4


def test_failures_are_recorded_and_do_not_stop_the_sweep(tmp_path):
    db = SweepDB(tmp_path / "s.sqlite")
    good = expand_grid({"depth": "3", "width": "8"})[0]
    exploding = expand_grid({"depth": "60", "width": "64", "init": "large_normal"})[0]
    jobs = [
        Job(good, "train", 0, data="missing.npz", train={"epochs": 1}),
        Job(exploding, "probe", 0, batch=16),
        Job(good, "probe", 0, batch=16),
    ]
    summary = run_sweep(jobs, db, workers=1)
    statuses = {r["key"]: r["status"] for r in db.rows()}
    assert statuses[jobs[0].key] == "failed" and statuses[jobs[2].key] == "ok"
    assert statuses[jobs[1].key] == "diverged"
    assert summary.failed == 2
    error = next(r["error"] for r in db.rows() if r["key"] == jobs[0].key)
    assert "No data file at missing.npz" in error


def test_run_job_never_raises():
    row = run_job(Job({"depth": -1}, "probe", 0))
    assert row["status"] == "failed" and "NetSpec.depth must be a positive integer" in row["error"]


def test_train_task(tmp_path):
    db = SweepDB(tmp_path / "t.sqlite")
    jobs = [
        Job(spec, "train", 0, data="digits", train={"epochs": 1})
        for spec in expand_grid({"depth": "3", "act": "relu,sigmoid", "width": "32"})
    ]
    run_sweep(jobs, db, workers=1)
    metrics = [r["metrics"] for r in db.rows()]
    assert all("test_accuracy" in m and "gradient_ratio_at_init" in m for m in metrics)


SWEEP = [
    sys.executable,
    "-m",
    "steadygrad",
    "sweep",
    "--grid",
    "depth=20,40,60",
    "width=64,96",
    "act=relu,tanh,sigmoid",
    "--workers",
    "1",
]


def test_killed_sweep_loses_nothing_and_resumes_without_duplicates(tmp_path):
    db = tmp_path / "k.sqlite"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([*SWEEP, "--db", str(db)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if db.exists():
            try:
                if len(rows(db)) >= 3:
                    break
            except sqlite3.OperationalError:
                pass
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
    finished_before = {key for key, *_ in rows(db)}
    assert 3 <= len(finished_before) < 18
    subprocess.run([*SWEEP, "--db", str(db)], check=True, capture_output=True, env=env, timeout=300)
    after = rows(db)
    keys = [key for key, *_ in after]
    assert len(keys) == 18 == len(set(keys))  # every run, once
    assert finished_before <= set(keys)


def _children(pid: int) -> set[int]:
    """The pids whose parent is ``pid`` (Linux's /proc)."""
    out = set()
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                with open(f"/proc/{stat}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.add(int(stat))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process table from /proc")
def test_a_sigkilled_sweep_leaves_no_worker_running_and_resumes_exactly(tmp_path):
    """The issue's case: a training sweep on the local pool, SIGKILLed while its workers run. Every worker must be
    gone within seconds (nothing left to write into the database), and the resumed sweep writes exactly the rows
    that were missing."""
    db = tmp_path / "train.sqlite"
    command = _train_sweep(db)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process, workers = _start_with_workers(command, env)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL and len(workers) == 2, "the sweep ended before it could be killed"
    _all_gone(workers)
    before = {key for key, *_ in rows(db)} if db.exists() else set()
    assert len(before) < 6
    resume = [*command[: command.index("--workers")], "--workers", "1", "--db", str(db)]  # in-process: no spawn
    subprocess.run(resume, check=True, capture_output=True, env=env, timeout=300)
    keys = [key for key, *_ in rows(db)]
    assert len(keys) == 6 == len(set(keys)) and before <= set(keys)


def _train_sweep(db) -> list[str]:
    command = [sys.executable, "-m", "steadygrad", "sweep", "--grid", "depth=2,3,4", "act=relu,tanh", "width=16"]
    return [*command, "--task", "train", "--epochs", "2", "--workers", "2", "--db", str(db)]


def _start_with_workers(command, env, **popen) -> tuple[subprocess.Popen, set[int]]:
    """The sweep, once its pool's two workers run (spawn also starts a resource tracker, which is not a worker)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, **popen)
    workers: set[int] = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        workers = {pid for pid in _children(process.pid) if b"resource_tracker" not in _cmdline(pid)}
        if len(workers) >= 2:
            break
        time.sleep(0.05)
    time.sleep(1.5)  # into their first runs
    return process, workers


def _all_gone(pids: set[int], seconds: float = 5.0) -> None:
    gone_by = time.monotonic() + seconds
    while time.monotonic() < gone_by and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids), "a worker outlived its sweep"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process table from /proc")
def test_ctrl_c_stops_a_sweep_and_its_workers(tmp_path):
    """Ctrl-C goes to the terminal's whole process group: the workers leave it to the sweep, which kills them and
    exits at once instead of waiting for their runs (or starting the queued ones)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process, workers = _start_with_workers(_train_sweep(tmp_path / "c.sqlite"), env, start_new_session=True)
    assert len(workers) == 2, "the sweep ended before it could be interrupted"
    os.killpg(process.pid, signal.SIGINT)
    process.wait(timeout=20)
    assert process.returncode == 130  # the command's own exit for an interrupt (not a traceback's 1)
    _all_gone(workers)


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def test_two_sweeps_on_one_database(tmp_path):
    db = tmp_path / "shared.sqlite"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def sweep(depths: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "steadygrad", "sweep", "--grid", f"depth={depths}", "act=relu,tanh"]
        command += ["width=16", "--workers", "1", "--db", str(db)]
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)

    first, second = sweep("4,8,12"), sweep("8,12,16")
    assert first.wait(timeout=300) == 0 and second.wait(timeout=300) == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        keys = [k for (k,) in conn.execute("SELECT key FROM runs")]
    assert len(keys) == len(set(keys)) == 8  # depths 4, 8, 12, 16 x two activations, each once


def test_cli_sweep_and_report(tmp_path):
    db = tmp_path / "c.sqlite"
    result = runner.invoke(
        app,
        [
            "sweep",
            "--grid",
            "depth=3,6",
            "act=relu,tanh",
            "width=16",
            "--repeat",
            "2",
            "--db",
            str(db),
            "--workers",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "8 runs (4 networks x 2 seed(s))" in result.output
    report = runner.invoke(app, ["report", str(db), "--out", str(tmp_path / "page")])
    assert report.exit_code == 0, report.output
    page = (tmp_path / "page" / "index.html").read_text()
    assert "gradient_ratio" in page and page.count("data:image/png;base64,") >= 2
    assert json.loads((tmp_path / "page" / "results.json").read_text())["runs"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grid", "depth"], "--grid takes OPTION=V1,V2"),
        (["--grid", "act=swish"], "Unknown --act 'swish'"),
        (["--grid", "depth=3", "--task", "fit"], "Unknown task 'fit'"),
        (["--grid", "depth=3", "--executor", "slurm"], "Unknown executor 'slurm'"),
    ],
    ids=["no_values", "bad_value", "bad_task", "bad_executor"],
)
def test_cli_sweep_bad_options_exit_2(tmp_path, args, message):
    result = runner.invoke(app, ["sweep", *args, "--db", str(tmp_path / "x.sqlite")])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_ray_executor_gives_the_local_executors_results(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (make test installs it): the Ray executor is not tested")
    jobs = [Job(spec, "probe", 0, batch=16) for spec in expand_grid({"depth": "3,6", "act": "relu,tanh", "width": "8"})]
    local, remote = SweepDB(tmp_path / "local.sqlite"), SweepDB(tmp_path / "ray.sqlite")
    run_sweep(jobs, local, executor="local", workers=2)
    summary = run_sweep(jobs, remote, executor="ray")
    assert summary.ran == 4 and summary.failed == 0
    by_key = {r["key"]: r["metrics"] for r in local.rows()}
    for row in remote.rows():
        expected = by_key[row["key"]]
        assert row["metrics"].keys() == expected.keys()
        for name, value in expected.items():  # NaN metrics (no saturating unit in a ReLU net) are stored as null
            assert row["metrics"][name] == (None if value is None else pytest.approx(value, rel=1e-9)), name


def test_database_path_errors(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        SweepDB(tmp_path)
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(ValueError, match="not a usable SQLite database"):
        SweepDB(bad)
