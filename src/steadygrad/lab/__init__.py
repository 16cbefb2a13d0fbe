"""The lab: one module per claim of the seed material and the classic papers, each measured, never assumed.

    from steadygrad import lab
    results = lab.run(quick=True)            # every claim at reduced size
    results = lab.run(only=[5, 19])          # some of them
    lab.claims()                             # what each one claims, its source and setup

``steadygrad demo`` runs the suite and writes the report.
"""

from __future__ import annotations

import importlib
import time
import traceback
from collections.abc import Callable, Iterable

import torch

from steadygrad.lab.base import NOT_REPRODUCED, PARTLY, REPRODUCED, Claim, ClaimResult, Context

__all__ = ["EXPERIMENTS", "NOT_REPRODUCED", "PARTLY", "REPRODUCED", "Claim", "ClaimResult", "claims", "run"]

_MODULES = (
    "c01_init_variance",
    "c02_too_small_too_large",
    "c03_identical_init",
    "c04_saturating_activations",
    "c05_he_vs_glorot",
    "c06_skip_connections",
    "c07_batchnorm",
    "c08_train_vs_eval",
    "c09_batch_dependence",
    "c10_bn_backward",
    "c11_bn_folding",
    "c12_bias_before_bn",
    "c13_clipping",
    "c14_centring",
    "c15_rnn_depth",
    "c16_pretraining",
    "c17_fixup",
    "c18_bn_scale_invariance",
    "c19_edge_of_chaos",
    "c20_warmup",
    "c21_deepnorm",
    "c22_rezero",
    "c23_mup",
    "c24_qk_norm",
)
EXPERIMENTS = [importlib.import_module(f"steadygrad.lab.{name}") for name in _MODULES]
ERROR = "error"


def claims() -> list[Claim]:
    return [module.CLAIM for module in EXPERIMENTS]


def _select(only: Iterable[int] | None):
    if only is None:
        return list(EXPERIMENTS)
    wanted = set(only)
    known = {m.CLAIM.number for m in EXPERIMENTS}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(
            f"No claim numbered {', '.join(map(str, unknown))}; the claims are 1 to {max(known)} "
            "(steadygrad demo --list)."
        )
    return [m for m in EXPERIMENTS if m.CLAIM.number in wanted]


def run(
    quick: bool = False,
    only: Iterable[int] | None = None,
    seed: int = 0,
    on_result: Callable[[ClaimResult], None] | None = None,
    on_start: Callable[[Claim], None] | None = None,
) -> list[ClaimResult]:
    """Run the selected experiments in order and return their results.

    An experiment that crashes is reported as a result with verdict ``error`` and its traceback; the others
    still run, so no completed result is lost. ``torch.set_flush_denormal(True)`` is set for the run (denormal
    floats make near-zero activations 5-10x slower on CPUs) and restored afterwards.
    """
    selected = _select(only)
    context = Context(quick=quick, seed=seed)
    results = []
    previous_threads = torch.get_num_threads()
    torch.set_flush_denormal(True)
    try:
        for module in selected:
            if on_start is not None:
                on_start(module.CLAIM)
            start = time.perf_counter()
            try:
                result = module.run(context)
            except Exception:  # one broken experiment must not take the report down with it
                result = ClaimResult(
                    module.CLAIM,
                    ERROR,
                    "The experiment failed before it could measure anything.",
                    error=traceback.format_exc(),
                )
            result.seconds = time.perf_counter() - start
            result.quick = quick
            results.append(result)
            if on_result is not None:
                on_result(result)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(previous_threads)
    return results
