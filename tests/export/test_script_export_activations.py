"""TorchScript (script and trace) and torch.export of models using torchfast.nn.Linear(activation=...),
GELU, SwiGLU and GeGLU: the graphs call the torchfast operators (not decompositions), keep a dynamic
batch axis where asked, and match eager, also after a save/load round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchfast
from torchfast.testing import assert_close


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torchfast.nn.Linear(8, 16, activation="gelu_tanh")
        self.relu = torchfast.nn.Linear(16, 16, activation="relu")
        self.no_bias = torchfast.nn.Linear(16, 8, bias=False, activation="swish")
        self.plain = torchfast.nn.Linear(8, 8)
        self.gelu = torchfast.nn.GELU()
        self.swiglu = torchfast.nn.SwiGLU(8, 12)
        self.geglu = torchfast.nn.GeGLU(8, 12, approximate="tanh")

    def forward(self, x):
        h = self.gelu(self.plain(self.no_bias(self.relu(self.up(x)))))
        return self.swiglu(h) + self.geglu(x)


def _model():
    torch.manual_seed(0)
    return Block().eval()


OPS = ("torchfast::bias_act", "torchfast::swiglu", "torchfast::geglu")


@pytest.mark.parametrize("kind", ["script", "trace"])
def test_torchscript_graph_calls_the_ops_and_matches(tmp_path, kind):
    model = _model()
    x = torch.randn(5, 8) * 2
    jitted = torch.jit.script(model) if kind == "script" else torch.jit.trace(model, (torch.randn(3, 8),))
    graph = str(jitted.inlined_graph)
    assert all(op in graph for op in OPS), graph
    assert "aten::gelu" not in graph and "aten::silu" not in graph, graph
    jitted.save(str(tmp_path / "m.pt"))
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    with torch.no_grad():
        expected = model(x)
        assert_close(jitted(x), expected)
        assert_close(loaded(x), expected, what="loaded")


def test_torch_export_holds_the_ops_with_dynamic_batch(tmp_path):
    model = _model()
    program = torch.export.export(
        model, (torch.randn(3, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("torchfast.bias_act.default") == 4, targets
    assert "torchfast.swiglu.default" in targets and "torchfast.geglu.default" in targets, targets
    torch.export.save(program, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2")
    for batch in (3, 6):
        x = torch.randn(batch, 8)
        with torch.no_grad():
            expected = model(x)
            assert_close(program.module()(x), expected, what=f"batch {batch}")
            assert_close(loaded.module()(x), expected, what=f"loaded, batch {batch}")


def test_torch_export_packed_form():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 24)

        def forward(self, x):
            return torchfast.swiglu(self.proj(x)) + torchfast.geglu(self.proj(x), approximate="tanh")

    model = Packed().eval()
    program = torch.export.export(
        model, (torch.randn(3, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert "torchfast.swiglu_packed.default" in targets and "torchfast.geglu_packed.default" in targets, (
        targets
    )
    x = torch.randn(7, 8)
    with torch.no_grad():
        assert_close(program.module()(x), model(x))
