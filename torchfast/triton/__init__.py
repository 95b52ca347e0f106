"""Triton kernels for torchfast's ops (GPU; on CPU tensors only under TRITON_INTERPRET=1, for tests).

Imported lazily: `import torchfast` never imports Triton.
"""

from __future__ import annotations

import os


_IMPORT_ERROR: list[str | None] = []  # filled on first use; a list so torch.compile reads it as data


def _import_error() -> str | None:
    if not _IMPORT_ERROR:
        try:
            import triton  # noqa: F401

            _IMPORT_ERROR.append(None)
        except Exception as e:  # ImportError, or a broken install
            _IMPORT_ERROR.append(f"Triton is not installed or failed to import ({type(e).__name__}: {e}); "
                                 "pip install triton")
    return _IMPORT_ERROR[0]


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    return _import_error() is None


def unavailable_reason(device_type: str) -> str | None:
    """Why the Triton kernels cannot run on `device_type` now, or None."""
    err = _import_error()
    if err:
        return err
    if device_type == "cpu" and not interpreter_on():
        return "Triton kernels run on CUDA tensors (CPU tensors only with TRITON_INTERPRET=1, for testing)"
    if device_type not in ("cuda", "cpu"):
        return f"Triton kernels do not run on '{device_type}'"
    return None


# CUDA's limit on gridDim.x, which is the limit of a Triton launch grid's axis 0 (axes 1 and 2: 65535).
MAX_GRID_0 = 2**31 - 1


def row_grid(rows: int, op: str) -> tuple[int]:
    """The grid of a launch with one program per row: (rows,), or a clear error past MAX_GRID_0 rows."""
    if rows > MAX_GRID_0:
        raise RuntimeError(f"torchfast.{op} (triton): {rows} rows are more than the {MAX_GRID_0} programs a "
                           "launch grid holds (one per row); use impl='native'")
    return (rows,)
