"""Trials in parallel worker processes, one thread each, that die with the doctor.

Small models spend their step in Python and in short kernels that one thread runs as fast as several, so two
processes with one thread each finish two trials in about the time one process with two threads finishes one
(``benchmarks/doctor.py`` measures it). Workers are forked, so the user's model factory, loss and optimizer
callables need not be picklable; each sets a parent-death signal (Linux), so a killed doctor leaves no process
behind, and the pool is terminated on any exit, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable

import torch

__all__ = ["available_workers", "run_all"]

_JOB: Callable | None = None  # set before the fork; the children inherit it


def available_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before the signal was set
        os._exit(1)


def _init_worker() -> None:
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the pool
    _die_with_parent()


def _run(index: int):
    return index, _JOB(index)


def run_all(job: Callable[[int], object], count: int, workers: int, done: Callable[[int, object], None]) -> list:
    """``[job(0), ..., job(count - 1)]``, in ``workers`` forked processes (in this one when ``workers`` <= 1);
    ``done(index, result)`` is called in this process as each finishes."""
    global _JOB
    results: list = [None] * count
    if workers <= 1 or count <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for i in range(count):
            results[i] = job(i)
            done(i, results[i])
        return results
    _JOB = job
    try:
        pool = multiprocessing.get_context("fork").Pool(min(workers, count), initializer=_init_worker)
        try:
            for i, result in pool.imap_unordered(_run, range(count)):
                results[i] = result
                done(i, result)
            pool.close()
        finally:
            pool.terminate()
            pool.join()
    finally:
        _JOB = None
    return results
