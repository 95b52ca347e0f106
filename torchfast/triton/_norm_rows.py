"""Launch sizes of the Triton normalization kernels (rms_norm, add_rms_norm, layer_norm), and the kernel
their long-row path shares: the weight and bias gradients as column sums.

Two paths, by row length n:
- n <= SINGLE_BLOCK_MAX: the row is held in one block of BLOCK = next power of two >= n elements, so x is
  read once; one program per row forward, one per group of rows backward (the weight gradient summed in
  registers).
- longer rows (hidden 16384, 65536, 131072, ...): the row is walked in CHUNK-element steps, two or three
  sweeps per row (the row stays in L2 between them); one program per row, forward and for dx, then
  `_norm_param_grads_kernel` sums the parameter gradients over rows column by column. Nothing is held
  across a whole row, so there is no length limit, no register spilling, and no program reads memory
  that another thread of it wrote.

num_warps keeps a block at no more than 16 elements per thread: a backward program holds five [BLOCK]
values (g, x, w, dx, the weight-gradient sum), about 80 registers a thread, within the 128 that each of
512 threads (16 warps) can have. Triton's default of 4 warps would give 64 elements per thread at BLOCK
8192 and 512 at 65536: spilled to local memory.

Offsets: program ids are widened to int64 before they multiply a row length, so row * n is exact past
2^31 elements; grids are one program per row along axis 0 (at most 2^31 - 1: torchfast.triton.row_grid
checks it with a clear error) and at most 65535 along axis 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# Module-level so tests can lower them and run the long-row path on short rows.
SINGLE_BLOCK_MAX = 8192
CHUNK = 4096
MAX_GRID_1 = 65535  # gridDim.y, the limit of a Triton grid's axis 1
# The column-sum kernel: BLOCK_R rows x BLOCK_C columns per step, 16 elements per thread at 4 warps.
PARAM_BLOCK_R, PARAM_BLOCK_C = 16, 128


def num_warps(block: int) -> int:
    """Warps for a program over `block` elements: at most 16 elements per thread, 4 to 16 warps."""
    return max(4, min(16, block // 512))


def launch_meta(n: int) -> dict:
    """BLOCK (the row's block, or the chunk of a long row), num_warps and whether the row fits one block."""
    single = n <= SINGLE_BLOCK_MAX
    block = max(16, triton.next_power_of_2(n)) if single else CHUNK
    return {"BLOCK": block, "num_warps": num_warps(block), "single": single}


def group_programs(rows: int, device: torch.device) -> tuple[int, int]:
    """(programs, rows per program) of a backward that gives each program a group of rows: about four
    programs per SM (4 on CPU, under the interpreter), every program at least one row."""
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    per_prog = triton.cdiv(rows, min(rows, target))
    return triton.cdiv(rows, per_prog), per_prog


def param_grad_slices(rows: int, n: int, device: torch.device) -> tuple[int, int]:
    """(row slices, rows per slice) of `_norm_param_grads_kernel`: about four programs per SM in all,
    at most MAX_GRID_1 slices, each a whole number of PARAM_BLOCK_R rows."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    col_programs = triton.cdiv(n, PARAM_BLOCK_C)
    slices = max(1, min(triton.cdiv(4 * sms, col_programs), triton.cdiv(rows, PARAM_BLOCK_R), MAX_GRID_1))
    per_slice = triton.cdiv(triton.cdiv(rows, slices), PARAM_BLOCK_R) * PARAM_BLOCK_R
    return triton.cdiv(rows, per_slice), per_slice


@triton.jit
def _norm_param_grads_kernel(g_ptr, x_ptr, mean_ptr, rstd_ptr, pdw_ptr, pdb_ptr, rows, n, rows_per_slice,
                             HAS_MEAN: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, F64: tl.constexpr):
    """pdw[s, c] = sum over the rows r of slice s of g[r, c] * (x[r, c] - mean[r]) * rstd[r] (no mean for
    rms_norm) and pdb[s, c] = sum of g[r, c]: the parameter gradients of the normalizations, before the
    sum over slices. Program (i, s) takes columns [i BLOCK_C, (i + 1) BLOCK_C) of slice s."""
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < n
    s = tl.program_id(1).to(tl.int64)
    r0 = s * rows_per_slice
    r_end = tl.minimum(r0 + rows_per_slice, rows)
    if F64:
        acc_dw = tl.zeros([BLOCK_C], dtype=tl.float64)
        acc_db = tl.zeros([BLOCK_C], dtype=tl.float64)
    else:
        acc_dw = tl.zeros([BLOCK_C], dtype=tl.float32)
        acc_db = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, rows_per_slice, BLOCK_R):
        r = r0 + start + tl.arange(0, BLOCK_R)
        rmask = r < r_end
        mask = rmask[:, None] & cmask[None, :]
        offs = r[:, None] * n + c[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        if not F64:
            g = g.to(tl.float32)
        if WANT_DW:
            x = tl.load(x_ptr + offs, mask=mask, other=0.0)
            if not F64:
                x = x.to(tl.float32)
            rs = tl.load(rstd_ptr + r, mask=rmask, other=0.0)
            if HAS_MEAN:
                m = tl.load(mean_ptr + r, mask=rmask, other=0.0)
                x = x - m[:, None]
            acc_dw += tl.sum(g * x * rs[:, None], axis=0)
        if WANT_DB:
            acc_db += tl.sum(g, axis=0)
    if WANT_DW:
        tl.store(pdw_ptr + s * n + c, acc_dw, mask=cmask)
    if WANT_DB:
        tl.store(pdb_ptr + s * n + c, acc_db, mask=cmask)


def param_grads(g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor | None, rstd: torch.Tensor,
                want_dw: bool, want_db: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The column sums of `_norm_param_grads_kernel` over contiguous [rows, n] g and x: (dw, db) in the
    math dtype (fp32, fp64 for float64), None where not wanted."""
    rows, n = g.shape
    slices, per_slice = param_grad_slices(rows, n, g.device)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    pdw = torch.empty((slices, n), dtype=acc, device=g.device) if want_dw else None
    pdb = torch.empty((slices, n), dtype=acc, device=g.device) if want_db else None
    wrap_triton(_norm_param_grads_kernel)[(triton.cdiv(n, PARAM_BLOCK_C), slices)](
        g, x, mean if mean is not None else rstd, rstd, pdw if pdw is not None else rstd,
        pdb if pdb is not None else rstd, rows, n, per_slice, HAS_MEAN=mean is not None, WANT_DW=want_dw,
        WANT_DB=want_db, BLOCK_R=PARAM_BLOCK_R, BLOCK_C=PARAM_BLOCK_C, F64=x.dtype == torch.float64,
        num_warps=4)
    return (pdw.sum(0) if pdw is not None else None), (pdb.sum(0) if pdb is not None else None)
