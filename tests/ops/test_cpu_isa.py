"""ISA variants against each other where their results must agree bit for bit.

- AVX512_BF16 (ours: AVX-512 plus native float->bfloat16 rounding) against the AVX512 variant it
  extends: the same kernels, except that the native instruction flushes float32 subnormals
  (|v| < 2^-126, which the emulation may round up to 2^-126) to zero where the emulation keeps them.
- AVX2, whose elementwise kernels widen bf16/fp16 in float blocks (with_float_blocks in
  elementwise.h), against AVX512's one-step loops: the same float math rounded once at the store."""

import pytest
import torch

import torchfast

RUNNABLE = torchfast._ext.runnable_cpu_isas()

def _needs(*isas):
    why = f"needs the {' and '.join(isas)} variants built and runnable (here: {RUNNABLE})"
    return pytest.mark.skipif(not set(isas) <= set(RUNNABLE), reason=why)


TINY = torch.finfo(torch.float32).tiny


def _cases():
    ops = torch.ops.torchfast
    x = torch.randn(4099, 1031, dtype=torch.bfloat16) * 4
    x[0, :8] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-39, -3e-39, 88.0])
    g = torch.randn_like(x)
    up = torch.randn_like(x)
    b = torch.randn(x.shape[-1], dtype=torch.bfloat16)
    w = torch.rand(x.shape[-1]) + 0.5
    return {
        "swish": lambda: ops.swish(x),
        "swish_backward": lambda: ops.swish_backward(g, x),
        "bias_act_gelu": lambda: ops.bias_act(x, b, act="gelu"),
        "bias_act_backward": lambda: ops.bias_act_backward(g, x, b, act="gelu_tanh")[0],
        "swiglu": lambda: ops.swiglu(x, up),
        "geglu_backward": lambda: ops.geglu_backward(g, x, up, approximate="none")[1],
        "rms_norm": lambda: ops.rms_norm(x, w, eps=1e-6)[0],
        "layer_norm": lambda: ops.layer_norm(x, w, w, eps=1e-5)[0],
        "add_rms_norm": lambda: ops.add_rms_norm(x, up, w, eps=1e-6)[0],
    }


@_needs("AVX512", "AVX512_BF16")
@pytest.mark.parametrize("name", list(_cases()))
def test_native_bf16_rounding_matches_the_emulation(name, restore_cpu_isa):
    run = _cases()[name]
    torchfast._ext.set_cpu_isa("AVX512")
    emulated = run()
    torchfast._ext.set_cpu_isa("AVX512_BF16")
    native = run()
    assert native.dtype == torch.bfloat16
    a, b = emulated.float(), native.float()
    same = (a == b) | (a.isnan() & b.isnan())
    # Where they differ, the emulation kept a subnormal that the instruction flushed to (signed) zero.
    flushed = (a.abs() <= TINY) & (b == 0)
    bad = ~(same | flushed)
    assert not bad.any(), f"{name}: {int(bad.sum())} elements differ, e.g. {a[bad][:4]} vs {b[bad][:4]}"
    assert same.float().mean() > 0.999


def _elementwise_cases(dtype):
    """Elementwise ops whose float math is the same on AVX2 and AVX-512. Left out: gelu with erf (bias_act
    "gelu", geglu "none"), whose bf16 path divides on AVX2 but takes a 14-bit reciprocal on AVX-512
    (recip_approx in elementwise.h): about 0.3% of bfloat16 results one unit apart, before and after
    the float blocks."""
    ops = torch.ops.torchfast
    gen = torch.Generator().manual_seed(0)
    # 2600 columns: rows end mid-block (512) and mid-vector; the view's rows start unaligned.
    x = (torch.randn(37, 2600, generator=gen) * 4).to(dtype)
    x[0, :8] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-30, -3e-30, 88.0])
    g, up = torch.randn(2, *x.shape, generator=gen).to(dtype)
    b = torch.randn(x.shape[-1], generator=gen).to(dtype)
    xv, gv = x[:, 5:2590], g[:, 5:2590]
    flat = (torch.randn(100_003, generator=gen) * 4).to(dtype)  # one range split across threads
    cases = {
        "swish": lambda: [ops.swish(flat), ops.swish(xv)],
        "swish_backward": lambda: [ops.swish_backward(flat, flat), ops.swish_backward(gv, xv)],
        "swiglu": lambda: [ops.swiglu(x, up), ops.swiglu(xv, gv)],
        "swiglu_backward": lambda: list(ops.swiglu_backward(g, x, up)),
        "geglu_tanh": lambda: [ops.geglu(x, up, approximate="tanh")],
        "geglu_tanh_backward": lambda: list(ops.geglu_backward(g, x, up, approximate="tanh")),
    }
    for act in ("relu", "gelu_tanh", "swish"):
        cases[f"bias_act_{act}"] = lambda a=act: [ops.bias_act(x, b, act=a), ops.bias_act(xv, None, act=a)]
        # dx and the bias gradient (float rows summed in the same order on both ISAs)
        cases[f"bias_act_{act}_backward"] = lambda a=act: list(ops.bias_act_backward(g, x, b, act=a))
    return cases


@_needs("AVX2", "AVX512")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", list(_elementwise_cases(torch.bfloat16)))
def test_avx2_float_blocks_match_the_one_step_loops(name, dtype, restore_cpu_isa):
    run = _elementwise_cases(dtype)[name]
    torchfast._ext.set_cpu_isa("AVX512")
    one_step = run()
    torchfast._ext.set_cpu_isa("AVX2")
    blocks = run()
    for i, (a, c) in enumerate(zip(one_step, blocks)):
        a, c = a.float(), c.float()
        bad = ~((a == c) | (a.isnan() & c.isnan()))
        assert not bad.any(), (f"{name} output {i}: {int(bad.sum())} of {a.numel()} elements differ, e.g. at "
                               f"{bad.nonzero()[:3].tolist()}: {a[bad][:3]} (AVX512) vs {c[bad][:3]} (AVX2)")
