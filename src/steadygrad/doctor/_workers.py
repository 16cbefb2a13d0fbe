"""Trials in parallel worker processes, one thread each, that die with the doctor.

Small models spend their step in Python and in short kernels that one thread runs as fast as several, so two
processes with one thread each finish two trials in about the time one process with two threads finishes one
(``benchmarks/doctor.py`` measures it). Workers are forked, so the user's model factory, loss and optimizer
callables need not be picklable; each dies with its parent (``steadygrad._processes``), so a killed doctor leaves no
process behind, and the pool is terminated on any exit, Ctrl-C included.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable

import torch

from steadygrad._processes import die_with_parent

__all__ = ["available_workers", "run_all"]

_JOB: Callable | None = None  # set before the fork; the children inherit it


def available_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _init_worker(parent: int) -> None:
    torch.set_num_threads(1)
    die_with_parent(parent)  # and Ctrl-C is the parent's: it terminates the pool


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
        pool = multiprocessing.get_context("fork").Pool(
            min(workers, count), initializer=_init_worker, initargs=(os.getpid(),)
        )
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
