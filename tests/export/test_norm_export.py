"""Exporting models that use torchfast's normalizations (RMSNorm, AddRMSNorm, LayerNorm): ONNX through
both exporters (RMSNormalization from opset 23, LayerNormalization from 17, elementary ops below),
verified in onnxruntime with dynamic batch and sequence axes; TorchScript; torch.export."""

from __future__ import annotations

import onnx
import onnxruntime
import pytest
import torch
from torch import nn

import torchfast
from torchfast.testing import assert_close

from .fresh import run_fresh

D = 32


class Block(nn.Module):
    """A pre-norm block's normalizations: RMSNorm over two trailing dims, the fused residual add, and
    LayerNorms with and without parameters."""

    def __init__(self, dtype=None):
        super().__init__()
        self.lin = nn.Linear(D, D, dtype=dtype)
        self.rms = torchfast.nn.RMSNorm((4, D // 4), eps=1e-6, dtype=dtype)
        self.add = torchfast.nn.AddRMSNorm(D, eps=1e-5, dtype=dtype)
        self.ln = torchfast.nn.LayerNorm(D, dtype=dtype)
        self.ln_plain = torchfast.nn.LayerNorm(D, elementwise_affine=False)

    def forward(self, x):
        b, s, _ = x.shape
        y = self.rms(self.lin(x).reshape(b, s, 4, 8)).reshape(b, s, 32)  # literals: TorchScript
        y, h = self.add(y, x)
        return self.ln(y), self.ln_plain(h)


def make_block(dtype=None) -> nn.Module:
    torch.manual_seed(0)
    model = Block(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lin" not in name:
                p.uniform_(0.5, 1.5)
    return model


def _export(model, x, path, exporter, opset):
    names = dict(input_names=["x"], output_names=["y", "h"])
    if exporter == "dynamo":
        dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
        torch.onnx.export(model, (x,), path, dynamo=True, opset_version=opset, verbose=False,
                          custom_translation_table=torchfast.export.onnx_translation_table(opset),
                          dynamic_shapes=(dims,), external_data=False, **names)
    else:
        axes = {0: "batch", 1: "seq"}
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=opset,
                          dynamic_axes={"x": axes, "y": axes, "h": axes}, **names)


@pytest.mark.parametrize(
    "exporter, opset, has, lacks",
    [("dynamo", 18, {"LayerNormalization"}, {"RMSNormalization"}),
     ("dynamo", 23, {"RMSNormalization", "LayerNormalization"}, set()),
     ("torchscript", 12, {"ReduceMean"}, {"RMSNormalization", "LayerNormalization"}),
     ("torchscript", 17, {"LayerNormalization"}, {"RMSNormalization"})],
    ids=["dynamo-18", "dynamo-23", "torchscript-12", "torchscript-17"],
)
def test_onnx_standard_ops_dynamic_batch_and_sequence_match_in_onnxruntime(tmp_path, exporter, opset, has, lacks):
    model = make_block()
    path = str(tmp_path / "block.onnx")
    _export(model, torch.randn(2, 3, D), path, exporter, opset)
    graph = onnx.load(path)
    onnx.checker.check_model(graph, full_check=True)
    ops = {n.op_type for n in graph.graph.node}
    assert all(n.domain in ("", "ai.onnx") for n in graph.graph.node), "non-standard ONNX domain"
    assert has <= ops and not lacks & ops, ops
    assert [d.dim_param != "" for d in graph.graph.input[0].type.tensor_type.shape.dim] == [True, True, False]
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for shape in ((3, 5), (1, 9)):
        x = torch.randn(*shape, D) * 2
        got = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            expected = model(x)
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert_close(torch.from_numpy(g), e, rtol=1e-5, atol=1e-5, what=f"output {i} at {shape}")


@pytest.mark.parametrize("module, exporter, opset", [("rms", "dynamo", 23), ("add", "dynamo", 20),
                                                    ("ln", "torchscript", 17), ("rms", "torchscript", 12)])
def test_onnx_fp16_activations_with_fp32_parameters(tmp_path, module, exporter, opset):
    """The AMP layout exports as it runs: fp16 activations normalized in float32 with the fp32
    parameters, the output cast back to fp16 once; onnxruntime agrees within fp16 rounding."""
    torch.manual_seed(0)
    modules = {"rms": torchfast.nn.RMSNorm(D, eps=1e-6), "ln": torchfast.nn.LayerNorm(D)}
    if module == "add":
        class Add(nn.Module):
            def __init__(self):
                super().__init__()
                self.norm = torchfast.nn.AddRMSNorm(D, eps=1e-6)

            def forward(self, x):
                return self.norm(x, x * 0.5)

        model = Add()
    else:
        model = modules[module]
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5)
    x = torch.randn(3, 7, D, dtype=torch.float16)
    result = torchfast.export.onnx(model, (x,), tmp_path / "m.onnx", exporter=exporter, opset=opset)
    assert result.max_error <= 4e-3
    outputs = onnx.load(result.path).graph.output
    assert {o.type.tensor_type.elem_type for o in outputs} == {onnx.TensorProto.FLOAT16}


def test_onnx_float64_is_exact_and_default_export_verifies(tmp_path):
    model = make_block(torch.float64)
    result = torchfast.export.onnx(model, (torch.randn(2, 3, D, dtype=torch.float64),), tmp_path / "f64.onnx",
                                   opset=23)
    assert result.max_error < 1e-12
    result = torchfast.export.onnx(make_block(), (torch.randn(2, 3, D),), tmp_path / "default.onnx")
    assert result.max_error <= 1e-5


def test_torchscript_script_and_trace_call_the_ops_and_load_in_a_fresh_process(tmp_path):
    model = make_block()
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        expected = model(x)
    for kind, module in (("script", torch.jit.script(model)), ("trace", torch.jit.trace(model, (x,)))):
        graph = str(module.inlined_graph)
        for op in ("torchfast::rms_norm", "torchfast::add_rms_norm", "torchfast::layer_norm"):
            assert op in graph, (kind, op)
        with torch.no_grad():
            for got, e in zip(module(x), expected, strict=True):
                assert_close(got, e)
        module.save(str(tmp_path / f"{kind}.pt"))
    torch.save(x, tmp_path / "x.pt")
    run_fresh(
        "import sys, torch, torchfast\n"
        "x = torch.load(sys.argv[1] + '/x.pt')\n"
        "with torch.no_grad():\n"
        "    torch.save([torch.jit.load(sys.argv[1] + f'/{k}.pt')(x) for k in ('script', 'trace')],"
        " sys.argv[1] + '/out.pt')\n",
        str(tmp_path), cwd=tmp_path,
    )
    for outs in torch.load(tmp_path / "out.pt"):
        for got, e in zip(outs, expected, strict=True):
            assert_close(got, e)


def test_torch_export_keeps_the_ops_with_dynamic_batch_and_sequence(tmp_path):
    model = make_block()
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    program = torch.export.export(model, (torch.randn(2, 3, D),), dynamic_shapes=(dims,))
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    for op in ("rms_norm", "add_rms_norm", "layer_norm"):
        assert getattr(torch.ops.torchfast, op).default in targets, op
    torch.export.save(program, tmp_path / "block.pt2")
    loaded = torch.export.load(tmp_path / "block.pt2")
    x = torch.randn(4, 7, D)
    with torch.no_grad():
        for got, e in zip(loaded.module()(x), model(x), strict=True):
            assert_close(got, e)
