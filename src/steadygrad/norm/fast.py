"""The fused normalization kernels' switch: ``steadygrad.fast`` under its earlier name.

``steadygrad.norm.fast.enable()`` is ``steadygrad.fast.enable()``: it switches on every compiled kernel
(normalization and the Monitor's statistics). See ``steadygrad.fast``.
"""

from steadygrad.fast import available, backend, compile_seconds, disable, enable, enabled, kernels

__all__ = ["available", "backend", "compile_seconds", "disable", "enable", "enabled", "kernels"]
