"""Bad inputs: every public op and every backward op refuses them with an error that names the op and
the argument and says what is allowed, under each CPU ISA variant (the C++ kernels repeat the checks
for direct op callers). A table of hand-picked calls, then drawn shape mismatches (hypothesis). The
counts are in docs/testing.md."""

from __future__ import annotations

import math

import pytest
import torch

import torchfast

hypothesis = pytest.importorskip("hypothesis", reason="property-based tests need hypothesis (test extra)")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ISAS = torchfast._ext.runnable_cpu_isas() or [None]
ops = torch.ops.torchfast


def _x():
    return torch.randn(4, 8)


def _w():
    return torch.rand(8)


def _t():
    return torch.randint(0, 8, (4,))


def _stats(op):
    x, w = _x(), _w()
    if op == "rms_norm":
        return x, w, ops.rms_norm(x, w, 1e-6)[1]
    if op == "layer_norm":
        return (x, w, *ops.layer_norm(x, w, w, 1e-5)[1:])
    t = _t()
    return x, t, ops.cross_entropy(x, t, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None)[1]


_INT = torch.ones(4, 8, dtype=torch.int32)
_CE = {"ignore_index": -100, "label_smoothing": 0.0, "z_loss": 0.0, "softcap": None}

# (id, call, error type, pattern the message must match: the op, the argument, what is allowed)
BAD = [
    ("swish-int", lambda: torchfast.swish(_INT),
     TypeError, r"torchfast\.swish: argument 'x' has dtype torch\.int32; supported dtypes are float32"),
    ("swish-list", lambda: torchfast.swish([1.0]),
     TypeError, r"torchfast\.swish: argument 'x' must be a Tensor"),
    ("swish-complex", lambda: torchfast.swish(torch.randn(3, dtype=torch.complex64)),
     TypeError, r"torchfast\.swish: argument 'x' has dtype torch\.complex64; supported"),
    ("bias_act-act", lambda: torchfast.bias_act(_x(), None, act="tanh"),
     ValueError, r"torchfast\.bias_act: unknown activation 'tanh' for argument 'act'; expected one of identity"),
    ("bias_act-act-None", lambda: torchfast.bias_act(_x(), None, act=None),
     ValueError, r"torchfast\.bias_act: unknown activation None for argument 'act'"),
    ("bias_act-bias-len", lambda: torchfast.bias_act(_x(), torch.randn(7), act="relu"),
     RuntimeError, r"torchfast\.bias_act: argument 'bias' has shape \[7\].*1-D with x\.size\(-1\) elements"),
    ("bias_act-bias-2d", lambda: torchfast.bias_act(_x(), torch.randn(1, 8), act="relu"),
     RuntimeError, r"torchfast\.bias_act: argument 'bias' has shape \[1, 8\]"),
    ("bias_act-bias-dtype", lambda: torchfast.bias_act(_x(), torch.randn(8, dtype=torch.float64), act="relu"),
     TypeError, r"torchfast\.bias_act: 'bias' has dtype Double but 'x' has dtype Float; they must match"),
    ("bias_act-bias-int", lambda: torchfast.bias_act(_x(), torch.ones(8, dtype=torch.int64), act="relu"),
     TypeError, r"torchfast\.bias_act: argument 'bias' has dtype torch\.int64; supported"),
    ("bias_act-0d-bias", lambda: torchfast.bias_act(torch.tensor(1.0), torch.randn(1), act="relu"),
     RuntimeError, r"torchfast\.bias_act: 'x' is 0-dimensional.*pass bias=None"),
    ("nn.GELU-approximate", lambda: torchfast.nn.GELU("exact"),
     ValueError, r"torchfast\.nn\.GELU: argument 'approximate' must be 'none' or 'tanh'"),
    ("rms_norm-eps-neg", lambda: torchfast.rms_norm(_x(), _w(), eps=-1e-6),
     ValueError, r"torchfast\.rms_norm: eps must be a finite number >= 0.*got -1e-06"),
    ("rms_norm-eps-nan", lambda: torchfast.rms_norm(_x(), _w(), eps=math.nan),
     ValueError, r"torchfast\.rms_norm: eps must be a finite number >= 0.*got nan"),
    ("rms_norm-eps-inf", lambda: torchfast.rms_norm(_x(), _w(), eps=math.inf),
     ValueError, r"torchfast\.rms_norm: eps must be a finite number >= 0.*got inf"),
    ("rms_norm-eps-str", lambda: torchfast.rms_norm(_x(), _w(), eps="1e-6"),
     ValueError, r"torchfast\.rms_norm: eps must be a finite number >= 0.*got '1e-6'"),
    ("rms_norm-weight-len", lambda: torchfast.rms_norm(_x(), torch.rand(7)),
     RuntimeError, r"torchfast\.rms_norm: argument 'weight' has shape \(7,\).*1-D with 8 elements"),
    ("rms_norm-weight-dtype", lambda: torchfast.rms_norm(_x(), _w().half()),
     TypeError, r"torchfast\.rms_norm: argument 'weight' has dtype torch\.float16.*x's dtype, or float32"),
    ("rms_norm-0d", lambda: torchfast.rms_norm(torch.tensor(1.0)),
     RuntimeError, r"torchfast\.rms_norm: argument 'x' must have at least one dimension"),
    ("rms_norm-empty-row", lambda: torchfast.rms_norm(torch.randn(3, 0)),
     RuntimeError, r"torchfast\.rms_norm: argument 'x' has shape \(3, 0\): its last dimension is empty"),
    ("rms_norm-int", lambda: torchfast.rms_norm(_INT),
     TypeError, r"torchfast\.rms_norm: argument 'x' has dtype torch\.int32; supported"),
    ("layer_norm-bias-len", lambda: torchfast.layer_norm(_x(), _w(), torch.rand(9)),
     RuntimeError, r"torchfast\.layer_norm: argument 'bias' has shape \(9,\).*1-D with 8 elements"),
    ("layer_norm-weight-2d", lambda: torchfast.layer_norm(_x(), _w()[None]),
     RuntimeError, r"torchfast\.layer_norm: argument 'weight' has shape \(1, 8\)"),
    ("layer_norm-param-dtypes", lambda: torchfast.layer_norm(_x().bfloat16(), _w(), _w().bfloat16()),
     TypeError, r"torchfast\.layer_norm: 'weight' has dtype torch\.float32 but 'bias' has dtype torch\.bfloat16; they must match"),
    ("layer_norm-eps-neg", lambda: torchfast.layer_norm(_x(), eps=-1.0),
     ValueError, r"torchfast\.layer_norm: eps must be a finite number >= 0"),
    ("cross_entropy-target-float", lambda: torchfast.cross_entropy(_x(), _t().float()),
     TypeError, r"torchfast\.cross_entropy: argument 'target' has dtype torch\.float32; expected class indices.*probability targets are not supported"),
    ("cross_entropy-target-shape", lambda: torchfast.cross_entropy(_x(), _t()[:3]),
     RuntimeError, r"torchfast\.cross_entropy: argument 'target' has shape \(3,\) but 'logits' has shape \(4, 8\)"),
    ("cross_entropy-target-list", lambda: torchfast.cross_entropy(_x(), [1, 2, 3, 4]),
     TypeError, r"torchfast\.cross_entropy: argument 'target' must be a Tensor"),
    ("cross_entropy-target-high", lambda: torchfast.cross_entropy(_x(), torch.full((4,), 8)),
     IndexError, r"torchfast\.cross_entropy: target 8 at position 0 is out of bounds for 8 classes"),
    ("cross_entropy-target-neg", lambda: torchfast.cross_entropy(_x(), torch.full((4,), -3)),
     IndexError, r"torchfast\.cross_entropy: target -3 at position 0 is out of bounds.*ignore_index=-100"),
    ("cross_entropy-reduction", lambda: torchfast.cross_entropy(_x(), _t(), reduction="avg"),
     ValueError, r"torchfast\.cross_entropy: reduction must be one of 'mean', 'sum', 'none'; got 'avg'"),
    ("cross_entropy-smoothing", lambda: torchfast.cross_entropy(_x(), _t(), label_smoothing=1.5),
     ValueError, r"torchfast\.cross_entropy: label_smoothing must be in \[0, 1\]; got 1\.5"),
    ("cross_entropy-z_loss", lambda: torchfast.cross_entropy(_x(), _t(), z_loss=-1.0),
     ValueError, r"torchfast\.cross_entropy: z_loss must be a finite number >= 0"),
    ("cross_entropy-softcap", lambda: torchfast.cross_entropy(_x(), _t(), softcap=0.0),
     ValueError, r"torchfast\.cross_entropy: softcap must be None or a finite number > 0"),
    ("cross_entropy-no-classes", lambda: torchfast.cross_entropy(torch.randn(4, 0), _t()),
     RuntimeError, r"torchfast\.cross_entropy: argument 'logits' has shape \(4, 0\): its last dimension \(the classes\) is empty"),
    ("cross_entropy-0d", lambda: torchfast.cross_entropy(torch.tensor(1.0), torch.tensor(0)),
     RuntimeError, r"torchfast\.cross_entropy: argument 'logits' is 0-dimensional; it needs a last dimension"),
    ("cross_entropy-int", lambda: torchfast.cross_entropy(_INT, _t()),
     TypeError, r"torchfast\.cross_entropy: argument 'logits' has dtype torch\.int32; supported"),
    # the backward ops, called directly (compiled and exported graphs call them)
    ("swish_backward-shape", lambda: ops.swish_backward(torch.randn(4, 7), _x()),
     RuntimeError, r"torchfast\.swish_backward: 'grad_out' has shape \[4, 7\] but 'x' has shape \[4, 8\]; they must match"),
    ("swish_backward-dtype", lambda: ops.swish_backward(_x().double(), _x()),
     TypeError, r"torchfast\.swish_backward: 'grad_out' has dtype Double but 'x' has dtype Float; they must match"),
    ("bias_act_backward-shape", lambda: ops.bias_act_backward(torch.randn(3, 8), _x(), _w(), act="gelu"),
     RuntimeError, r"torchfast\.bias_act_backward: 'grad_out' has shape \[3, 8\] but 'x' has shape \[4, 8\]"),
    ("bias_act-op-act", lambda: ops.bias_act(_x(), None, act="tanh"),
     ValueError, r"torchfast\.bias_act: unknown activation 'tanh' for argument 'act'"),
    ("rms_norm-op-eps", lambda: ops.rms_norm(_x(), _w(), -1.0),
     ValueError, r"torchfast\.rms_norm: eps must be a finite number >= 0"),
    ("rms_norm_backward-grad", lambda: ops.rms_norm_backward(torch.randn(4, 7), *_stats("rms_norm")),
     RuntimeError, r"torchfast\.rms_norm_backward: 'grad_out' has shape \[4, 7\] but 'x' has shape \[4, 8\]"),
    ("rms_norm_backward-rstd", lambda: (lambda x, w, r: ops.rms_norm_backward(torch.randn(4, 8), x, w, r[:3]))(*_stats("rms_norm")),
     RuntimeError, r"torchfast\.rms_norm_backward: argument 'rstd' has shape \[3\]; expected x's shape without its last dimension \(\[4\]\)"),
    ("layer_norm_backward-mean", lambda: (lambda x, w, m, r: ops.layer_norm_backward(torch.randn(4, 8), x, w, w, m[:2], r))(*_stats("layer_norm")),
     RuntimeError, r"torchfast\.layer_norm_backward: argument 'mean' has shape \[2\]; expected x's shape without its last dimension"),
    ("cross_entropy_backward-lse", lambda: (lambda x, t, lse: ops.cross_entropy_backward(torch.ones(4), x, t, lse[:2], **_CE))(*_stats("cross_entropy")),
     RuntimeError, r"torchfast\.cross_entropy_backward: argument 'lse' has shape \[2\]; expected \[4\]"),
]


@pytest.mark.parametrize("call, error, pattern", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_refused_by_name(call, error, pattern, restore_cpu_isa):
    for isa in ISAS:
        if isa is not None:
            torchfast._ext.set_cpu_isa(isa)
        with pytest.raises(error, match=pattern):
            call()


# Drawn mismatches: a parameter or target whose shape differs from what x asks for, in any dtype.
N_DRAWN = 60


@st.composite
def mismatches(draw):
    n = draw(st.integers(1, 40))
    lead = draw(st.lists(st.integers(0, 5), min_size=0, max_size=2))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    x = torch.randn(*lead, n).to(dtype)
    wrong = draw(st.one_of(
        st.integers(0, 41).filter(lambda m: m != n).map(lambda m: (m,)),  # wrong length
        st.tuples(st.integers(1, 3), st.just(n)),                          # 2-D
        st.just(()),                                                       # 0-D
    ))
    which = draw(st.sampled_from(["bias_act:bias", "rms_norm:weight", "layer_norm:weight", "layer_norm:bias",
                                  "cross_entropy:target"]))
    return x, wrong, which, draw(st.sampled_from(ISAS))


def _call(x, wrong, which):
    if which == "bias_act:bias":
        return torchfast.bias_act(x, torch.randn(wrong).to(x.dtype), act="relu")
    if which == "rms_norm:weight":
        return torchfast.rms_norm(x, torch.rand(wrong).to(x.dtype))
    if which == "layer_norm:weight":
        return torchfast.layer_norm(x, torch.rand(wrong).to(x.dtype))
    if which == "layer_norm:bias":
        return torchfast.layer_norm(x, None, torch.rand(wrong).to(x.dtype))
    # a target's shape must be x's without the last dim; `wrong` prefixed by x's leading dims keeps it wrong
    return torchfast.cross_entropy(x, torch.zeros((*x.shape[:-1], *wrong, 1), dtype=torch.int64))


def test_drawn_shape_mismatches_are_refused_by_name(restore_cpu_isa):
    ran = []

    @settings(max_examples=N_DRAWN, deadline=None, derandomize=True, database=None)
    @given(mismatches())
    def prop(case):
        x, wrong, which, isa = case
        if isa is not None:
            torchfast._ext.set_cpu_isa(isa)
        op, arg = which.split(":")
        ran.append(1)
        with pytest.raises(RuntimeError, match=rf"torchfast\.{op}: argument '{arg}' has shape"):
            _call(x, wrong, which)

    prop()
    assert len(ran) == N_DRAWN
