"""`torchfast export MODULE:FACTORY ...`: a full run (optimize, verify, int8) and the exit-2 errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from torchfast import cli

MODELS = Path(__file__).resolve().parent / "models.py"
FACTORIES = """
import torch
def not_a_module():
    return {"weight": torch.ones(2)}
def broken():
    raise RuntimeError("no weights here")
def mlp():
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 4))
"""


def test_export_optimize_verify_quantize(tmp_path, capsys):
    out = tmp_path / "cnn.onnx"
    code = cli.main(
        [
            "export",
            f"{MODELS}:SmallCNN",
            "--input-shape",
            "2,3,12,12",
            "--onnx",
            str(out),
            "--optimize",
            "--verify",
            "--quantize",
            "int8",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert "torchfast.optimize: 3 replaced" in text and "head.0 + head.1" in text, text
    m = re.search(r"onnx\s+(\S+)\s+([\d.]+) KiB .*max abs error ([\d.e+-]+)", text)
    assert m and Path(m.group(1)) == out and out.is_file(), text
    assert float(m.group(3)) < 1e-4
    q = tmp_path / "cnn.int8.onnx"
    assert q.is_file() and re.search(r"int8\s+\S+cnn.int8.onnx\s+[\d.]+ KiB\s+\(0\.\d+x of float", text), text


def test_export_module_from_the_current_folder(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_factories.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    assert (
        cli.main(
            [
                "export",
                "my_factories:mlp",
                "--input-shape",
                "2x5x16",
                "--onnx",
                "m.onnx",
                "--optimize",
                "--dynamic-sequence",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "0 + 1" in text and "dynamic batch and sequence; not verified" in text, text


@pytest.mark.parametrize(
    "target, shape, message",
    [
        ("no_such_module_xyz:make", "4,16", "cannot import 'no_such_module_xyz'"),
        ("{f}:missing", "4,16", "has no attribute 'missing'"),
        ("{f}:not_a_module", "4,16", "returned a dict, not a torch.nn.Module"),
        ("{f}:broken", "4,16", "raised RuntimeError: no weights here"),
        ("{f}", "4,16", "is not MODULE:FACTORY"),
        ("{f}:mlp", "4,-1", "not a list of positive integers"),
    ],
    ids=["import", "attribute", "not-module", "raises", "format", "shape"],
)
def test_bad_factory_exits_2(tmp_path, capsys, target, shape, message):
    factories = tmp_path / "factories.py"
    factories.write_text(FACTORIES)
    code = cli.main(
        ["export", target.format(f=factories), "--input-shape", shape, "--onnx", str(tmp_path / "x.onnx")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "torchfast export: error:" in err and message in err, err
    assert not (tmp_path / "x.onnx").exists()


def test_missing_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["export", "m:f", "--onnx", "x.onnx"])  # no --input-shape
    assert exc.value.code == 2 and "--input-shape" in capsys.readouterr().err


def test_benchmark_smoke(capsys):
    """benchmarks/bench_optimize.py at tiny sizes, so it does not rot (no timing is checked)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_optimize.py"
    spec = importlib.util.spec_from_file_location("bench_optimize", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--models", "llama", "--modes", "train"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"llama\s+train\s+[\d.]+ ms\s+[\d.]+ ms.*\d\.\d\dx\s+-\s+-\s+0\.\d\dx", out), out
