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
from dataclasses import dataclass
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


@dataclass
class _Build:
    """One backend's build in this process: the loaded kernels, the first build's seconds, or why it failed."""

    module: object = None
    seconds: float | None = None
    error: str | None = None


BACKENDS = ("auto", "cpp", "numba")
_BUILDS = {"cpp": _Build(), "numba": _Build()}
_STATE: dict = {"enabled": None}  # the backend switched on: "cpp", "numba" or None

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


def _build_cpp():
    """Compile the C++ kernels (or load them from torch's extension cache): (module, seconds), or RuntimeError
    with the reason."""
    start = time.perf_counter()
    capability = _capability()
    try:
        from torch.utils.cpp_extension import load

        # -fopenmp: at::parallel_for is inline and runs on one thread unless the extension itself is built
        # with OpenMP; the library it links is the libgomp.so.1 torch has already loaded (one runtime)
        flags = ["-O3", "-fopenmp", f"-DCPU_CAPABILITY={capability}", *_CAPABILITY_FLAGS.get(capability, [])]
        module = load(
            name=f"steadygrad_kernels_{capability.lower()}",
            sources=[str(s) for s in SOURCES],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, no headers: keep the eager path and say why
        raise RuntimeError(
            f"steadygrad's compiled kernels could not be built ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:300]}); the eager path is used."
        ) from None
    return module, time.perf_counter() - start


def _build_numba():
    """Compile (or load from numba's cache) the numba kernels, ``jit.py`` and ``jit_collector.py``, by running each
    once on tiny inputs: (module, seconds), or RuntimeError with the reason. The seconds leave out importing
    numba (about a second), which is not the kernels' compile."""
    try:
        import numba
    except ImportError as error:  # not installed, or installed against another numpy
        raise RuntimeError(
            f'numba cannot be imported ({str(error).splitlines()[0][:200]}); pip install "steadygrad[numba]" '
            "for the numba-compiled kernels."
        ) from None
    import torch

    start = time.perf_counter()
    try:
        from steadygrad.fast import jit, jit_collector

        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        with torch.inference_mode(False), torch.enable_grad():  # the warm-up runs a backward pass
            jit.warm_up()
            jit_collector.warm_up()
    except Exception as error:  # a numba that cannot compile them: keep the eager path and say why
        raise RuntimeError(
            f"steadygrad's numba kernels could not be compiled ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:300] if str(error) else ''}); the eager path is used."
        ) from None
    return jit, time.perf_counter() - start


def _built(backend: str) -> _Build:
    """``backend``'s build record ("cpp" or "numba"); ValueError for any other name."""
    if backend not in _BUILDS:
        raise ValueError(f"backend must be 'cpp' or 'numba'; got {backend!r}.")
    return _BUILDS[backend]


def _load(backend: str):
    """``backend``'s kernels, built on the first call; a failure is kept, so later calls raise the same
    RuntimeError without trying again."""
    build = _built(backend)
    if build.module is None:
        if build.error is not None:
            raise RuntimeError(build.error)
        try:
            build.module, build.seconds = _BUILDERS[backend]()
        except RuntimeError as error:
            build.error = str(error)
            raise
    return build.module


_BUILDERS = {"cpp": _build_cpp, "numba": _build_numba}


def kernels():
    """The compiled C++ module, building it on first call (raises RuntimeError with the reason if it cannot)."""
    return _load("cpp")


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
    for name in _BUILDS:
        if backend not in ("auto", name):
            continue
        try:
            _load(name)
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
    return _load(_STATE["enabled"] or "cpp")


def collector_type():
    """The enabled backend's ``Collector``: the Monitor's taps (``csrc/collector.h``, or ``jit_collector.py``)."""
    if _STATE["enabled"] == "numba":
        from steadygrad.fast import jit_collector

        return jit_collector.Collector
    return kernels().Collector


def available(backend: str = "cpp") -> bool:
    """Whether ``backend``'s kernels can be had here: the C++ ones built, or numba's compiled (tries once)."""
    _built(backend)  # an unknown name is refused, not taken for "not available"
    try:
        _load(backend)
        return True
    except RuntimeError:
        return False


def compile_seconds(backend: str = "cpp") -> float | None:
    """Seconds the first build of ``backend``'s kernels took in this process: for C++ a compile or a load from
    torch's extension cache, for numba the compile (or load from numba's cache) of every kernel."""
    return _built(backend).seconds
