"""ONNX export of a model using torchfast.nn.Swish, through torchfast.export.onnx (both exporters) and
through torch.onnx.export called directly: standard ONNX ops only, the checker, a dynamic batch axis,
and onnxruntime agreeing with PyTorch on two batch sizes.

The dynamo exporter takes seconds per export, so this file makes four of them in all."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch
from torch import nn

import torchfast
import torchfast.export
from torchfast.export import MIN_OPSET, OnnxVerificationError
from torchfast.export._tables import onnx_opset, pick_opset
from torchfast.ops.swish import SPEC as SWISH_SPEC
from torchfast.testing import assert_close

from .fresh import run_fresh

STANDARD_DOMAINS = {"", "ai.onnx"}
D_IN = 8


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 16), torchfast.nn.Swish(), nn.Linear(16, 4))


def example(batch: int) -> torch.Tensor:
    return torch.randn(batch, D_IN) * 3  # wide enough to reach both tails of the sigmoid


def check_graph(path: Path, *, opset: int, swish_node: bool) -> None:
    """The file passes the checker, imports only standard domains at `opset`, holds standard-domain
    nodes only, translates swish as expected, and has a symbolic dim 0 on its input and output."""
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    imports = {o.domain: o.version for o in model.opset_import}
    assert set(imports) <= STANDARD_DOMAINS and imports.get("", imports.get("ai.onnx")) == opset, imports
    assert not model.functions, f"local functions {[f.name for f in model.functions]}"
    nodes = model.graph.node
    custom = [(n.domain, n.op_type) for n in nodes if n.domain not in STANDARD_DOMAINS]
    assert not custom, f"nodes outside the standard ONNX domain: {custom}"
    ops = [n.op_type for n in nodes]
    if swish_node:
        assert "Swish" in ops and "Sigmoid" not in ops, ops
        (swish,) = [n for n in nodes if n.op_type == "Swish"]
        alpha = [a.f for a in swish.attribute if a.name == "alpha"]
        assert alpha in ([], [1.0]), f"Swish alpha={alpha}: x * sigmoid(alpha * x) is swish only for alpha=1"
    else:
        assert "Swish" not in ops, ops
        (sigmoid,) = [n for n in nodes if n.op_type == "Sigmoid"]
        # x * sigmoid(x): one Mul fed by the Sigmoid's input and output
        x_and_sigmoid = {sigmoid.input[0], sigmoid.output[0]}
        muls = [n for n in nodes if n.op_type == "Mul" and set(n.input) == x_and_sigmoid]
        assert len(muls) == 1, f"no Mul(x, Sigmoid(x)) in {ops}"
    for value in (model.graph.input[0], model.graph.output[0]):
        dim0 = value.type.tensor_type.shape.dim[0]
        assert dim0.dim_param and not dim0.HasField("dim_value"), f"{value.name}: dim 0 not symbolic: {dim0}"


def check_runs_in_onnxruntime(path: Path, model: nn.Module) -> None:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    for batch in (3, 7):
        x = example(batch)
        (got,) = session.run(None, {graph_input.name: x.numpy()})
        with torch.no_grad():
            assert_close(torch.from_numpy(got), model.eval()(x), dtype=torch.float32, what=f"batch {batch}")


@pytest.mark.parametrize(
    "exporter, opset, file_opset, swish_node",
    [("dynamo", None, 20, False), ("dynamo", 24, 24, True), ("torchscript", None, 20, False)],
    ids=["dynamo-default", "dynamo-opset24", "torchscript-default"],
)
def test_export_is_standard_onnx_and_matches(tmp_path, exporter, opset, file_opset, swish_node):
    model = make_model().train()
    model[2].eval()  # a frozen submodule: its mode must survive the export too
    result = torchfast.export.onnx(model, (example(5),), tmp_path / "m.onnx", exporter=exporter, opset=opset)
    assert result.path == str(tmp_path / "m.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"], "not one self-contained file"
    assert isinstance(result.max_error, float) and 0.0 <= result.max_error <= 1e-5, result
    assert [m.training for m in model] == [True, True, False], "the export changed the model's modes"
    check_graph(tmp_path / "m.onnx", opset=file_opset, swish_node=swish_node)
    check_runs_in_onnxruntime(tmp_path / "m.onnx", model)


def test_fixed_shapes_without_dynamic_batch(tmp_path):
    result = torchfast.export.onnx(make_model(), (example(3),), tmp_path / "fixed.onnx",
                                   exporter="torchscript", dynamic_batch=False)
    dims = onnx.load(result.path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [3, D_IN] and not dims[0].dim_param
    assert 0.0 <= result.max_error <= 1e-5


def test_default_opsets_are_the_documented_ones():
    assert torchfast.export.DEFAULT_OPSET == {"dynamo": 20, "torchscript": 20}


USER_TORCHSCRIPT_EXPORT = r"""
import sys, torch
path, order = sys.argv[1], sys.argv[2]
if order == "torch.onnx-first":
    import torch.onnx
import torchfast
# torchfast does not import torch.onnx itself (import time); its symbolics are registered either way
assert ("torch.onnx" in sys.modules) == (order == "torch.onnx-first"), order
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torchfast.nn.Swish(), torch.nn.Linear(16, 4)).eval()
torch.save(model.state_dict(), path + ".pt")
torch.onnx.export(model, (torch.randn(3, 8),), path, dynamo=False, input_names=["x"], output_names=["y"],
                  dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
"""


@pytest.mark.parametrize("order", ["torchfast-first", "torch.onnx-first"])
def test_user_calls_torchscript_exporter_after_import_torchfast(tmp_path, order):
    """A user's own torch.onnx.export(dynamo=False) finds the symbolic with no extra step, whether
    torch.onnx was imported before or after torchfast."""
    path = tmp_path / "user.onnx"
    run_fresh(USER_TORCHSCRIPT_EXPORT, str(path), order, cwd=tmp_path)
    check_graph(path, opset=torchfast.export.DEFAULT_OPSET["torchscript"], swish_node=False)
    model = make_model()
    model.load_state_dict(torch.load(str(path) + ".pt"))
    check_runs_in_onnxruntime(path, model)


def test_user_calls_dynamo_exporter_with_public_table(tmp_path):
    model = make_model().eval()
    path = tmp_path / "user.onnx"
    torch.onnx.export(model, (example(3),), path, dynamo=True, verbose=False, opset_version=18,
                      custom_translation_table=torchfast.export.onnx_translation_table(18),
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    check_graph(path, opset=18, swish_node=False)
    check_runs_in_onnxruntime(path, model)


def test_verify_raises_when_onnx_disagrees(tmp_path, monkeypatch):
    """A wrong translation (sigmoid without the multiply) is caught by verify, with a message that
    says where; the same export with verify=False goes through."""

    def wrong_translation(x):
        return onnx_opset(18).Sigmoid(x)

    monkeypatch.setitem(SWISH_SPEC.onnx_translations, "swish", {18: wrong_translation})
    with pytest.raises(OnnxVerificationError, match=r"disagrees .* batch size 3: output 0: \d+ of 12 elem"):
        torchfast.export.onnx(make_model(), (example(3),), tmp_path / "wrong.onnx")


def test_every_registered_op_has_onnx_translations():
    """Each op in the registry can be exported at every opset both exporters accept."""
    for name, spec in torchfast.REGISTRY.items():
        overload = getattr(torch.ops.torchfast, name).default
        for opset in range(MIN_OPSET["dynamo"], onnx.defs.onnx_opset_version() + 1):
            assert overload in torchfast.export.onnx_translation_table(opset), (name, opset)
        for opset in range(MIN_OPSET["torchscript"], 21):
            assert pick_opset(spec.onnx_symbolics.get(name, {}), opset) is not None, (name, opset)
    table = torchfast.export.onnx_translation_table
    assert table(23)[torch.ops.torchfast.swish.default] is not table(24)[torch.ops.torchfast.swish.default]


def _not_a_module(x):
    return x


@pytest.mark.parametrize(
    "model, args, kwargs, error, match",
    [
        (_not_a_module, None, {}, TypeError, r"'model' must be a torch.nn.Module, got function"),
        (None, None, {"exporter": "tensorrt"}, ValueError,
         r"'exporter' is 'tensorrt'; choose one of 'dynamo', 'torchscript'"),
        (None, None, {"opset": 17}, ValueError,
         r"'opset' is 17; exporter='dynamo' supports opsets 18\.\.\d+; for older opsets use "
         r"exporter='torchscript'"),
        (None, None, {"opset": 24, "exporter": "torchscript"}, ValueError,
         r"supports opsets 9\.\.20; opset 24 needs exporter='dynamo'"),
        (None, None, {"opset": 8, "exporter": "torchscript"}, ValueError, r"'opset' is 8"),
        (None, None, {"opset": "20"}, TypeError, r"'opset' must be an int"),
        (None, [3.0], {}, TypeError, r"'args' holds a float at position 0"),
        (None, (torch.randn(2, D_IN), torch.randn(3, D_IN)), {}, ValueError,
         r"different sizes of dim 0 \(2, 3\)"),
        (None, torch.tensor(1.0), {}, ValueError, r"0-d tensor at position 0.*dynamic_batch=False"),
        (None, torch.randn(2, D_IN, dtype=torch.bfloat16), {}, ValueError, r"bfloat16.*verify=False"),
    ],
    ids=["not-a-module", "unknown-exporter", "dynamo-opset-too-old", "torchscript-opset-too-new",
         "torchscript-opset-too-old", "opset-not-int", "non-tensor-arg", "batch-sizes-differ", "scalar-input",
         "bf16-verify"],
)
def test_bad_arguments_are_refused_before_exporting(tmp_path, model, args, kwargs, error, match):
    model = make_model() if model is None else model
    args = (example(2),) if args is None else args
    with pytest.raises(error, match=r"torchfast\.export\.onnx: argument .*" + match):
        torchfast.export.onnx(model, args, tmp_path / "bad.onnx", **kwargs)
    assert not (tmp_path / "bad.onnx").exists()
