"""The Triton rotary-embedding kernel (torchfast/triton/rope.py) against the float64 reference of
torchfast/reference/rope.py: forward and the transposed rotation (rope_backward), both pair layouts, GQA,
partial rotary, float32 cos/sin with bf16 q, strided and broadcast operands, more leading dimensions than
the kernel walks, empty tensors; and the differentiable `rope` (the triton_op with its autograd) for
gradients of q, k, cos and sin.

Without a GPU these run on CPU tensors in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
with one, on CUDA. Shapes are tiny: the interpreter is slow.
"""

import pytest
import torch

pytest.importorskip("triton")

from torchfast.reference.rope import rope_backward_reference, rope_reference  # noqa: E402
from torchfast.testing import assert_close  # noqa: E402
from torchfast.triton import rope as trope  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cases(dtype):
    d = dict(device=DEVICE, dtype=dtype)
    f32 = dict(device=DEVICE, dtype=torch.float32 if dtype != torch.float64 else dtype)
    r = torch.randn
    return {
        "BHTD-gqa": ((r(2, 3, 5, 16, **d), r(2, 1, 5, 16, **d), r(2, 5, 16, **d), r(2, 5, 16, **d)), {}),
        "BTHD-interleaved-fp32cs": ((r(2, 5, 3, 8, **d), r(2, 5, 1, 8, **d), r(5, 8, **f32), r(5, 8, **f32)),
                                    {"interleaved": True}),
        # 70 of 140 features (the pass-through spans three 64-wide steps), q a transposed view
        "partial-transposed": ((r(1, 3, 2, 140, **d).transpose(1, 2), r(1, 1, 3, 140, **d), r(3, 70, **d),
                                r(3, 70, **d)), {"unsqueeze_dim": 0}),
        # 5 leading dims that do not merge into 3: cos/sin expanded in memory
        "6d": ((r(2, 2, 3, 2, 3, 4, **d), r(2, 2, 3, 1, 3, 4, **d), r(2, 1, 3, 1, 4, **d),
                r(2, 1, 3, 1, 4, **d)), {"unsqueeze_dim": 3}),
        "empty": ((r(0, 2, 3, 8, **d), r(0, 1, 3, 8, **d), r(0, 3, 8, **d), r(0, 3, 8, **d)), {}),
    }


# Every case in float32 and bfloat16; the kernel's float64 branch on one (the interpreter is slow).
PARAMS = [(c, dt) for c in _cases(torch.float32) for dt in (torch.float32, torch.bfloat16)]
PARAMS.append(("BHTD-gqa", torch.float64))


@pytest.mark.parametrize("case, dtype", PARAMS, ids=[f"{c}-{str(dt)[6:]}" for c, dt in PARAMS])
def test_launchers_match_reference(case, dtype):
    (q, k, cos, sin), kw = _cases(dtype)[case]
    wide = [t.double() for t in (q, k, cos, sin)]
    for launcher, reference in ((trope.rope_fwd, rope_reference), (trope.rope_bwd, rope_backward_reference)):
        got = launcher(q, k, cos, sin, **kw)
        exp = reference(*wide, **kw)
        for g, e, x in zip(got, exp, (q, k)):
            assert g.dtype == dtype and g.stride() == torch.empty_like(x).stride()
            assert_close(g, e, dtype=dtype, what=f"{launcher.__name__} {case}")


def test_differentiable_rope_gradients_match_reference():
    """Gradients of q, k, cos and sin through torchfast::rope_triton and rope_backward_triton."""
    (q, k, cos, sin), kw = _cases(torch.float32)["BTHD-interleaved-fp32cs"]
    leaves = [t.clone().requires_grad_() for t in (q, k, cos, sin)]
    out = trope.rope(*leaves, **kw)
    g = [torch.randn_like(o) for o in out]
    grads = torch.autograd.grad(out, leaves, g)
    wide = [t.detach().double().requires_grad_() for t in (q, k, cos, sin)]
    exp = torch.autograd.grad(rope_reference(*wide, **kw), wide, [x.double() for x in g])
    for got, e, name in zip(grads, exp, ("q", "k", "cos", "sin")):
        assert_close(got, e, rtol=1e-5, atol=1e-5, what=f"grad {name}")


def test_launcher_refuses_bad_arguments_naming_them():
    q = torch.randn(1, 2, 3, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"torchfast\.rope: 'cos' has 7 features"):
        trope.rope_fwd(q, q, torch.randn(3, 7, device=DEVICE), torch.randn(3, 7, device=DEVICE),
                       unsqueeze_dim=0)
    with pytest.raises(TypeError,
                       match=r"torchfast\.rope_backward: 'grad_q' has dtype torch.float32 but 'grad_k'"):
        trope.rope_bwd(q, q.double(), torch.randn(3, 8, device=DEVICE), torch.randn(3, 8, device=DEVICE),
                       unsqueeze_dim=0)
