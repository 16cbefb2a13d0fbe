"""steadygrad's compiled kernels (CPU, float32), built on first use and only when asked.

    import steadygrad
    steadygrad.fast.enable()   # first time: compiles (about 30 s); later processes load the cached build

Two backends run the same kernels:

- ``"cpp"``: ``csrc/``, built with torch's C++ extension machinery (a C++ compiler and ninja). It switches on
  the fused normalization kernels (steadygrad's batch (training mode), layer and group norms on contiguous
  float32 CPU tensors: the hand-derived math written with explicit SIMD, each group's data visited while it is
  in cache, through a C++ autograd function) and the Monitor's compiled taps (``csrc/collector.cpp``,
  ``csrc/stats.cpp``) for float32 CPU models: each layer output and its gradient summed in C++ when the gradient
  arrives (no Python in the backward pass), every layer's parameters in one parallel pass at the step's end.
- ``"numba"``: ``jit.py``, the norm kernels compiled by numba (``pip install "steadygrad[numba]"``), whose
  wheel carries its own LLVM: no system compiler at all; and ``jit_collector.py``, the Monitor's taps with the
  same sums, in Python hooks around numba kernels.

``enable()`` (backend ``"auto"``) takes C++ and, where it cannot be built, numba, saying so in a warning. Every
other case (other dtypes or devices, channels_last, eval-mode BatchNorm, instance norm) keeps the eager path,
and the results are the same either way (tested). Nothing is compiled unless you ask: importing steadygrad
never builds anything, and ``enable()`` returns False with a warning, never raises, where neither backend can
be had. The C++ build targets the vector instructions torch itself dispatches to on this CPU
(``torch.backends.cpu.get_cpu_capability()``: AVX-512, AVX2 or portable code) and lands in torch's extension
cache (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``); numba's machine code lands in its
cache (see ``jit.py``). Later processes load either in well under a second (``compile_seconds``).
"""

from __future__ import annotations

import time
from pathlib import Path

__all__ = [
    "BACKENDS",
    "available",
    "backend",
    "collector_type",
    "compile_seconds",
    "disable",
    "enable",
    "enabled",
    "kernels",
    "norm_kernels",
]

_STATE: dict = {
    "module": None,  # the C++ build, its first call's seconds, or why it failed
    "seconds": None,
    "error": None,
    "jit": None,  # the numba kernels, the same three
    "jit_seconds": None,
    "jit_error": None,
    "enabled": None,  # the backend switched on: "cpp", "numba" or None
}
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


BACKENDS = ("auto", "cpp", "numba")


def _numba_kernels():
    """The numba-compiled kernels (``jit.py``, ``jit_collector.py``), compiled or loaded from numba's cache on
    first call (raises RuntimeError with the reason if they cannot be had)."""
    if _STATE["jit"] is None:
        if _STATE["jit_error"] is not None:
            raise RuntimeError(_STATE["jit_error"])
        try:
            import numba
        except ImportError as error:  # not installed, or installed against another numpy
            _STATE["jit_error"] = (
                f'numba cannot be imported ({str(error).splitlines()[0][:200]}); pip install "steadygrad[numba]" '
                "for the numba-compiled kernels."
            )
            raise RuntimeError(_STATE["jit_error"]) from None
        import torch

        start = time.perf_counter()
        try:
            from steadygrad.fast import jit, jit_collector

            numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
            with torch.inference_mode(False), torch.enable_grad():  # the warm-up runs a backward pass
                jit.warm_up()
                jit_collector.warm_up()
        except Exception as error:  # a numba that cannot compile them: keep the eager path and say why
            _STATE["jit_error"] = (
                f"steadygrad's numba kernels could not be compiled ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:300] if str(error) else ''}); the eager path is used."
            )
            raise RuntimeError(_STATE["jit_error"]) from None
        _STATE["jit_seconds"] = time.perf_counter() - start
        _STATE["jit"] = jit
    return _STATE["jit"]


def enable(backend: str = "auto") -> bool:
    """Switch on steadygrad's compiled kernels; False, with a warning, if impossible (never raises for that).

    Args:
        backend: ``"cpp"`` builds the C++ kernels (or loads them from torch's extension cache): the norms and
            the Monitor's taps. ``"numba"`` compiles the norm kernels with numba (``pip install
            "steadygrad[numba]"``), which needs no C++ compiler, and the Monitor's taps in Python around numba
            kernels (``jit_collector.py``).
            ``"auto"`` (the default) takes C++ and, where that cannot be built, numba.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}.")
    import warnings

    reasons = []
    for name, build in (("cpp", kernels), ("numba", _numba_kernels)):
        if backend not in ("auto", name):
            continue
        try:
            build()
        except RuntimeError as error:
            reasons.append(str(error))
            continue
        if reasons:  # auto, after C++ failed: say that numba stands in
            message = f"{reasons[0]} steadygrad's numba-compiled kernels are used instead."
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        _STATE["enabled"] = name
        return True
    warnings.warn(" ".join(reasons), RuntimeWarning, stacklevel=2)
    return False


def disable() -> None:
    """Switch the compiled kernels off (the eager path again); the build stays loaded."""
    _STATE["enabled"] = None


def enabled() -> bool:
    """Whether compiled kernels (of either backend) are on."""
    return _STATE["enabled"] is not None


def backend() -> str | None:
    """Which kernels are on: ``"cpp"``, ``"numba"``, or None (the eager path)."""
    return _STATE["enabled"]


def norm_kernels():
    """The enabled backend's normalization entry points (``batch_norm_train``, ``rows_norm``)."""
    return _STATE["jit"] if _STATE["enabled"] == "numba" else kernels()


def collector_type():
    """The enabled backend's ``Collector``: the Monitor's taps (``csrc/collector.h``, or ``jit_collector.py``)."""
    if _STATE["enabled"] == "numba":
        from steadygrad.fast import jit_collector

        return jit_collector.Collector
    return kernels().Collector


def available(backend: str = "cpp") -> bool:
    """Whether ``backend``'s kernels can be had here: the C++ ones built, or numba's compiled (tries once)."""
    builders = {"cpp": kernels, "numba": _numba_kernels}
    if backend not in builders:
        raise ValueError(f"backend must be 'cpp' or 'numba'; got {backend!r}.")
    try:
        builders[backend]()
        return True
    except RuntimeError:
        return False


def compile_seconds(backend: str = "cpp") -> float | None:
    """Seconds the first build of ``backend``'s kernels took in this process: for C++ a compile or a load from
    torch's extension cache, for numba the compile (or load from numba's cache) of every kernel."""
    return _STATE["seconds" if backend == "cpp" else "jit_seconds"]
