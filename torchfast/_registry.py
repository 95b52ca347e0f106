"""The single source of truth for torchfast's operators, and per-call choice of implementation.

Each op module (torchfast/ops/<op>.py) registers one `OpSpec`: its schemas, reference, sample inputs,
implementations in priority order, module and ONNX translations. Tests, benchmarks, the export tables
and `build_info()` read this registry, so a new op is added by adding files, not by editing lists.

Choosing an implementation follows xformers: each `Impl` says which devices and dtypes it supports
and whether it was built; `select()` walks them in priority order and, when none fits, raises an error
listing every implementation and why it was refused. The choice is per call (`impl=` argument) or per
context (`with torchfast.use_impl("triton"):`), never a process-wide swap.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
IMPL_NAMES = ("auto", "native", "triton", "reference")


@dataclass(frozen=True)
class Impl:
    """One implementation of an op.

    name:       "native" (the C++/CUDA kernels behind torch.ops.torchfast.*), "triton" or "reference".
    fn:         differentiable callable with the public function's signature (keyword options included).
    devices:    device types it runs on.
    dtypes:     floating dtypes it accepts.
    unavailable: (device_type, explicit) -> why it cannot run there (not built, no Triton, ...) or
                None; `explicit` is True when the caller asked for this implementation by name.
    auto:       whether "auto" may pick it (the reference is only taken when asked for by name).
    """

    name: str
    fn: Callable
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    unavailable: Callable[[str, bool], str | None] = lambda device_type, explicit: None
    auto: bool = True

    def not_supported_reasons(self, tensors: Sequence[torch.Tensor], explicit: bool = False) -> list[str]:
        reasons = []
        for t in tensors:
            if t.device.type not in self.devices:
                reasons.append(f"device '{t.device.type}' not supported (supports: {', '.join(self.devices)})")
                break
        for t in tensors:
            if t.dtype not in self.dtypes:
                reasons.append(f"dtype {t.dtype} not supported")
                break
        if not reasons:
            why = self.unavailable(tensors[0].device.type, explicit)
            if why:
                reasons.append(why)
        return reasons


@dataclass
class OpSpec:
    """Everything torchfast knows about one op (see the module docstring)."""

    name: str
    schemas: dict[str, str]
    reference: Callable
    impls: list[Impl]
    sample_inputs: Callable[[torch.device, torch.dtype], list[tuple[tuple, dict]]]
    arg_names: tuple[str, ...]
    module: type | None = None
    function: Callable | None = None  # the public, differentiable function (torchfast.<name>)
    onnx_translations: dict = field(default_factory=dict)
    onnx_symbolics: dict = field(default_factory=dict)

    def qualname(self, op: str | None = None) -> str:
        return f"torchfast::{op or self.name}"


REGISTRY: dict[str, OpSpec] = {}
_IMPL_STACK: list[str] = []  # innermost use_impl() last; a plain list so torch.compile can read it


def register(spec: OpSpec) -> OpSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"torchfast op '{spec.name}' registered twice")
    REGISTRY[spec.name] = spec
    return spec


def _check_impl_name(name: str) -> str:
    if name not in IMPL_NAMES:
        raise ValueError(f"torchfast: unknown implementation '{name}'; choose one of {', '.join(IMPL_NAMES)}")
    return name


@contextlib.contextmanager
def use_impl(name: str) -> Iterator[None]:
    """Run torchfast ops inside the block with implementation `name` ("auto", "native", "triton",
    "reference"), unless a call passes `impl=` itself. Nests; restores the previous choice on exit."""
    _IMPL_STACK.append(_check_impl_name(name))
    try:
        yield
    finally:
        _IMPL_STACK.pop()


def check_same_device(op: str, named: Iterable[tuple[str, object]]) -> None:
    """Raise unless every tensor among the (argument name, value) pairs is on one device (type and
    index); None and non-tensors are skipped. The words are those of the C++ check_same_device
    (csrc/include/torchfast/checks.h), so every implementation refuses a mix alike. Called by `select`
    (every public call, whatever the implementation) and by the fake kernels, which also serve as the
    ops' Meta kernels: a call mixing meta and CPU tensors dispatches to Meta and would otherwise return
    an empty CPU tensor built from the first argument."""
    first: tuple[str, torch.device] | None = None
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            continue
        if first is None:
            first = (name, t.device)
        elif t.device != first[1]:
            raise RuntimeError(f"torchfast.{op}: '{first[0]}' is on {first[1]} but '{name}' is on {t.device}; "
                               "they must be on the same device")


def select(spec: OpSpec, tensors: Sequence[torch.Tensor], impl: str | None,
           others: Sequence[tuple[str, torch.Tensor]] = ()) -> Impl:
    """The implementation to run `spec` on `tensors` (see module docstring for the rules). `others` are
    (name, tensor) pairs of non-float tensor arguments (class targets): checked for device only."""
    name = impl if impl is not None else (_IMPL_STACK[-1] if _IMPL_STACK else "auto")
    _check_impl_name(name)
    for arg, t in zip(spec.arg_names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"torchfast.{spec.name}: argument '{arg}' must be a Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise RuntimeError(
                f"torchfast.{spec.name}: argument '{arg}' has layout {t.layout}; only dense (strided) "
                "tensors are supported (call .to_dense() first)"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"torchfast.{spec.name}: argument '{arg}' has dtype {t.dtype}; "
                "supported dtypes are float32, float64, bfloat16 and float16"
            )
    check_same_device(spec.name, [*zip(spec.arg_names, tensors), *others])
    candidates = [i for i in spec.impls if (i.name == name if name != "auto" else i.auto)]
    refused = []
    for candidate in candidates:
        reasons = candidate.not_supported_reasons(tensors, explicit=name != "auto")
        if not reasons:
            return candidate
        refused.append(f"  {candidate.name}: {'; '.join(reasons)}")
    if not candidates:
        refused.append(f"  {name}: torchfast.{spec.name} has no such implementation")
    raise RuntimeError(
        f"torchfast.{spec.name}: no implementation ({name}) can run on these inputs "
        f"({', '.join(f'{a}: {t.device.type} {t.dtype}' for a, t in zip(spec.arg_names, tensors))}):\n"
        + "\n".join(refused)
        + "\n  (impl='reference' runs the pure-PyTorch version on any device)"
    )
