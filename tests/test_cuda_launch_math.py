"""The host-side launch arithmetic of the CUDA kernels (csrc/include/torchfast/launch_math.h), checked on a
machine without a GPU at the sizes where CUDA code usually breaks: past 2^31 elements, rows wider than one
block, 0 and 1 rows, and grids past CUDA's dimension limits.

The header is plain C++ with no CUDA and no torch, and the CUDA helpers (cuda_utils.cuh, norm_cuda.cuh,
act_cuda.cuh, bias_act_cuda.cu) call it for every launch, so the code tested here is the code that picks
the grids on the GPU. tests/csrc/launch_math_check.cpp wraps it in C functions; this test compiles that
with the C++ compiler the build uses (about half a second) and calls it through ctypes.

Where a kernel's index arithmetic is at stake, the test emulates it: the int32 / int64 operations of the
bias_act and glu grid-stride loops, done in numpy with the kernel's index type (numpy integer arrays wrap
on overflow, as the GPU does), against exact Python integers.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
INT32_MAX = 2**31 - 1
# (SMs, max resident threads per SM) of the GPUs the default arch list targets, plus a small one.
GPUS = {
    "A100": (108, 2048),
    "H200": (132, 2048),
    "B200": (148, 2048),
    "RTX5090": (170, 1536),
    "tiny": (1, 1024),
}
# Element counts around 2^31 and far past it, as a bf16 tensor of 3e9 elements fits in one H200.
SIZES = [0, 1, 2, 7, 255, 256, 257, 65535, 65536, 2**31 - 2**20, 2**31 - 270337, 2**31 - 1, 2**31, 2**31 + 1,
         3 * 10**9, 2**34 + 3, 2**40]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH (the torchfast build needs one too)")
    so = tmp_path_factory.mktemp("launch_math") / "launch_math_check.so"
    subprocess.run([cxx, "-O1", "-std=c++17", "-shared", "-fPIC", f"-I{ROOT / 'csrc' / 'include'}",
                    str(ROOT / "tests" / "csrc" / "launch_math_check.cpp"), "-o", str(so)], check=True)
    lib = ctypes.CDLL(str(so))
    i64, i32 = ctypes.c_int64, ctypes.c_int
    sig = {
        "tf_grid_stride_blocks": (i64, [i64, i32, i32, i32]),
        "tf_row_threads": (i32, [i64, i32]),
        "tf_row_blocks": (i64, [i64, i32, i32, i32]),
        "tf_fits_int32_loop": (i32, [i64, i32, i64]),
        "tf_map_launch": (i64, [i64, i32, i32, i32, ctypes.POINTER(i32)]),
        "tf_column_reduce_slices": (i64, [i64, i64, i32, i32, i32]),
        "tf_constant": (i64, [i32]),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def map_launch(lm, elements, vec, gpu):
    int32 = ctypes.c_int(-1)
    blocks = lm.tf_map_launch(elements, vec, *GPUS[gpu], ctypes.byref(int32))
    return blocks, bool(int32.value)


def test_cuda_limits_are_the_documented_ones(lm):
    assert lm.tf_constant(0) == 2**31 - 1  # gridDim.x
    assert lm.tf_constant(1) == 65535  # gridDim.y and .z
    assert lm.tf_constant(2) == 1024  # threads per block, and the row kernels' __launch_bounds__


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("threads", [32, 256, 1024])
def test_grid_stride_grid_is_never_empty_never_past_one_wave_or_grid_x(lm, gpu, threads):
    sms, per_sm = GPUS[gpu]
    wave = sms * max(1, per_sm // threads)
    for items in SIZES:
        blocks = lm.tf_grid_stride_blocks(items, threads, sms, per_sm)
        assert 1 <= blocks <= min(wave, 2**31 - 1), (items, blocks)
        # Up to one wave, one item per thread: every item gets its own thread, no block is idle.
        if items <= wave * threads:
            assert (blocks - 1) * threads < max(items, 1) <= blocks * threads, (items, blocks)
        else:
            assert blocks == wave
    # A device so large that a wave would pass gridDim.x still gets a legal grid.
    assert lm.tf_grid_stride_blocks(2**62, 32, 2**30, 2048) == 2**31 - 1


@pytest.mark.parametrize("vec", [1, 2, 4, 8])
def test_row_threads_are_whole_warps_and_cover_the_row_in_one_sweep_when_they_can(lm, vec):
    for n in [1, 7, 31, 32, 33, 1000, 4096, 5120, 65536, 131072, 262144, 2**31 + 5, 2**40]:
        t = lm.tf_row_threads(n, vec)
        assert t % 32 == 0 and 32 <= t <= 1024, (n, t)
        per_row = -(-n // vec)
        if per_row <= 1024:
            assert t - 32 < per_row <= t, (n, vec, t)  # one sweep, the fewest warps that do it
        else:
            assert t == 1024, (n, t)  # hidden 65536 / 131072: the kernel's loop takes several sweeps


@pytest.mark.parametrize("gpu", GPUS)
def test_row_blocks_one_per_row_up_to_a_wave(lm, gpu):
    sms, per_sm = GPUS[gpu]
    for threads in (32, 256, 1024):
        wave = sms * max(1, per_sm // threads)
        assert lm.tf_row_blocks(0, threads, sms, per_sm) == 1  # callers return before launching 0 rows
        assert lm.tf_row_blocks(1, threads, sms, per_sm) == 1
        for rows in SIZES[2:]:
            assert lm.tf_row_blocks(rows, threads, sms, per_sm) == min(rows, wave)


def emulate_map_indices(rows, cols, vec, row_stride, blocks, index_dtype):
    """The bias_act / glu kernel's index arithmetic for the threads that run the loop's last steps, in the
    kernel's index type I (numpy wraps on overflow, as the GPU does):

        for (I v = tid; v < n_vec; v += stride) { I i = v * N, r = i / cols, c = i - r * cols;
                                                   offset = r * row_stride + c; }   // row_stride: int64

    Returns (offsets of each thread's last step, the loop variable after it, that last step), int64."""
    it = np.dtype(index_dtype).type
    stride = blocks * 256
    n_vec = rows * cols // vec
    tids = np.arange(min(stride, n_vec), dtype=np.int64)
    last = tids + (n_vec - 1 - tids) // stride * stride  # each thread's last v, exactly
    with np.errstate(over="ignore"):
        v = last.astype(index_dtype)
        i = v * it(vec)
        r = i // it(cols)
        c = i - r * it(cols)
        offset = r.astype(np.int64) * np.int64(row_stride) + c.astype(np.int64)
        after = v + np.array(stride).astype(index_dtype)  # v += gridDim.x * blockDim.x, in I
    return offset, after.astype(np.int64), last


@pytest.mark.parametrize("gpu", ["H200", "RTX5090", "tiny"])
def test_map_index_type_never_lets_the_loop_wrap(lm, gpu):
    """For every size: the kernel's offsets in the index type picked by map_launch are the exact ones, and
    the loop variable after the last step is past the end (so the loop stops). Checked on the threads of
    the loop's last steps, where the values are largest."""
    for elements in SIZES[1:]:
        for vec in (1, 8):
            cols = 4096 if elements % 4096 == 0 and elements >= 4096 else elements
            rows = elements // cols
            if rows * cols // vec == 0:
                continue
            blocks, int32 = map_launch(lm, rows * cols, vec, gpu)
            assert int32 == (rows * cols // vec - 1 + blocks * 256 <= INT32_MAX and rows * cols <= INT32_MAX)
            if rows * cols > 2**34:  # the emulation holds one value per thread: enough past 2^31
                continue
            offsets, after, last = emulate_map_indices(rows, cols, vec, cols + 3, blocks,
                                                       np.int32 if int32 else np.int64)
            exact = last * vec // cols * (cols + 3) + last * vec % cols  # int64: exact below 2^63
            assert np.array_equal(offsets, exact), (elements, vec, gpu)
            assert min(after) >= rows * cols // vec, (elements, vec, gpu, min(after))


def test_the_old_int32_rule_wrapped_near_2_to_the_31(lm):
    """The rule before this check (int32 whenever rows * cols <= 2^31 - 1) for a misaligned view of
    2^31 - 1 elements on an H200: the scalar loop's stride is 132 * 8 * 256 = 270336 threads, so the last
    steps of the loop wrap to negative indices that still pass `v < n_vec` (an out-of-bounds access);
    the index type map_launch picks there is int64, which does not wrap."""
    elements = 2**31 - 1
    blocks, int32 = map_launch(lm, elements, 1, "H200")
    assert blocks == 132 * 8
    _, after, _ = emulate_map_indices(1, elements, 1, 0, blocks, np.int32)
    assert min(after) < 0  # what the old choice would have run
    assert not int32
    _, after, _ = emulate_map_indices(1, elements, 1, 0, blocks, np.int64)
    assert min(after) >= elements
    # The vector path (8 bf16 per step) has 8x fewer steps: int32 is still safe there.
    assert map_launch(lm, elements - elements % 8, 8, "H200") == (blocks, True)


def test_fits_int32_loop_boundaries(lm):
    assert lm.tf_fits_int32_loop(INT32_MAX, 8, 1024) == 1
    assert lm.tf_fits_int32_loop(INT32_MAX + 1, 8, 1024) == 0  # rows * cols itself is computed in I
    assert lm.tf_fits_int32_loop(INT32_MAX - 1023, 1, 1024) == 1  # last value exactly 2^31 - 1
    assert lm.tf_fits_int32_loop(INT32_MAX - 1022, 1, 1024) == 0
    assert lm.tf_fits_int32_loop(-1, 1, 1) == 0


@pytest.mark.parametrize("gpu", GPUS)
def test_column_reduce_slices_stay_within_grid_y(lm, gpu):
    sms = GPUS[gpu][0]
    for rows in [1, 7, 8, 9, 1000, 2**20, 2**31 + 1, 2**40]:
        for cols in [1, 32, 33, 4096, 131072, 2**24]:
            s = lm.tf_column_reduce_slices(rows, cols, 32, 8, sms)
            assert 1 <= s <= min(-(-rows // 8), 65535), (rows, cols, s)
            col_blocks = -(-cols // 32)
            if s < min(-(-rows // 8), 65535):  # not capped: about 8 blocks per SM in all
                assert (s - 1) * col_blocks < 8 * sms <= s * col_blocks, (rows, cols, s)
