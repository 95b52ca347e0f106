"""ONNX export of the fused activations (bias_act, swiglu, geglu, packed forms) and their modules,
through torchfast.export.onnx with both exporters: standard ONNX ops only, the expected op per opset
(Gelu from 20, Erf/Tanh below; Swish from 24; Split for the packed form), a dynamic batch axis, and
onnxruntime agreeing with PyTorch on two batch sizes (verify=True). One model holds every op, so the
file makes one export per exporter and opset."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import torchfast
import torchfast.export
from torchfast.testing import assert_close

D = 8


class AllActivations(nn.Module):
    def __init__(self):
        super().__init__()
        self.linears = nn.ModuleList(
            torchfast.nn.Linear(D, D, activation=a)
            for a in ("relu", "gelu", "gelu_tanh", "swish", "identity")
        )
        self.no_bias = torchfast.nn.Linear(D, D, bias=False, activation="gelu")
        self.gelu = torchfast.nn.GELU(approximate="tanh")
        self.swiglu = torchfast.nn.SwiGLU(D, 12)
        self.geglu = torchfast.nn.GeGLU(D, 12, approximate="tanh")
        self.fused_gate_up = nn.Linear(D, 2 * D)

    def forward(self, x):
        h = x
        for linear in self.linears:
            h = linear(h)
        h = self.gelu(self.no_bias(h)) + torchfast.bias_act(h, None, act="gelu")
        packed = self.fused_gate_up(x)
        return (
            h
            + self.swiglu(x)
            + torchfast.geglu(self.geglu(x), h)
            + torchfast.swiglu(packed)
            + torchfast.geglu(packed, approximate="none")
        )


def _model():
    torch.manual_seed(0)
    return AllActivations()


CASES = [  # exporter, opset, ops that must appear, ops that must not
    ("dynamo", None, {"Gelu", "Split", "Relu", "Sigmoid"}, {"Erf", "Swish"}),
    ("dynamo", 18, {"Erf", "Tanh", "Split", "Sigmoid"}, {"Gelu", "Swish"}),
    ("dynamo", 24, {"Gelu", "Swish", "Split"}, {"Erf", "Sigmoid"}),
    ("torchscript", None, {"Gelu", "Split", "Sigmoid"}, {"Erf"}),
    ("torchscript", 11, {"Erf", "Tanh", "Split", "Sigmoid"}, {"Gelu"}),
]


@pytest.mark.parametrize(
    "exporter, opset, present, absent",
    CASES,
    ids=["dynamo-default", "dynamo-18", "dynamo-24", "torchscript-default", "torchscript-11"],
)
def test_every_activation_exports_to_standard_onnx_and_matches(tmp_path, exporter, opset, present, absent):
    model = _model()
    x = torch.randn(5, D) * 2
    result = torchfast.export.onnx(model, (x,), tmp_path / "acts.onnx", exporter=exporter, opset=opset)
    assert 0.0 <= result.max_error <= 1e-4, result  # verified in onnxruntime at batch 5 and 7
    graph = onnx.load(result.path)
    assert {o.domain for o in graph.opset_import} <= {"", "ai.onnx"}
    ops = {n.op_type for n in graph.graph.node}
    assert all(n.domain in ("", "ai.onnx") for n in graph.graph.node), ops
    assert present <= ops and not (absent & ops), ops
    dim0 = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param, "batch axis is not symbolic"


def test_float16_model_keeps_float16_constants(tmp_path):
    """Below opset 20 gelu is decomposed with constants; they take the input's type (CastLike), so a
    float16 model is a valid float16 graph that onnxruntime loads and runs."""
    import onnxruntime

    model = nn.Sequential(torchfast.nn.Linear(D, D, activation="gelu_tanh")).half().eval()
    x = torch.randn(3, D, dtype=torch.float16)
    result = torchfast.export.onnx(model, (x,), tmp_path / "h.onnx", opset=18, verify=False)
    session = onnxruntime.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert_close(torch.from_numpy(got), model(x).double(), dtype=torch.float16, atol=2e-3)
