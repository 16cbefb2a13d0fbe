"""Grid sweeps over network specs, stored in SQLite, resumable, on local processes or a Ray cluster.

    steadygrad sweep --grid depth=10,50 act=relu,tanh init=he_uniform,glorot_uniform --task probe --db s.sqlite

Every combination of the grid (times ``repeat`` seeds) is a run with a stable key. A run is written to the
table ``runs`` when it finishes, in its own transaction, by the one process that drives the sweep; a killed
sweep loses no finished run, and the same command again runs only what is missing. Two sweeps on one
database cannot corrupt it (SQLite's locking, WAL journal) and cannot duplicate a run (the key is the
primary key; the first finished copy is kept).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import sqlite3
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from steadygrad._checks import check_choice
from steadygrad._processes import die_with_parent

__all__ = ["TASKS", "SweepDB", "expand_grid", "run_job", "run_sweep"]

TASKS = ("probe", "train")
EXECUTORS = ("local", "ray")
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key      TEXT PRIMARY KEY,  -- hash of what defines the run: spec, task, seed, data, training settings
    spec     TEXT NOT NULL,     -- the NetSpec as JSON
    task     TEXT NOT NULL,     -- probe or train
    seed     INTEGER NOT NULL,
    data     TEXT,              -- the data set (train) or null (probe: synthetic standard normal inputs)
    status   TEXT NOT NULL,     -- ok, failed (an exception: see error) or diverged (non-finite loss)
    metrics  TEXT,              -- JSON: gradient ratio, losses, accuracy, ...
    error    TEXT,              -- the traceback of a failed run
    started  REAL,              -- unix time
    finished REAL,
    seconds  REAL,
    host     TEXT
);
"""


@dataclass(frozen=True)
class Job:
    """One run to do: everything a worker needs, as plain data (it crosses process boundaries)."""

    spec: dict  # raw NetSpec fields
    task: str
    seed: int
    data: str | None = None
    train: dict = field(default_factory=dict)  # epochs, lr, optimizer, batch_size
    batch: int = 128  # probe: examples in the batch

    @property
    def key(self) -> str:
        payload = json.dumps(
            {
                "spec": self.spec,
                "task": self.task,
                "seed": self.seed,
                "data": self.data,
                "train": self.train if self.task == "train" else {},
                "batch": self.batch,
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha1(payload.encode()).hexdigest()


def expand_grid(grid: dict[str, str]) -> list[dict]:
    """Every combination of a grid given as option names to comma-separated values, as NetSpec field dicts
    (validated: a bad value raises ValueError before anything runs)."""
    from steadygrad.nets import expand_specs

    return [_spec_fields(spec) for spec in expand_specs(grid)]


def _spec_fields(spec) -> dict:
    out = spec.to_dict()
    return {k: v for k, v in out.items()}


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_job(job: Job) -> dict:
    """Run one job (in a worker) and return its row: never raises; a failure is recorded as such."""
    import torch

    from steadygrad.nets import NetSpec, build

    started = time.time()
    row = {
        "key": job.key,
        "spec": json.dumps(job.spec, sort_keys=True),
        "task": job.task,
        "seed": job.seed,
        "data": job.data,
        "started": started,
        "host": socket.gethostname(),
        "metrics": None,
        "error": None,
    }
    try:
        torch.set_num_threads(1)  # one run per worker process: workers, not threads, use the cores
        torch.set_flush_denormal(True)
        spec = NetSpec(**job.spec)
        generator = torch.Generator().manual_seed(job.seed)
        if job.task == "probe":
            from steadygrad.measure import probe

            net = build(spec, generator)
            x, y = spec.example_batch(job.batch, generator)
            report = probe(net, x, y, seed=job.seed)
            finite = [r for r in report.records if r.act_std == r.act_std]
            metrics = {
                "gradient_ratio": report.gradient_ratio,
                "gradient_factor_per_layer": report.gradient_factor_per_layer,
                "input_grad_norm": report.input_grad_norm,
                "loss": report.loss,
                "last_act_std": finite[-1].act_std if finite else math.nan,
                "max_saturated": max(
                    (r.saturated for r in report.records if r.saturated == r.saturated), default=math.nan
                ),
                "max_dead": max((r.dead for r in report.records if r.dead == r.dead), default=math.nan),
                "nonfinite": sum(r.nonfinite_act + r.nonfinite_grad for r in report.records),
            }
            status = "ok" if math.isfinite(report.loss) and metrics["nonfinite"] == 0 else "diverged"
        else:
            from steadygrad import data as sg_data
            from steadygrad.measure import probe
            from steadygrad.train import TrainConfig, Trainer

            dataset = sg_data.load(job.data or "digits", seed=job.seed)
            spec = spec.replace(**dataset.spec_sizes(spec.kind))
            net = build(spec, generator)
            inputs = dataset.inputs_for(spec.kind, dataset.x_train[:256])
            ratio = probe(net, inputs, dataset.y_train[:256]).gradient_ratio
            config = TrainConfig(progress=False, monitor_every=10**9, seed=job.seed, **job.train)
            result = Trainer(net, dataset, config).fit()
            metrics = {
                "gradient_ratio_at_init": ratio,
                "steps": result.steps,
                **{k: v for k, v in result.final.items() if k in ("test_loss", "test_accuracy", "epoch")},
                "findings": [f.kind for f in result.findings],
            }
            status = "ok" if result.status == "completed" else "diverged"
            if status != "ok":
                row["error"] = result.message
        row["metrics"] = json.dumps({k: _clean(v) for k, v in metrics.items()})
        row["status"] = status
    except Exception:
        row["status"] = "failed"
        row["error"] = traceback.format_exc()[-4000:]
    row["finished"] = time.time()
    row["seconds"] = row["finished"] - started
    return row


class SweepDB:
    """The runs table of one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise ValueError(f"{self.path} is a folder; give a file name for the sweep database, e.g. sweep.sqlite.")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(self.path, timeout=60)
            self.conn.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer, nor it them
            with self.conn:
                self.conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as error:
            raise ValueError(f"{self.path} is not a usable SQLite database ({error}). Give a new file name.") from None

    def done(self) -> set[str]:
        return {key for (key,) in self.conn.execute("SELECT key FROM runs")}

    def record(self, row: dict) -> bool:
        """Insert a finished run in its own transaction; False if another sweep recorded it first."""
        columns = (
            "key",
            "spec",
            "task",
            "seed",
            "data",
            "status",
            "metrics",
            "error",
            "started",
            "finished",
            "seconds",
            "host",
        )
        with self.conn:
            cursor = self.conn.execute(
                f"INSERT OR IGNORE INTO runs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                [row.get(c) for c in columns],
            )
        return cursor.rowcount == 1

    def rows(self) -> list[dict]:
        cursor = self.conn.execute("SELECT key, spec, task, seed, data, status, metrics, error, seconds FROM runs")
        names = [d[0] for d in cursor.description]
        out = []
        for values in cursor:
            row = dict(zip(names, values, strict=True))
            row["spec"] = json.loads(row["spec"])
            row["metrics"] = json.loads(row["metrics"]) if row["metrics"] else {}
            out.append(row)
        return out

    def close(self) -> None:
        self.conn.close()


@dataclass
class SweepSummary:
    total: int
    skipped: int  # already in the database
    ran: int
    failed: int
    seconds: float


def run_sweep(
    jobs: list[Job],
    db: SweepDB,
    executor: str = "local",
    workers: int | None = None,
    address: str | None = None,
    on_row: Callable[[dict], None] | None = None,
) -> SweepSummary:
    """Run the jobs not yet in ``db`` and record each as it finishes."""
    executor = check_choice("executor", executor, EXECUTORS)
    start = time.perf_counter()
    done = db.done()
    todo = [job for job in jobs if job.key not in done]
    failed = 0

    def finish(row):
        nonlocal failed
        db.record(row)
        failed += row["status"] != "ok"
        if on_row is not None:
            on_row(row)

    if executor == "ray":
        _run_ray(todo, finish, address)
    elif workers == 1 or len(todo) <= 1:
        for job in todo:
            finish(run_job(job))
    else:
        count = workers or max(1, (os.cpu_count() or 2))
        _run_local(todo, finish, count)
    return SweepSummary(len(jobs), len(jobs) - len(todo), len(todo), failed, time.perf_counter() - start)


def _init_worker(parent: int) -> None:
    die_with_parent(parent)


def _run_local(jobs: list[Job], finish: Callable[[dict], None], workers: int) -> None:
    """The jobs in ``workers`` spawned processes that die with this one (``steadygrad._processes``: a SIGKILLed
    sweep leaves none behind to run on), each row recorded here as it finishes; on any other exit, Ctrl-C included,
    the workers are killed before this returns. Their runs hold nothing worth keeping: only finished rows are."""
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(os.getpid(),)
    )
    try:
        for future in as_completed([pool.submit(run_job, job) for job in jobs]):
            finish(future.result())
    except BaseException:
        # concurrent.futures cannot stop a call that is running: its worker processes are the only handle
        for process in list(getattr(pool, "_processes", {}).values()):
            process.kill()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _run_ray(jobs: Iterable[Job], finish: Callable[[dict], None], address: str | None) -> None:
    try:
        import ray
    except ImportError:
        raise ValueError("--executor ray needs Ray: pip install 'steadygrad[ray]'.") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(run_job)
        pending = [remote.remote(job) for job in jobs]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            finish(ray.get(ready[0]))
    finally:
        if started_here:
            ray.shutdown()
