"""Exporting losses computed with torchfast.cross_entropy and torchfast.linear_cross_entropy: standard
ONNX through both exporters (SoftmaxCrossEntropyLoss for plain 2-D logits, elementary ops with Tanh,
GatherElements, ReduceMean... for the options), verified in onnxruntime by torchfast.export.onnx on two
batch sizes; TorchScript script and trace giving the eager loss. (linear_cross_entropy's grad_mask is an
int in its schema because torch.jit.trace cannot record a bool list; the trace tests keep it so.)"""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import torchfast
from torchfast.reference.cross_entropy import cross_entropy_reference, linear_cross_entropy_reference
from torchfast.testing import assert_close

V, H = 37, 16


class Loss(nn.Module):
    def __init__(self, reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                 softcap=None):
        super().__init__()
        self.reduction, self.ignore_index, self.softcap = reduction, ignore_index, softcap
        self.label_smoothing, self.z_loss = label_smoothing, z_loss

    def opts(self):
        return dict(ignore_index=self.ignore_index, reduction=self.reduction,
                    label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap)

    def forward(self, logits, target):
        if torch.jit.is_scripting():  # the dispatcher op, as torchfast/nn/swish.py does
            rows, _ = torch.ops.torchfast.cross_entropy(
                logits, target, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                z_loss=self.z_loss, softcap=self.softcap)
            if self.reduction == "none":
                return rows.to(logits.dtype)
            total = rows.sum()
            if self.reduction == "mean":
                total = total / (target != self.ignore_index).sum()
            return total.to(logits.dtype)
        return torchfast.cross_entropy(logits, target, ignore_index=self.ignore_index,
                                       reduction=self.reduction, label_smoothing=self.label_smoothing,
                                       z_loss=self.z_loss, softcap=self.softcap)


class LinearLoss(Loss):
    def __init__(self, bias: bool, **opts):
        super().__init__(**opts)
        torch.manual_seed(1)
        self.weight = nn.Parameter(torch.randn(V, H) * 0.5)
        self.bias = nn.Parameter(torch.randn(V)) if bias else None

    def forward(self, hidden, target):
        if torch.jit.is_scripting():
            return torch.ops.torchfast.linear_cross_entropy(
                hidden, self.weight, target, self.bias, ignore_index=self.ignore_index,
                reduction=self.reduction, label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                softcap=self.softcap, grad_mask=0)[0].to(hidden.dtype)
        return torchfast.linear_cross_entropy(
            hidden, self.weight, target, self.bias, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap, chunk_size=4)


def targets(shape, ignore_index=-100):
    t = torch.randint(0, V, shape)
    t.view(-1)[::3] = ignore_index  # rows 0, 3, ... ignored
    return t


def logits_case(shape=(6,), dtype=torch.float32, ignore_index=-100):
    torch.manual_seed(0)
    return torch.randn(*shape, V, dtype=dtype) * 3, targets(shape, ignore_index)


def ops_of(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


# (id, loss options, target shape, ops the graph must hold)
CE_CASES = [
    ("mean-plain", dict(), (6,), {"SoftmaxCrossEntropyLoss"}),
    ("sum-smoothing-zloss-3d", dict(reduction="sum", ignore_index=3, label_smoothing=0.1, z_loss=1e-3),
     (2, 3), {"GatherElements", "ReduceMean"}),
    ("none-softcap", dict(reduction="none", softcap=5.0), (6,), {"Tanh"}),
]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("opts, shape, has", [c[1:] for c in CE_CASES], ids=[c[0] for c in CE_CASES])
def test_cross_entropy_onnx_matches_in_onnxruntime(tmp_path, exporter, opts, shape, has):
    model = Loss(**opts)
    logits, target = logits_case(shape, ignore_index=model.ignore_index)
    with torch.no_grad():
        assert_close(model(logits, target), cross_entropy_reference(logits, target, **model.opts()))
    result = torchfast.export.onnx(model, (logits, target), tmp_path / "ce.onnx", exporter=exporter)
    assert result.max_error <= 1e-5
    ops = ops_of(result.path)
    assert has <= ops, ops
    if "SoftmaxCrossEntropyLoss" not in has:
        assert "SoftmaxCrossEntropyLoss" not in ops, ops  # its semantics lack these options


@pytest.mark.parametrize("opset, plain", [(9, False), (11, False), (12, True), (13, False)])
def test_cross_entropy_torchscript_older_opsets(tmp_path, opset, plain):
    """Below 18 ReduceMax/ReduceMean take their axes as attributes (ReduceSum, Squeeze below 13);
    GatherElements from 11 (OneHot below), SoftmaxCrossEntropyLoss from 12."""
    model = Loss() if plain else Loss(label_smoothing=0.2, z_loss=1e-3, softcap=5.0, ignore_index=2)
    logits, target = logits_case((5,), ignore_index=model.ignore_index)
    result = torchfast.export.onnx(model, (logits, target), tmp_path / "ce.onnx", exporter="torchscript",
                                   opset=opset)
    assert result.max_error <= 1e-5
    ops = ops_of(result.path)
    assert ("SoftmaxCrossEntropyLoss" in ops) == plain, ops
    assert ("GatherElements" in ops) == (opset >= 11 and not plain), ops


def test_cross_entropy_fp16_logits_run_in_float32(tmp_path):
    model = Loss(label_smoothing=0.1)
    logits, target = logits_case(dtype=torch.float16)
    result = torchfast.export.onnx(model, (logits, target), tmp_path / "ce16.onnx")
    graph = onnx.load(result.path).graph
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    casts = [a.i for n in graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
    assert onnx.TensorProto.FLOAT in casts, casts


LINEAR_CASES = [
    ("mean-bias-smoothing", True, dict(label_smoothing=0.1)),
    ("sum-softcap", False, dict(reduction="sum", softcap=4.0)),
    ("none-bias-zloss-ignore7", True, dict(reduction="none", z_loss=1e-3, ignore_index=7)),
]


@pytest.mark.parametrize("bias, opts", [c[1:] for c in LINEAR_CASES], ids=[c[0] for c in LINEAR_CASES])
def test_linear_cross_entropy_dynamo_onnx_matches_in_onnxruntime(tmp_path, bias, opts):
    model = LinearLoss(bias, **opts)
    hidden, target = torch.randn(7, H), targets((7,), model.ignore_index)
    with torch.no_grad():
        expected = linear_cross_entropy_reference(hidden, model.weight, target, model.bias, **model.opts())
        assert_close(model(hidden, target), expected)
    result = torchfast.export.onnx(model, (hidden, target), tmp_path / "lce.onnx")
    assert result.max_error <= 1e-5
    ops = ops_of(result.path)
    assert "MatMul" in ops and ("Tanh" in ops) == ("softcap" in opts), ops


def test_linear_cross_entropy_torchscript_onnx(tmp_path):
    model = LinearLoss(True, label_smoothing=0.1)
    hidden, target = torch.randn(7, H), targets((7,))
    result = torchfast.export.onnx(model, (hidden, target), tmp_path / "lce.onnx", exporter="torchscript")
    assert result.max_error <= 1e-5


@pytest.mark.parametrize("kind", ["script", "trace"])
def test_cross_entropy_torchscript_calls_the_op(kind):
    model = Loss(ignore_index=5, label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    logits, target = logits_case((4, 3), ignore_index=5)
    compiled = torch.jit.script(model) if kind == "script" else torch.jit.trace(model, (logits, target))
    assert "torchfast::cross_entropy" in str(compiled.inlined_graph)
    other_logits, other_target = logits_case((9,), ignore_index=5)  # another shape than the trace's
    with torch.no_grad():
        for x, t in ((logits, target), (other_logits, other_target)):
            assert_close(compiled(x, t), model(x, t), what=f"{kind} at {tuple(x.shape)}")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_linear_cross_entropy_script_calls_the_op(bias):
    model = LinearLoss(bias, reduction="mean", softcap=4.0)
    scripted = torch.jit.script(model)
    assert "torchfast::linear_cross_entropy" in str(scripted.inlined_graph)
    hidden, target = torch.randn(2, 5, H), targets((2, 5))
    with torch.no_grad():
        assert_close(scripted(hidden, target), model(hidden, target))


def test_linear_cross_entropy_trace():
    model = LinearLoss(False)
    hidden, target = torch.randn(5, H), targets((5,))
    with torch.no_grad():  # an inference trace: no gradients computed in the forward (grad_mask 0)
        traced = torch.jit.trace(model, (hidden, target))
    assert "torchfast::linear_cross_entropy" in str(traced.inlined_graph)
    with torch.no_grad():
        assert_close(traced(hidden, target), model(hidden, target))
