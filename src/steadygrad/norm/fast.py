"""Opt-in fused normalization kernels (CPU, float32), compiled from ``csrc/norm_kernels.cpp`` on first use.

    import steadygrad.norm.fast as fast
    fast.enable()          # compiles once (about a minute), cached across processes by torch's extension cache

Nothing is compiled unless you ask: importing steadygrad never builds anything. When enabled, steadygrad's
batch (training mode), layer and group norms on contiguous float32 CPU tensors run these kernels; every other
case (other dtypes or devices, channels_last, eval-mode BatchNorm, instance norm) keeps the eager path, and
the results are the same either way (tested).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["available", "compile_seconds", "disable", "enable", "enabled", "kernels"]

_STATE: dict = {"module": None, "enabled": False, "seconds": None, "error": None}
SOURCE = Path(__file__).parent / "csrc" / "norm_kernels.cpp"


def kernels():
    """The compiled module, building it on first call (raises RuntimeError with the reason if it cannot)."""
    if _STATE["module"] is None:
        if _STATE["error"] is not None:
            raise RuntimeError(_STATE["error"])
        start = time.perf_counter()
        try:
            from torch.utils.cpp_extension import load

            flags = ["-O3", "-fopenmp-simd"] + ([] if os.environ.get("STEADYGRAD_PORTABLE") else ["-march=native"])
            _STATE["module"] = load(
                name="steadygrad_norm_kernels", sources=[str(SOURCE)], extra_cflags=flags, verbose=False
            )
        except Exception as error:  # no compiler, no ninja, no headers: keep the eager path and say why
            _STATE["error"] = (
                f"steadygrad's fused norm kernels could not be built ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:300]}); the eager path is used."
            )
            raise RuntimeError(_STATE["error"]) from None
        _STATE["seconds"] = time.perf_counter() - start
    return _STATE["module"]


def enable() -> bool:
    """Build (or load from the cache) and switch on the fused kernels; False, with a warning, if impossible."""
    try:
        kernels()
    except RuntimeError as error:
        import warnings

        warnings.warn(str(error), RuntimeWarning, stacklevel=2)
        return False
    _STATE["enabled"] = True
    return True


def disable() -> None:
    _STATE["enabled"] = False


def enabled() -> bool:
    return _STATE["enabled"]


def available() -> bool:
    """Whether the kernels can be built here (tries once; cached)."""
    try:
        kernels()
        return True
    except RuntimeError:
        return False


def compile_seconds() -> float | None:
    """Seconds the first ``kernels()`` call took in this process (a compile, or a load from the cache)."""
    return _STATE["seconds"]
