"""Every Triton kernel at element offsets past 2^31, emulated on CPU in Triton's interpreter.

A tensor of 2^31 elements does not fit this machine's tests, and a grid of 2^21 programs would take the
interpreter hours. But only the offset arithmetic is at stake, so each kernel runs one program as if it
were program P of a large grid (the interpreter's program id is shifted by P, still an int32 as on a GPU),
on buffers of 2^31 + 2^21 elements that are allocated and never touched except near the offsets the
program reaches (torch.empty maps pages lazily: a few KB of each is resident). The same program runs once
as program 0 (or with a small row index) on the same data; the far run must reproduce the near run
bit for bit.

Two guards turn a broken kernel into a clean failure instead of a wild memory access:
- the interpreter's debug mode, in which an int32 add/sub/mul that overflows raises ("int32 overflow
  detected for operation mul"): exactly what `tl.program_id(0) * BLOCK` without `.to(tl.int64)` does at
  program 2^21;
- every load and store is checked to fall inside the buffers given to the kernel.

On a GPU the interpreter is off; test_past_2_31_elements_gpu runs the real thing there.
"""

import contextlib
import dataclasses

import numpy as np
import pytest
import torch

from torchfast.triton import interpreter_on

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from torchfast.triton import _norm_rows  # noqa: E402
from torchfast.triton import bias_act as tba  # noqa: E402
from torchfast.triton import cross_entropy as tce  # noqa: E402
from torchfast.triton import glu as tglu  # noqa: E402
from torchfast.triton import layer_norm as tln  # noqa: E402
from torchfast.triton import rms_norm as trn  # noqa: E402
from torchfast.triton import swish as tsw  # noqa: E402

pytestmark = pytest.mark.skipif(not interpreter_on(), reason="emulates large grids in Triton's interpreter "
                                "(TRITON_INTERPRET=1, set by tests/conftest.py without a GPU)")

BIG = 2**31 + 2**21  # elements of each buffer: every far region below lies in [2^31, BIG)
BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def big():
    """Three bf16 buffers of BIG elements (4.3 GB of address space each, almost none of it touched)."""
    bufs = [torch.empty(BIG, dtype=BF16) for _ in range(3)]
    yield bufs
    del bufs


@contextlib.contextmanager
def far_program(pid_offsets, buffers):
    """Inside: interpreted launches run program (i, j) as (i + pid_offsets[0], j + pid_offsets[1]), in
    debug mode (int32 overflow raises), with every load and store checked against `buffers`."""
    from triton.runtime import interpreter as ti

    builder = ti.interpreter_builder
    spans = [(t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
             for t in buffers]

    def check(ptrs, mask, what):
        addr = ptrs.data[mask.data] if mask is not None else ptrs.data.ravel()
        if addr.size == 0:
            return
        lo, hi = int(addr.min()), int(addr.max())
        assert any(s <= lo and hi < e for s, e in spans), \
            f"{what} at {lo:#x}..{hi:#x}, outside every buffer given to the kernel"

    orig = (builder.create_get_program_id, builder.create_masked_load, builder.create_masked_store,
            builder.options)

    def program_id(axis):
        h = orig[0](axis)
        off = pid_offsets[axis] if axis < len(pid_offsets) else 0
        assert int(h.data[0]) + off < 2**31  # a GPU's program ids are int32 too
        return ti.TensorHandle(np.array([h.data[0] + off], dtype=np.int32), tl.int32)

    def load(ptrs, mask, other, *a):
        check(ptrs, mask, "load")
        return orig[1](ptrs, mask, other, *a)

    def store(ptrs, value, mask, *a):
        check(ptrs, mask, "store")
        return orig[2](ptrs, value, mask, *a)

    builder.create_get_program_id, builder.create_masked_load, builder.create_masked_store = program_id, load, store
    builder.options = dataclasses.replace(orig[3], debug=True)
    try:
        yield
    finally:
        builder.create_get_program_id, builder.create_masked_load, builder.create_masked_store, builder.options = orig


def run_near_and_far(kernel, grid, near, far, args_near, args_far, inputs, outputs, kwargs):
    """Runs `kernel` once as program `near` and once as program `far` (pid offsets per grid axis).
    inputs: (tensor, near start, far start, length) regions filled with the same random data; outputs:
    the same for what the kernel writes, filled with NaN first. Asserts the far outputs equal the near
    ones and that the kernel wrote every output element."""
    torch.manual_seed(0)
    for t, a, b, n in inputs:
        data = (torch.randn(n) * 2).to(t.dtype) if t.dtype.is_floating_point else torch.randint(0, 2, (n,))
        t[a:a + n] = data
        t[b:b + n] = data
    for t, a, b, n in outputs:
        t[a:a + n] = float("nan")
        t[b:b + n] = float("nan")
    buffers = [x for x in list(args_near) + list(args_far) if isinstance(x, torch.Tensor)]
    for pid, args in ((near, args_near), (far, args_far)):
        with far_program(pid, buffers):
            kernel[grid](*args, **kwargs)
    for t, a, b, n in outputs:
        assert not t[a:a + n].isnan().any(), "the near run left outputs unwritten"
        assert torch.equal(t[a:a + n], t[b:b + n]), "the far run differs from the near run"


def test_elementwise_kernels_past_2_31(big):
    a, b, c = big
    n, P = BIG, 2**21  # program P starts at element P * 1024 = 2^31
    at = P * 1024
    kw = dict(BLOCK=1024, F64=False)
    run_near_and_far(tsw._swish_fwd_kernel, (1,), (0,), (P,), (a, b, n), (a, b, n),
                     [(a, 0, at, 1024)], [(b, 0, at, 1024)], kw)
    run_near_and_far(tsw._swish_bwd_kernel, (1,), (0,), (P,), (a, a, b, n), (a, a, b, n),
                     [(a, 0, at, 1024)], [(b, 0, at, 1024)], kw)
    bias = torch.randn(1024)  # column = offset % cols: the same columns near and far
    for act in (1, 2, 3, 4):
        run_near_and_far(tba._bias_act_fwd_kernel, (1,), (0,), (P,), (a, bias, b, n, 1024), (a, bias, b, n, 1024),
                         [(a, 0, at, 1024)], [(b, 0, at, 1024)], dict(kw, ACT=act, HAS_BIAS=True))
        run_near_and_far(tba._bias_act_dx_kernel, (1,), (0,), (P,), (a, a, b, n), (a, a, b, n),
                         [(a, 0, at, 1024)], [(b, 0, at, 1024)], dict(kw, ACT=act))


def test_glu_packed_past_2_31(big):
    """Packed [gate | up] rows of 2 x 1024: output element 2^30 reads input element 2^31."""
    a, b, c = big
    P = 2**20
    out_at, in_at = P * 1024, P * 2048
    n = (P + 1) * 1024
    kw = dict(ACT=4, PACKED=True, BLOCK=1024, F64=False)
    args = (a, a[1024:], b, n, 1024, 2048)
    run_near_and_far(tglu._glu_fwd_kernel, (1,), (0,), (P,), args, args, [(a, 0, in_at, 2048)],
                     [(b, 0, out_at, 1024)], kw)
    args = (b, a, a[1024:], c, c[1024:], n, 1024, 2048)
    run_near_and_far(tglu._glu_bwd_kernel, (1,), (0,), (P,), args, args, [(a, 0, in_at, 2048), (b, 0, out_at, 1024)],
                     [(c, 0, in_at, 2048)], kw)


@pytest.mark.parametrize("n", [1024, 10000], ids=["one-block", "long-rows"])
def test_norm_forward_past_2_31(big, n):
    """Row P of rows of n elements starts at element P * n >= 2^31 (one block per row for 1024, the
    chunked path for 10000)."""
    a, b, c = big
    meta = _norm_rows.launch_meta(n)
    P = -(-2**31 // n)
    at = P * n
    w = torch.rand(n) + 0.5
    stat = [torch.empty(P + 1) for _ in range(2)]
    single = meta["single"]
    kw = dict(BLOCK=meta["BLOCK"], F64=False)
    rms = trn._rms_norm_fwd_kernel if single else trn._rms_norm_fwd_long_kernel
    args = (a, c, w, b, c, stat[0], n, 1e-6)
    run_near_and_far(rms, (1,), (0,), (P,), args, args, [(a, 0, at, n)], [(b, 0, at, n), (stat[0], 0, P, 1)],
                     dict(kw, HAS_RES=False, HAS_W=True))
    # add_rms_norm (with residual = x): h = x + residual written at the same offsets
    args = (a, a, w, b, c, stat[0], n, 1e-6)
    run_near_and_far(rms, (1,), (0,), (P,), args, args, [(a, 0, at, n)],
                     [(b, 0, at, n), (c, 0, at, n), (stat[0], 0, P, 1)], dict(kw, HAS_RES=True, HAS_W=False))
    ln = tln._layer_norm_fwd_kernel if single else tln._layer_norm_fwd_long_kernel
    args = (a, w, w, b, stat[0], stat[1], n, 1e-5)
    run_near_and_far(ln, (1,), (0,), (P,), args, args, [(a, 0, at, n)],
                     [(b, 0, at, n), (stat[0], 0, P, 1), (stat[1], 0, P, 1)], dict(kw, HAS_W=True, HAS_B=True))


@pytest.mark.parametrize("n", [1024, 10000], ids=["one-block", "long-rows"])
def test_norm_backward_past_2_31(big, n):
    a, b, c = big
    meta = _norm_rows.launch_meta(n)
    P = -(-2**31 // n)
    at = P * n
    w = torch.rand(n) + 0.5
    stat = [torch.empty(P + 1) for _ in range(2)]
    ins = [(a, 0, at, n), (stat[0], 0, P, 1), (stat[1], 0, P, 1)]  # x (also g and grad_h), mean, rstd
    kw = dict(BLOCK=meta["BLOCK"], F64=False)
    if meta["single"]:
        # One program of the grouped backward: program 1 with P rows per program starts at row P (the
        # near run: program 0, one row per program). Its weight-gradient partial row is stored at 1 * n.
        pdw = torch.empty(2 * n)
        near = (a, a, w, stat[0], a, b, pdw, 1, n, 1)
        far = (a, a, w, stat[0], a, b, pdw, P + 1, n, P)
        run_near_and_far(trn._rms_norm_bwd_kernel, (1,), (0,), (1,), near, far, ins,
                         [(b, 0, at, n), (pdw, 0, n, n)], dict(kw, HAS_W=True, HAS_GS=True))
        pdb = torch.empty(2 * n)
        near = (a, a, w, stat[0], stat[1], b, pdw, pdb, 1, n, 1)
        far = (a, a, w, stat[0], stat[1], b, pdw, pdb, P + 1, n, P)
        run_near_and_far(tln._layer_norm_bwd_kernel, (1,), (0,), (1,), near, far, ins,
                         [(b, 0, at, n), (pdw, 0, n, n), (pdb, 0, n, n)],
                         dict(kw, HAS_W=True, WANT_DW=True, WANT_DB=True))
    else:
        args = (a, a, w, stat[0], a, b, n)
        run_near_and_far(trn._rms_norm_bwd_long_kernel, (1,), (0,), (P,), args, args, ins,
                         [(b, 0, at, n)], dict(kw, HAS_W=True, HAS_GS=True))
        args = (a, a, w, stat[0], stat[1], b, n)
        run_near_and_far(tln._layer_norm_bwd_long_kernel, (1,), (0,), (P,), args, args, ins,
                         [(b, 0, at, n)], dict(kw, HAS_W=True))


def test_norm_param_grads_past_2_31(big):
    """Row slice s of 16 rows of 65536 starts at element 16 * s * 65536 = 2^31 for s = 2048 (within
    gridDim.y's 65535); its partial row is stored at s * 65536."""
    a, b, c = big
    n, per, S = 65536, 16, 2048
    at = S * per * n
    stat = [torch.empty(S * per + per) for _ in range(2)]
    pd = [torch.empty((S + 1) * n) for _ in range(2)]
    bc = _norm_rows.PARAM_BLOCK_C
    args = (a, c, stat[0], stat[1], pd[0], pd[1], (S + 1) * per, n, per)
    inputs = [(a, i * n, at + i * n, bc) for i in range(per)] + [(c, i * n, at + i * n, bc) for i in range(per)]
    inputs += [(stat[0], 0, S * per, per), (stat[1], 0, S * per, per)]
    run_near_and_far(_norm_rows._norm_param_grads_kernel, (1, 1), (0, 0), (0, S), args, args, inputs,
                     [(pd[0], 0, S * n, bc), (pd[1], 0, S * n, bc)],
                     dict(HAS_MEAN=True, WANT_DW=True, WANT_DB=True, BLOCK_R=_norm_rows.PARAM_BLOCK_R, BLOCK_C=bc,
                          F64=False))


def test_bias_grad_reduction_past_2_31(big):
    """bias_act's backward with a bias: row slice s of 16 rows of 65536 starts at element 2^31 for s = 2048;
    dx is written there and the slice's partial column sums at s * 65536."""
    a, b, c = big
    n, per, S = 65536, 16, 2048
    at = S * per * n
    bc = tba._BLOCK_C
    bias = torch.randn(n)
    partial = torch.empty((S + 1) * n)
    args = (a, c, bias, b, partial, (S + 1) * per, n, per)
    rows = [(t, i * n, at + i * n, bc) for i in range(per) for t in (a, c)]
    run_near_and_far(tba._bias_act_bwd_reduce_kernel, (1, 1), (0, 0), (0, S), args, args, rows,
                     [(b, i * n, at + i * n, bc) for i in range(per)] + [(partial, 0, S * n, bc)],
                     dict(ACT=3, BLOCK_R=tba._BLOCK_R, BLOCK_C=bc, F64=False))


def test_cross_entropy_past_2_31(big):
    """Row P of V = 1024 logits starts at element P * 1024 = 2^31; the gradient is written there too."""
    a, b, c = big
    V, P = 1024, 2**21
    at = P * V
    t = torch.empty(P + 1, dtype=torch.int64)
    t[0] = t[P] = 5
    loss, lse, g = torch.empty(P + 1), torch.empty(P + 1), torch.ones(1)
    opts = (-100, 0.1, 1e-4, 30.0)
    consts = dict(HAS_SOFTCAP=True, BLOCK_V=1024)
    args = (a, V, t, loss, lse, g, 0, V, *opts)
    run_near_and_far(tce._cross_entropy_fwd_kernel, (1,), (0,), (P,), args, args, [(a, 0, at, V)],
                     [(loss, 0, P, 1), (lse, 0, P, 1)],
                     dict(consts, HAS_SMOOTHING=True, HAS_Z_LOSS=True, WRITE_GRAD=False))
    lse[0] = lse[P] = 7.0
    args = (g, 0, a, V, t, lse, b, V, V, *opts)
    run_near_and_far(tce._cross_entropy_bwd_kernel, (1,), (0,), (P,), args, args, [(a, 0, at, V)], [(b, 0, at, V)],
                     consts)


def test_an_int32_offset_is_caught_cleanly(big):
    """The guard itself: a kernel with the int32 offset arithmetic this file exists to catch fails with
    an error, not a crash."""
    a, b, _ = big

    @triton.jit
    def int32_copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # int32: wraps at program 2^21
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    with pytest.raises(Exception, match="int32 overflow detected for operation mul"):
        run_near_and_far(int32_copy, (1,), (0,), (2**21,), (a, b, BIG), (a, b, BIG), [(a, 0, 2**31, 1024)],
                         [(b, 0, 2**31, 1024)], dict(BLOCK=1024))
