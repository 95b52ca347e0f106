"""build_info(): what this torchfast install can do, for bug reports and `python -m torchfast info`."""

from __future__ import annotations

import platform

import torch

from torchfast import _ext
from torchfast._registry import REGISTRY


def build_info() -> dict:
    """Torch version, compiled backends (CPU ISA variants and the active one; which library runs
    torchfast.ops.linear's float32 CPU GEMMs; CUDA and its archs),
    Triton availability, visible GPU, and which devices each op has a compiled kernel for."""
    from torchfast import triton as tf_triton

    cuda_built = _ext.built() and any(_ext.has_native_kernel(s.qualname(), "cuda") for s in REGISTRY.values())
    gpu = torch.cuda.is_available()
    return {
        "torchfast": _version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "compiled": _ext.built(),
        "load_error": _ext.LOAD_ERROR,
        "cpu_isas": _ext.cpu_isas(),
        "cpu_isas_runnable": _ext.runnable_cpu_isas(),
        "cpu_isa_active": _ext.active_cpu_isa(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_matmul": _cpu_matmul(),
        "cuda_kernels": cuda_built,
        "cuda_arch_list": _ext.cuda_arch_list(),
        "triton": tf_triton.available(),
        "triton_interpret": tf_triton.interpreter_on(),
        "gpu": torch.cuda.get_device_name(0) if gpu else None,
        "num_threads": torch.get_num_threads(),
        "ops": {
            name: [d for d in ("cpu", "cuda") if _ext.has_native_kernel(spec.qualname(), d)]
            for name, spec in sorted(REGISTRY.items())
        },
    }


def _cpu_matmul() -> str:
    from torchfast.ops.linear import cpu_matmul_backend

    try:
        return cpu_matmul_backend()
    except ValueError:
        return "invalid TORCHFAST_CPU_MATMUL"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchfast")
    except PackageNotFoundError:
        return "unknown"


def format_build_info(info: dict | None = None) -> str:
    info = info or build_info()
    width = max(len(k) for k in info)
    lines = []
    for k, v in info.items():
        if isinstance(v, dict):
            v = ", ".join(f"{op}[{'/'.join(devs) or 'reference only'}]" for op, devs in v.items())
        elif isinstance(v, list):
            v = ", ".join(v) or "-"
        lines.append(f"{k:<{width}}  {v}")
    return "\n".join(lines)
