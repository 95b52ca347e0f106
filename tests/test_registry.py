"""The registry is the single source of truth: its schemas are the ones the dispatcher has."""

import torch

import torchfast


def test_python_schemas_match_the_registered_ops():
    for spec in torchfast.REGISTRY.values():
        for name, schema in spec.schemas.items():
            op = getattr(torch.ops.torchfast, name).default
            assert str(op._schema) == f"torchfast::{name}{schema}"


def test_every_op_has_native_and_reference_impls_and_samples():
    for spec in torchfast.REGISTRY.values():
        names = [i.name for i in spec.impls]
        assert names[0] == "native" and "reference" in names
        assert spec.sample_inputs("cpu", torch.float32)


def test_build_info_reports_the_build():
    info = torchfast.build_info()
    assert info["torch"] == torch.__version__
    assert info["compiled"] == torchfast._ext.built()
    if info["compiled"]:
        assert "DEFAULT" in info["cpu_isas"] and info["cpu_isa_active"] in info["cpu_isas"]
        assert info["ops"]["swish"][0] == "cpu"
