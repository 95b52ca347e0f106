"""Row widths against the Triton normalization kernels' blocks (torchfast/triton/_norm_rows.py): rows up to
SINGLE_BLOCK_MAX elements in one block, longer ones (hidden 16384 ... 131072) walked in chunks; num_warps
following the block; 0 and 1 rows; the grid limits. Numerics against the float64 references, as in
tests/triton/test_norms.py (whose helpers these use). Under TRITON_INTERPRET=1 on CPU without a GPU.
"""

import pytest
import torch
import triton

import torchfast
from torchfast.ops.layer_norm import layer_norm_reference
from torchfast.ops.rms_norm import rms_norm_reference
from torchfast.testing import assert_close
from torchfast.triton import MAX_GRID_0, _norm_rows, row_grid

from .test_norms import DEVICE, PAIR_IDS, PAIRS, _check_against_reference, _leaves


@pytest.fixture
def short_blocks(monkeypatch):
    """The long-row path on short rows: 16-element chunks, so a row of 37 takes three, the last partial,
    and so do the 16-column programs of the parameter gradients."""
    monkeypatch.setattr(_norm_rows, "SINGLE_BLOCK_MAX", 16)
    monkeypatch.setattr(_norm_rows, "CHUNK", 16)
    monkeypatch.setattr(_norm_rows, "PARAM_BLOCK_C", 16)


@pytest.fixture
def few_column_programs(monkeypatch):
    """Under the interpreter, which runs programs one after another in Python, the parameter gradients of
    a 131072-wide row in 8192-column programs (16 programs instead of 1024: seconds instead of half a
    minute; the column tiling itself is checked by short_blocks). On a GPU the real 128 columns."""
    if DEVICE == "cpu":
        monkeypatch.setattr(_norm_rows, "PARAM_BLOCK_C", 8192)


def _check_all(shape, dtype, pdtype, what):
    """rms_norm, add_rms_norm (on its own rounded h) and layer_norm, forward and backward with every
    parameter gradient, against autograd of the float64 references."""
    x, w, b = _leaves(shape, dtype, pdtype)
    g = torch.randn(shape, device=DEVICE, dtype=dtype)
    _check_against_reference(lambda x, w: torchfast.rms_norm(x, w, eps=1e-6, impl="triton"),
                             lambda x, w: rms_norm_reference(x, w, eps=1e-6), [x, w], dtype, [g], f"rms_norm {what}")
    _check_against_reference(lambda x, w, b: torchfast.layer_norm(x, w, b, eps=1e-5, impl="triton"),
                             lambda x, w, b: layer_norm_reference(x, w, b, eps=1e-5), [x, w, b], dtype, [g],
                             f"layer_norm {what}")
    r = torch.randn(shape, device=DEVICE, dtype=dtype)
    y, h = torchfast.add_rms_norm(x.detach(), r, w.detach(), eps=1e-6, impl="triton")
    assert_close(h, x.detach().double() + r.double(), dtype=dtype, what=f"add_rms_norm h {what}")
    assert_close(y, rms_norm_reference(h.double(), w.detach().double(), eps=1e-6), dtype=dtype,
                 what=f"add_rms_norm y {what}")


@pytest.mark.parametrize("n", [1, 16, 17, 33, 1024, 2048, 5120, 8192, 8193, 16384, 65536, 131072, 262144])
def test_blocks_and_warps_follow_the_row_width(n):
    meta = _norm_rows.launch_meta(n)
    assert meta["single"] == (n <= _norm_rows.SINGLE_BLOCK_MAX)
    block, warps = meta["BLOCK"], meta["num_warps"]
    assert block == triton.next_power_of_2(block) and warps in (4, 8, 16)
    if meta["single"]:
        assert n <= block < max(2 * n, 32)  # the whole row, in the smallest power of two that holds it
    else:
        assert block == _norm_rows.CHUNK
    # Never more than 16 elements of a block per thread (Triton's default 4 warps at BLOCK 65536 held 512).
    assert block // (32 * warps) <= 16


def test_grid_limits():
    assert row_grid(MAX_GRID_0, "rms_norm") == (2**31 - 1,)
    with pytest.raises(RuntimeError, match=r"torchfast\.layer_norm \(triton\): 2147483648 rows are more than"):
        row_grid(2**31, "layer_norm")
    cpu = torch.device("cpu")
    for rows in [1, 15, 16, 17, 1000, 2**31 + 7, 2**40]:
        for n in [1, 128, 131072]:
            slices, per = _norm_rows.param_grad_slices(rows, n, cpu)
            assert 1 <= slices <= 65535 and per % _norm_rows.PARAM_BLOCK_R == 0
            assert (slices - 1) * per < rows <= slices * per, (rows, n, slices, per)  # every row, once
    for rows in [1, 3, 4, 5, 1000, 2**40]:
        programs, per = _norm_rows.group_programs(rows, cpu)
        assert (programs - 1) * per < rows <= programs * per and programs <= min(rows, 4)


@pytest.mark.parametrize("dtype, pdtype", PAIRS, ids=PAIR_IDS)
def test_long_row_path_matches_reference(short_blocks, dtype, pdtype):
    _check_all((5, 37), dtype, pdtype, "in 16-element chunks")
    if dtype == torch.float32:
        _check_all((2, 1), dtype, pdtype, "1-element rows in chunks")
        # 20 rows: the parameter gradients in two row slices, of 16 and 4 rows
        _check_all((20, 37), dtype, pdtype, "in 16-element chunks, 20 rows")


@pytest.mark.parametrize("shape, dtype, pdtype", [((1, 65536), torch.bfloat16, torch.float32),
                                                  ((1, 131072), torch.float32, torch.float32)],
                         ids=["65536-bf16", "131072"])
def test_hidden_65536_and_131072(few_column_programs, shape, dtype, pdtype):
    """Rows of 65536 and 131072 elements with the default chunks: 16 and 32 per sweep."""
    _check_all(shape, dtype, pdtype, f"shape {shape}")


def test_rows_at_the_single_block_border():
    for n in (_norm_rows.SINGLE_BLOCK_MAX, _norm_rows.SINGLE_BLOCK_MAX + 1):
        _check_all((1, n), torch.float32, torch.float32, f"n={n}")


def test_zero_rows_of_131072():
    x = torch.randn(0, 131072, device=DEVICE, requires_grad=True)
    w = torch.rand(131072, device=DEVICE, requires_grad=True)
    b = torch.rand(131072, device=DEVICE, requires_grad=True)
    y = torchfast.rms_norm(x, w, impl="triton")
    dx, dw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    assert y.shape == (0, 131072) and dx.shape == (0, 131072)
    assert torch.equal(dw, torch.zeros_like(w))
    y = torchfast.layer_norm(x, w, b, impl="triton")
    dx, dw, db = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    assert y.shape == dx.shape == (0, 131072) and torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, dw)


class _LaunchSpy:
    """Stands in for wrap_triton in a Triton module: records (kernel name, grid, launch options) of every
    launch and makes it."""

    def __init__(self, real):
        self.real, self.launches = real, []

    def __call__(self, kernel):
        spy = self

        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    spy.launches.append((kernel.fn.__name__, grid, kwargs))
                    return spy.real(kernel)[grid](*args, **kwargs)
                return launch
        return _Grid()


@pytest.mark.parametrize("n", [5120, 8193])
def test_every_norm_launch_sets_its_warps_by_its_block(monkeypatch, n):
    from torchfast.triton import layer_norm as tln
    from torchfast.triton import rms_norm as trn

    spies = []
    for mod in (trn, tln, _norm_rows):
        spies.append(_LaunchSpy(mod.wrap_triton))
        monkeypatch.setattr(mod, "wrap_triton", spies[-1])
    x = torch.randn(3, n, device=DEVICE, requires_grad=True)
    w = torch.rand(n, device=DEVICE, requires_grad=True)
    torch.autograd.grad(torchfast.rms_norm(x, w, impl="triton").sum() + torchfast.layer_norm(x, w, w, impl="triton")
                        .sum(), (x, w))
    launches = [rec for s in spies for rec in s.launches]
    names = {name for name, _, _ in launches}
    single = n <= _norm_rows.SINGLE_BLOCK_MAX
    assert len(launches) == (4 if single else 6), names  # long rows: plus two parameter-gradient launches
    for name, grid, kw in launches:
        block = kw.get("BLOCK") or kw["BLOCK_R"] * kw["BLOCK_C"]
        assert "num_warps" in kw and block // (32 * kw["num_warps"]) <= 16, (name, kw)
        if name.endswith("fwd_kernel") or name.endswith("long_kernel"):
            assert grid == (3,), (name, grid)  # one program per row
