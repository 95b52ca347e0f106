"""Exporting torchfast.rope to ONNX: standard ops through both exporters at every opset they take, and,
from opset 23, ONNX's RotaryEmbedding where it applies; each file verified in onnxruntime by
torchfast.export.onnx on two batch sizes (outputs q_rot and k_rot against PyTorch)."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import torchfast
from torchfast.export import OnnxVerificationError
from torchfast.ops.rope import rope_cache


class Rotary(nn.Module):
    def __init__(self, unsqueeze_dim=1, interleaved=False):
        super().__init__()
        self.unsqueeze_dim, self.interleaved = unsqueeze_dim, interleaved

    def forward(self, q, k, cos, sin):
        return torchfast.rope(q, k, cos, sin, unsqueeze_dim=self.unsqueeze_dim, interleaved=self.interleaved)


class CachedRotary(Rotary):
    """cos/sin as buffers: a [T, R] cache has no batch axis, so it cannot be an input with a dynamic one."""

    def __init__(self, cos, sin, **kw):
        super().__init__(**kw)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def forward(self, q, k):
        return super().forward(q, k, self.cos, self.sin)


def ops_of(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


class Cases(nn.Module):
    """Four rope calls in one model, so one export covers them: [B, H, T, D] with GQA (RoPE cache
    [B, T, R]); [B, T, H, D] interleaved with partial rotary (16 of 24 features); a [T, R] buffer of
    random cos/sin (not a RoPE cache) with partial rotary; fp16 q/k with a float32 cache."""

    def __init__(self):
        super().__init__()
        self.bhtd = Rotary()
        self.bthd = Rotary(unsqueeze_dim=2, interleaved=True)
        self.cached = CachedRotary(torch.randn(7, 8), torch.randn(7, 8), unsqueeze_dim=0)

    def forward(self, q1, k1, cos1, sin1, q2, k2, cos2, sin2, q3, k3, q4, k4):
        return (*self.bhtd(q1, k1, cos1, sin1), *self.bthd(q2, k2, cos2, sin2), *self.cached(q3, k3),
                *self.bhtd(q4, k4, cos1, sin1))


def _inputs():
    cos1, sin1 = rope_cache(torch.arange(6).expand(2, 6), 16)
    cos2, sin2 = rope_cache(torch.arange(5).expand(2, 5) + 3, 16, interleaved=True)
    r = torch.randn
    return (r(2, 4, 6, 16), r(2, 2, 6, 16), cos1, sin1, r(2, 5, 3, 24), r(2, 5, 1, 24), cos2, sin2,
            r(2, 3, 7, 12), r(2, 1, 7, 12), r(2, 4, 6, 16).half(), r(2, 2, 6, 16).half())


@pytest.mark.parametrize("exporter, opset", [("dynamo", 20), ("dynamo", 23), ("torchscript", 9),
                                             ("torchscript", 17)])
def test_rope_onnx_matches_in_onnxruntime(tmp_path, exporter, opset):
    """Verified on two batch sizes (torchfast.export.onnx); every output within its dtype's tolerance.
    RotaryEmbedding replaces the standard ops where it applies (4-D q/k, 3-D cos/sin): the first, second
    and fourth call, 6 of the 8 rotations; the fp16 one runs it in float32 between two casts."""
    result = torchfast.export.onnx(Cases(), _inputs(), tmp_path / "rope.onnx", exporter=exporter, opset=opset)
    graph = onnx.load(result.path).graph
    ops = [n.op_type for n in graph.node]
    rotary = exporter == "dynamo" and opset >= 23
    assert ops.count("RotaryEmbedding") == (6 if rotary else 0), ops
    assert {"Mul", "Add", "Concat", "Neg", "Slice"} <= set(ops), ops  # the [T, R] call, at every opset
    assert [o.type.tensor_type.elem_type for o in graph.output][-2:] == [onnx.TensorProto.FLOAT16] * 2
    casts = [a.i for n in graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
    assert casts.count(onnx.TensorProto.FLOAT) >= 2 and casts.count(onnx.TensorProto.FLOAT16) >= 2, casts


def test_rotary_embedding_needs_a_rope_cache(tmp_path):
    """RotaryEmbedding takes one angle per pair: with random cos/sin (pairs not sharing their angle) the
    opset-23 graph is not the op, and verification says so (the standard ops below 23 are exact for any
    cos/sin: the [T, R] call above)."""
    q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16)
    cos, sin = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    with pytest.raises(OnnxVerificationError, match="disagrees"):
        torchfast.export.onnx(Rotary(), (q, k, cos, sin), tmp_path / "r23.onnx", opset=23)
