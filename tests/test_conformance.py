"""Conformance: every op in torchfast.REGISTRY gets these checks automatically, so no op can skip them:
opcheck, gradcheck (float64), torch.compile(fullgraph) forward+backward against eager, autocast."""

import pytest
import torch
from torch.library import opcheck

import torchfast
from torchfast.testing import assert_close

from .conftest import DEVICES

OPS = sorted(torchfast.REGISTRY)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles the same lambda for another op: without a reset, dynamo counts those as
    recompiles of one code object and stops at its limit (8) once there are enough ops."""
    torch._dynamo.reset()
    yield


def _float_tensors(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]


def _with_leaves(args, make_leaf):
    """args with every float tensor replaced by make_leaf(tensor); integer tensors (class targets) and
    non-tensors pass as they are. Returns (new args, the leaves in order)."""
    leaves, out = [], []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = make_leaf(a)
            leaves.append(a)
        out.append(a)
    return tuple(out), leaves


def _call_with(args, leaves_fn):
    """A function of the float tensors alone, with the other arguments fixed at their places."""
    idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]

    def fn(*floats):
        full = list(args)
        for i, f in zip(idx, floats):
            full[i] = f
        return leaves_fn(*full)

    return fn


def _outputs(out):
    """An op's public function returns a tensor or a tuple of them (add_rms_norm: (y, h))."""
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _loss(out):
    return sum(o.square().sum() for o in _outputs(out))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPS)
def test_opcheck(name, device, dtype):
    spec = torchfast.REGISTRY[name]
    op = getattr(torch.ops.torchfast, name).default
    for args, kwargs in spec.sample_inputs(device, dtype):
        args, _ = _with_leaves(args, lambda a: a.clone().requires_grad_())
        opcheck(op, args, kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPS)
def test_gradcheck_float64(name, device):
    spec = torchfast.REGISTRY[name]
    for args, kwargs in spec.sample_inputs(device, torch.float64)[:2]:
        args, leaves = _with_leaves(args, lambda a: a.detach().clone().requires_grad_())
        fn = _call_with(args, lambda *a: spec.function(*a, **kwargs))
        assert torch.autograd.gradcheck(fn, leaves)
        # Second derivatives in fast mode (one random projection v^T J u against its finite difference
        # instead of the whole Jacobian, as PyTorch's OpInfo tests do for costly ops): the full check of
        # linear_cross_entropy's double backward took 55 s of CPU for two samples, fast mode 5 s, and a
        # wrong second derivative still fails it unless the error is orthogonal to a random direction.
        assert torch.autograd.gradgradcheck(fn, leaves, fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPS)
def test_compile_fullgraph_forward_backward_matches_eager(name, device):
    spec = torchfast.REGISTRY[name]
    (args, kwargs) = spec.sample_inputs(device, torch.float32)[0]
    fn = _call_with(args, lambda *a: spec.function(*a, **kwargs))
    compiled = torch.compile(fn, fullgraph=True)
    leaves = [a.detach().clone().requires_grad_() for a in _float_tensors(args)]
    out_e = fn(*leaves)
    grads_e = torch.autograd.grad(_loss(out_e), leaves)
    out_c = compiled(*leaves)
    grads_c = torch.autograd.grad(_loss(out_c), leaves)
    for oc, oe in zip(_outputs(out_c), _outputs(out_e), strict=True):
        assert_close(oc, oe, dtype=torch.float32)
    for gc, ge in zip(grads_c, grads_e):
        assert_close(gc, ge, dtype=torch.float32, what="grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPS)
def test_autocast_keeps_low_precision_inputs_and_matches(name, device):
    """Inside torch.autocast, bf16 inputs are computed as they are (fp32 math inside the kernel) and
    come back bf16, eager and compiled; the values match the op run outside autocast."""
    spec = torchfast.REGISTRY[name]
    (args, kwargs) = spec.sample_inputs(device, torch.bfloat16)[0]
    fn = _call_with(args, lambda *a: spec.function(*a, **kwargs))
    args = _float_tensors(args)
    expected = fn(*args)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = fn(*args)
        out_c = torch.compile(fn, fullgraph=True)(*args)
    for o, oc, e in zip(_outputs(out), _outputs(out_c), _outputs(expected), strict=True):
        assert o.dtype == oc.dtype == e.dtype
        assert_close(o, e.double(), dtype=torch.bfloat16)
        assert_close(oc, e.double(), dtype=torch.bfloat16)
