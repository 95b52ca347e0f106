"""The AVX512_BF16 variant (ours: AVX-512 plus native float->bfloat16 rounding) against the AVX512
variant it extends: the same kernels, so the bfloat16 results must agree bit for bit, except that the
native instruction flushes float32 subnormals (|v| < 2^-126, which the emulation may round up to
2^-126) to zero where the emulation keeps them."""

import pytest
import torch

import torchfast

RUNNABLE = torchfast._ext.runnable_cpu_isas()
pytestmark = pytest.mark.skipif(
    not {"AVX512", "AVX512_BF16"} <= set(RUNNABLE),
    reason=f"needs the AVX512 and AVX512_BF16 variants and a CPU with both (runnable here: {RUNNABLE})",
)
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
