"""steadygrad's compiled kernels (CPU, float32), built from ``csrc/`` on first use and only when asked.

    import steadygrad
    steadygrad.fast.enable()   # first time: compiles (about a minute); later processes load the cached build

What it switches on:

- the fused normalization kernels: steadygrad's batch (training mode), layer and group norms on contiguous
  float32 CPU tensors run ``csrc/norm.cpp`` (the same hand-derived math, written with explicit SIMD and
  each group's data visited while it is in cache) through a C++ autograd function;
- the Monitor's compiled taps (``csrc/collector.cpp``, ``csrc/stats.cpp``) for float32 CPU models: each
  layer output and its gradient are summed in C++ when the gradient arrives (a C++ tensor hook: no Python in
  the backward pass), and every layer's parameters in one parallel pass at the step's end, instead of a dozen
  small reductions per tensor.

Every other case (other dtypes or devices, channels_last, eval-mode BatchNorm, instance norm) keeps the eager
path, and the results are the same either way (tested). Nothing is compiled unless you ask: importing
steadygrad never builds anything, and ``enable()`` returns False with a warning, never raises, where no
compiler is found. The build targets the vector instructions torch itself dispatches to on this CPU
(``torch.backends.cpu.get_cpu_capability()``: AVX-512, AVX2 or portable code) and lands in torch's extension
cache (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), shared by later processes.
"""

from __future__ import annotations

import time
from pathlib import Path

__all__ = ["available", "compile_seconds", "disable", "enable", "enabled", "kernels"]

_STATE: dict = {"module": None, "enabled": False, "seconds": None, "error": None}
SOURCES = [Path(__file__).parent / "csrc" / name for name in ("bindings.cpp", "norm.cpp", "stats.cpp", "collector.cpp")]

# The flags torch's own CPU kernels are built with for each capability (ATen/cpu/vec selects its
# Vectorized<float> implementation from CPU_CAPABILITY_*).
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
}


def _capability() -> str:
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in _CAPABILITY_FLAGS else "DEFAULT"


def kernels():
    """The compiled module, building it on first call (raises RuntimeError with the reason if it cannot)."""
    if _STATE["module"] is None:
        if _STATE["error"] is not None:
            raise RuntimeError(_STATE["error"])
        start = time.perf_counter()
        capability = _capability()
        try:
            from torch.utils.cpp_extension import load

            # -fopenmp: at::parallel_for is inline and runs on one thread unless the extension itself is built
            # with OpenMP; the library it links is the libgomp.so.1 torch has already loaded (one runtime)
            flags = ["-O3", "-fopenmp", f"-DCPU_CAPABILITY={capability}", *_CAPABILITY_FLAGS.get(capability, [])]
            _STATE["module"] = load(
                name=f"steadygrad_kernels_{capability.lower()}",
                sources=[str(s) for s in SOURCES],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as error:  # no compiler, no ninja, no headers: keep the eager path and say why
            _STATE["error"] = (
                f"steadygrad's compiled kernels could not be built ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:300]}); the eager path is used."
            )
            raise RuntimeError(_STATE["error"]) from None
        _STATE["seconds"] = time.perf_counter() - start
    return _STATE["module"]


def enable() -> bool:
    """Build (or load from the cache) and switch on the compiled kernels; False, with a warning, if impossible."""
    try:
        kernels()
    except RuntimeError as error:
        import warnings

        warnings.warn(str(error), RuntimeWarning, stacklevel=2)
        return False
    _STATE["enabled"] = True
    return True


def disable() -> None:
    """Switch the compiled kernels off (the eager path again); the build stays loaded."""
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
