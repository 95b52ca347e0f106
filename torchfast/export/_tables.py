"""ONNX translations of the torchfast ops, gathered from the registry for both torch exporters.

Each op module fills two fields of its `OpSpec` (see torchfast/ops/swish.py, section "ONNX"):

    spec.onnx_translations = {"swish": {18: fn, 24: fn24}}   # torch.onnx.export(dynamo=True)
    spec.onnx_symbolics    = {"swish": {9: symbolic}}        # torch.onnx.export(dynamo=False)

The outer key is the op's name in the `torchfast::` namespace (as in `spec.schemas`); the inner key is
the first ONNX opset the function may be used for. Exporting at opset N uses, per op, the function with
the largest key <= N: the same rule torch's TorchScript exporter applies to its symbolic registry, so a
new op adds entries to its own spec and no list here changes.

Nothing in this module imports torch.onnx, onnx or onnxscript at import time: it is imported by
`import torchfast` (through the op modules), and those imports cost more than torchfast itself.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from torchfast._registry import OpSpec


# Default opset per exporter: 20 for both, the default of torch.onnx.export itself. Here, not in _onnx.py,
# because onnx_translation_table needs it and _onnx.py imports this module (so the import runs one way).
# - dynamo: the Sigmoid+Mul graph of opset 20 runs on any runtime that runs the same model exported
#   with torch.nn.SiLU, and onnxruntime 1.32 fuses Sigmoid+Mul into its QuickGelu kernel, while it
#   runs opset 24's Swish by expanding the op's function body into Mul/Sigmoid/Mul (seen in its
#   optimized-model dump): on 2^20 float32 elements, one thread, 0.3 ms at opset 20 against 0.7 ms
#   at 24. So opset 24 buys neither portability nor speed today; ask for it with opset=24 when a
#   runtime implements Swish natively.
# - torchscript: 20 is the newest opset this exporter supports.
DEFAULT_OPSET = {"dynamo": 20, "torchscript": 20}


def pick_opset(functions: dict[int, Callable], opset: int) -> Callable | None:
    """The function of `functions` (first opset -> function) to use when exporting at `opset`."""
    usable = [first for first in functions if first <= opset]
    return functions[max(usable)] if usable else None


def onnx_opset(version: int):
    """The standard ONNX domain at `version`, as an onnxscript opset whose attributes are the ONNX ops
    (`onnx_opset(24).Swish(x)`). Translation functions call this instead of importing
    `onnxscript.opsetNN` at module level, so `import torchfast` never imports onnxscript, and so opsets
    newer than onnxscript's pre-generated modules (0.7 stops at opset23) are reachable: the ops come
    from the onnx package's schemas."""
    from onnxscript.values import Opset

    return Opset("", version)


# Translations of non-torchfast operators that torchfast's own features put in graphs, keyed by the
# OpOverload, then by first opset, as in the specs. Filled by the module that needs it when it is
# imported (torchfast/compress/_quantize.py: aten._int_mm of torchao's int8 dynamic quantization).
EXTRA_TRANSLATIONS: dict = {}


def onnx_translation_table(opset: int | None = None) -> dict:
    """`custom_translation_table` for `torch.onnx.export(..., dynamo=True, opset_version=opset)`
    mapping every torchfast op (its OpOverload) that has a translation for `opset` to it.

    Args:
        opset: the opset_version you pass to torch.onnx.export (default:
            `torchfast.export.DEFAULT_OPSET["dynamo"]`). It picks e.g. Swish (opset >= 24) or
            Sigmoid+Mul (below), so pass the same number to both.
    """
    from torchfast._registry import REGISTRY

    opset = DEFAULT_OPSET["dynamo"] if opset is None else opset
    table = {op: fn for op, functions in EXTRA_TRANSLATIONS.items()
             if (fn := pick_opset(functions, opset)) is not None}
    for spec in REGISTRY.values():
        for op_name, functions in spec.onnx_translations.items():
            fn = pick_opset(functions, opset)
            if fn is not None:
                table[getattr(torch.ops.torchfast, op_name).default] = fn
    return table


# --- symbolics for the TorchScript exporter, registered when torch.onnx is first imported -----------
#
# Users who call torch.onnx.export(..., dynamo=False) after `import torchfast` must find the symbolics
# registered. Registering needs torch.onnx, whose import made `import torchfast` (after torch) take
# about 60 ms instead of 11-14 (medians of 15 fresh processes); the hook costs nothing measurable. So
# when torch.onnx is not imported yet, a one-shot import hook registers them right after it is: any
# torch.onnx.export call imports it first (`torch.onnx` is one of torch's lazily imported submodules).

_PENDING: list[OpSpec] = []
_REGISTERED: set[tuple[str, int]] = set()


def _register_pending() -> None:
    from torch.onnx import register_custom_op_symbolic

    while _PENDING:
        spec = _PENDING.pop(0)
        for op_name, functions in spec.onnx_symbolics.items():
            for first_opset, fn in functions.items():
                key = (spec.qualname(op_name), first_opset)
                if key not in _REGISTERED:
                    register_custom_op_symbolic(key[0], fn, first_opset)
                    _REGISTERED.add(key)


def _torch_onnx_loaded() -> bool:
    module = sys.modules.get("torch.onnx")
    # While torch.onnx is executing its own import it is already in sys.modules, half built.
    return module is not None and hasattr(module, "register_custom_op_symbolic")


class _RegisterAfterLoad(importlib.abc.Loader):
    """Wraps torch.onnx's own loader; runs the pending registrations once the module has executed."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        # Give the module its real loader back, so nothing later sees this wrapper.
        module.__loader__ = module.__spec__.loader = self.loader
        try:
            _register_pending()
        except Exception as e:  # never break `import torch.onnx` for the user
            warnings.warn(f"torchfast: could not register the ONNX symbolics of its ops ({e!r}); "
                          "torch.onnx.export(dynamo=False) will not know torchfast ops", RuntimeWarning)


class _TorchOnnxImportHook(importlib.abc.MetaPathFinder):
    """Finds torch.onnx with the other finders and wraps its loader; removes itself on first use."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "torch.onnx":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the search below from finding itself
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisterAfterLoad(spec.loader)
                return spec
        return None


def register_onnx_symbolics(spec: OpSpec) -> None:
    """Register `spec.onnx_symbolics` with torch.onnx.register_custom_op_symbolic: now if torch.onnx
    is imported, else right after it is (see above). Called by each op module when it registers."""
    _PENDING.append(spec)
    if _torch_onnx_loaded():
        _register_pending()
    elif "torch.onnx" not in sys.modules and not any(isinstance(f, _TorchOnnxImportHook)
                                                     for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchOnnxImportHook())


def ensure_symbolics_registered() -> None:
    """Import torch.onnx (which registers everything pending through the hook) and register anything
    still pending, e.g. specs queued while torch.onnx was half imported."""
    import torch.onnx  # noqa: F401

    _register_pending()
