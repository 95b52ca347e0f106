"""`make gpu-check` (scripts/gpu_check.sh) without a GPU: its summary table (scripts/gpu_check_summary.py)
from the files the script leaves, timed-out and failed steps included, and its refusal to start where no
GPU is visible. The GPU run itself is recorded in docs/gpu.md when a GPU was at hand."""

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check_summary", ROOT / "scripts" / "gpu_check_summary.py")
gcs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gcs)


def _write(out: Path, name: str, seconds: int, rc: int, log: str = "") -> None:
    (out / f"{name}.seconds").write_text(f"{seconds}\n")
    (out / f"{name}.rc").write_text(f"{rc}\n")
    (out / f"{name}.log").write_text(log)


def test_summary_is_one_table_with_counts_speedups_and_time_outs(tmp_path):
    _write(tmp_path, "gpu-tests", 301, 1)
    (tmp_path / "gpu-tests.xml").write_text(
        '<testsuites><testsuite tests="120" failures="2" errors="1" skipped="7"/></testsuites>')
    _write(tmp_path, "bench_swish", 40, 0)
    case = lambda mode, ratio: {"params": {"mode": mode, "dtype": "bfloat16"},  # noqa: E731
                                "speedup": {"torchfast": {"compiled": {"median": ratio}}}}
    (tmp_path / "bench_swish.json").write_text(json.dumps({"cases": [case("fwd", 1.5), case("fwd", 2.5),
                                                                     case("fwd", 2.0)]}))
    _write(tmp_path, "bench_glu", 75, 124)  # stopped by `timeout` before writing its JSON
    (tmp_path / "cpu-only-benchmarks.txt").write_text("benchmarks/bench_rms_norm.py\nbenchmarks/bench_compress.py\n")
    text = gcs.summary(tmp_path, "NVIDIA H200 (torch 2.14.1)", "9.0", "95", "470", "480")
    lines = text.splitlines()
    assert lines[0].startswith("==== GPU check: NVIDIA H200 (torch 2.14.1) ====")
    body = lines[1:lines.index("")]
    col = body[0].index("result")  # every row's result starts in the header's column
    assert set(body[1]) == {"-", " "} and all(line[col - 2:col] == "  " for line in body[2:])
    rows = {line[:col].strip(): line[col:].strip() for line in body[2:]}
    assert rows["build"].startswith("ok, arch 9.0") and rows["build"].endswith("95 s")
    assert rows["gpu-tests"].startswith("110 passed, 3 failed, 7 skipped, exit 1")
    assert rows["bench_swish"].startswith("ok")
    assert rows["fwd bfloat16 torchfast vs compiled"].startswith("2.00x median, 1.50x..2.50x over 3 sizes")
    assert rows["bench_glu"].startswith("failed, no results, timed out (see bench_glu.log)")
    assert rows["not run"] == "CPU-only benchmarks (no --device): bench_rms_norm, bench_compress"
    assert rows["total"].startswith("budget 480 s") and rows["total"].endswith("470 s")


@pytest.mark.skipif(os.path.exists("/dev/nvidia0"), reason="a GPU is visible: the script would run for real")
def test_refuses_to_start_without_a_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PY",)}
    env.update(PATH="/usr/bin:/bin", GPU_CHECK_OUT=str(tmp_path / "out"))  # no nvidia-smi on this PATH
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1
    assert "gpu_check: FAILED: no GPU visible" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing installed or built
