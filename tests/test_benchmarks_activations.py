"""Smoke runs of bench_bias_act.py and bench_glu.py (--quick, one activation / op each) in a
subprocess: exit 0, the tables on stdout, and a JSON file with the cases, speedups and saved bytes."""

import json
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script, out, *args):
    proc = subprocess.run(
        [sys.executable, str(BENCH_DIR / script), "--quick", "--json", str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_bench_bias_act_quick(tmp_path):
    stdout, data = _run("bench_bias_act.py", tmp_path / "ba.json", "--acts", "gelu")
    for heading in (
        "torchfast ms",
        "eager ms",
        "compiled ms",
        "vs eager",
        "Saved for backward",
        "Target (issue 3, op)",
        "Target (issue 3, linear)",
    ):
        assert heading in stdout, f"'{heading}' missing:\n{stdout}"
    ops = {(c["params"]["op"], c["params"]["mode"]) for c in data["cases"]}
    assert ops == {("bias_act[gelu]", "fwd"), ("bias_act[gelu]", "fwd+bwd"), ("Linear[gelu]", "fwd+bwd")}
    for c in data["cases"]:
        assert set(c["variants"]) == {"torchfast", "eager", "compiled"}
        assert all(v["ms"]["median"] > 0 for v in c["variants"].values())
    (fb,) = [
        c for c in data["cases"] if c["params"]["op"] == "bias_act[gelu]" and c["params"]["mode"] == "fwd+bwd"
    ]
    x_bytes = 64 * 256 * 4
    assert fb["variants"]["torchfast"]["saved"]["bytes"] == x_bytes + 256 * 4  # x and the bias, nothing else
    assert fb["variants"]["eager"]["saved"]["bytes"] >= x_bytes  # eager keeps x + b
    statuses = {e["status"] for part in data["summary"].values() for e in part["entries"]}
    assert statuses <= {"PASS", "FAIL"}


def test_bench_glu_quick(tmp_path):
    stdout, data = _run("bench_glu.py", tmp_path / "glu.json", "--ops", "swiglu")
    for heading in (
        "torchfast ms",
        "packed ms",
        "eager ms",
        "compiled ms",
        "Saved for backward",
        "Targets (issue 3)",
    ):
        assert heading in stdout, f"'{heading}' missing:\n{stdout}"
    (fb,) = [c for c in data["cases"] if c["params"]["mode"] == "fwd+bwd"]
    two_inputs = 2 * 64 * 256 * 4
    saved = {k: v["saved"]["bytes"] for k, v in fb["variants"].items()}
    assert saved["torchfast"] == saved["packed"] == two_inputs and saved["eager"] == 3 * two_inputs // 2
    assert {(e["baseline"], e["need"]) for e in data["summary"]["entries"]} == {
        ("eager", 2.0),
        ("compiled", 1.2),
    }


def test_bench_linear_quick(tmp_path):
    """bench_linear.py compares torchfast.ops.linear with oneDNN forced against F.linear; on a CPU torch
    has no oneDNN GEMM for, it says so and exits 1."""
    from torchfast.ops.linear import _onednn_available

    if not _onednn_available():
        proc = subprocess.run([sys.executable, str(BENCH_DIR / "bench_linear.py"), "--quick"],
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 1 and "no oneDNN GEMM" in proc.stderr
        return
    stdout, data = _run("bench_linear.py", tmp_path / "lin.json")
    for heading in ("torchfast ms", "blas ms", "vs blas", "linear fwd+bwd", "'auto' would pick"):
        assert heading in stdout, f"'{heading}' missing:\n{stdout}"
    assert {(c["params"]["mode"], c["params"]["shape"]) for c in data["results"]} == {
        ("fwd", "256x256x256"), ("fwd+bwd", "256x256x256")}
    for c in data["results"]:
        assert set(c["variants"]) == {"torchfast", "blas"}
        assert all(v["ms"]["median"] > 0 for v in c["variants"].values())
