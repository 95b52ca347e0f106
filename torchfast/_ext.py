"""Loading of the compiled extension torchfast._C, and what it provides.

When `_C` is missing or fails to load, torchfast still imports: the operators are then defined from
Python with their pure-PyTorch reference implementation as the kernel (see _library.py), and one
warning says what is missing and how to build it.
"""

from __future__ import annotations

import warnings

import torch

BUILD_HINT = "build it with: pip install --no-build-isolation -e .  (from the torchfast source tree)"

try:
    from torchfast import _C  # noqa: F401  (registers the torchfast:: operators)

    LOAD_ERROR: str | None = None
except ImportError as e:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = f"{type(e).__name__}: {e}"
    warnings.warn(
        f"torchfast: the compiled kernels (torchfast._C) are not available ({LOAD_ERROR}); every op runs "
        f"its pure-PyTorch reference implementation. To get the fused kernels, {BUILD_HINT}",
        RuntimeWarning,
        stacklevel=2,
    )


def built() -> bool:
    """True when the compiled extension loaded."""
    return _C is not None


# (qualname, device type) -> whether _C registered a kernel there. Filled once per op at import, so
# the per-call lookup is a plain dict read that torch.compile traces without a graph break.
_NATIVE_KERNELS: dict[tuple[str, str], bool] = {}


def record_native_kernels(qualname: str) -> None:
    for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        _NATIVE_KERNELS[(qualname, device_type)] = _C is not None and (
            torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)
        )


def has_native_kernel(qualname: str, device_type: str) -> bool:
    """Whether the compiled extension registered a kernel of `qualname` for this device type."""
    return _NATIVE_KERNELS.get((qualname, device_type), False)


def cpu_isas() -> list[str]:
    """CPU ISA variants compiled into _C (empty when not built)."""
    return list(_C._compiled_isas()) if _C is not None else []


def runnable_cpu_isas() -> list[str]:
    """The compiled CPU ISA variants this CPU can run (and ATEN_CPU_CAPABILITY allows), lowest first."""
    return list(_C._runnable_isas()) if _C is not None else []


def active_cpu_isa() -> str | None:
    return _C._active_isa() if _C is not None else None


def set_cpu_isa(name: str | None) -> None:
    """Force the CPU kernels of one runnable ISA ("DEFAULT", "AVX2", "AVX512", "AVX512_BF16"); None
    restores ATen's choice. For tests and benchmarks: the kernels of every ISA compute the same function."""
    if _C is None:
        raise RuntimeError(f"torchfast._C is not built ({LOAD_ERROR}); {BUILD_HINT}")
    _C._set_cpu_isa(name or "")


def cuda_arch_list() -> str | None:
    return _C._cuda_arch_list() if _C is not None else None
