"""torch.library plumbing shared by the op modules (torchfast/ops/) and the Triton operators
(torchfast/triton/): schemas (when _C is missing), autograd for the build without _C, autocast rules,
and the `unavailable` rule of the native implementations.

It sits at the top of the package, beside _ext.py and _registry.py, not in torchfast/ops/ (importing
anything under torchfast.ops imports every op module, and the op modules import torchfast.triton's
modules when Triton runs: the cycle this placement ends) nor in torchfast/reference/ (it registers
kernels; it is not a reference). It imports nothing of torchfast but _ext and _registry."""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch

from torchfast import _ext, _registry

# Kept alive for the life of the process: dropping a Library object unregisters what it registered.
_LIBS: list[torch.library.Library] = []


def _lib(kind: str) -> torch.library.Library:
    lib = torch.library.Library("torchfast", kind)
    _LIBS.append(lib)
    return lib


def define_fallback(schemas: dict[str, str], kernels: dict[str, Callable]) -> None:
    """Without _C, define the ops from Python with their reference implementation as the CPU and CUDA
    kernel, so that everything built on the ops (autograd, modules, compile, export) keeps working.
    With _C, the C++ TORCH_LIBRARY block already defined them and this does nothing."""
    if _ext.built():
        return
    lib = _lib("FRAGMENT")
    for name, schema in schemas.items():
        lib.define(name + schema)
        for key in ("CPU", "CUDA"):
            lib.impl(name, kernels[name], key)


def register_fake(qualname: str, fn: Callable | None = None):
    """torch.library.register_fake, with every tensor argument checked to be on one device first (see
    _registry.check_same_device: the fake kernel is also the Meta kernel, which a call mixing meta and
    CPU tensors reaches instead of the C++ kernels and their checks). Use as a decorator or directly."""
    op = qualname.split("::")[-1]

    def wrap(fake: Callable) -> Callable:
        names = list(inspect.signature(fake).parameters)

        @functools.wraps(fake)
        def checked(*args, **kwargs):
            _registry.check_same_device(op, [*zip(names, args), *kwargs.items()])
            return fake(*args, **kwargs)

        torch.library.register_fake(qualname, checked)
        return fake

    return wrap if fn is None else wrap(fn)


def register_autograd_fallback(qualname: str, backward: Callable, setup_context: Callable) -> None:
    """Python autograd for an op whose C++ autograd (csrc/ops/<op>/<op>_autograd.cpp) is missing
    because _C is not built. With _C the C++ registration is used: it is the same math at a fraction
    of the per-call cost."""
    if not _ext.built():
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)


def register_autocast_same_dtype(qualname: str) -> None:
    """Autocast rule of the elementwise ops: run on the inputs as they are, in their own dtype.

    bf16/fp16 inputs are computed in fp32 inside the kernel and rounded once on store, so there is
    nothing to gain from casting them up (that would double the memory traffic) and nothing to lose by
    not casting them down. This matches torch's policy for activations such as F.silu. Without a
    rule, autocast would fall through to the same result; registering it makes the policy explicit and
    keeps autocast from being re-applied below this op."""
    register_autocast_casting(qualname, _as_they_are)


def _as_they_are(*args, **kwargs):
    return args, kwargs


def native_unavailable(qualname: str) -> Callable[[str, bool], str | None]:
    """The `unavailable` rule of a "native" Impl (see torchfast._registry.Impl).

    Without _C the op still exists with its reference kernel, so "auto" may take it and graphs keep
    the same torchfast ops; only an explicit impl="native" is refused, with the reason and the fix."""

    for name in (qualname, qualname + "_backward"):
        _ext.record_native_kernels(name)

    def unavailable(device_type: str, explicit: bool) -> str | None:
        if device_type == "meta":
            return None
        if not _ext.built():
            return f"torchfast._C is not built ({_ext.LOAD_ERROR}); {_ext.BUILD_HINT}" if explicit else None
        if not _ext.has_native_kernel(qualname, device_type):
            return f"torchfast._C was built without {device_type.upper()} kernels"
        return None

    return unavailable


def register_autocast_casting(qualname: str, cast: Callable) -> None:
    """Autocast rule of ops whose inputs may legitimately differ in dtype under autocast (a bf16
    activation with an fp32 bias, a bf16 gate with an fp32 up): `cast(*args, **kwargs)` returns the
    (args, kwargs) to run the op on, with autocast excluded below it. The casts it makes go through
    the dispatcher, so autograd records them and gradients reach the original dtypes. Inputs that
    already agree are passed as they are (fp32 math inside the kernels, as register_autocast_same_dtype
    explains)."""
    ns, name = qualname.split("::")
    op = getattr(getattr(torch.ops, ns), name)
    lib = _lib("IMPL")
    for key in ("AutocastCPU", "AutocastCUDA"):
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, _excluded=excluded, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(_excluded):
                args, kwargs = cast(*args, **kwargs)
                return op(*args, **kwargs)

        lib.impl(name, kernel, key, with_keyset=True)
