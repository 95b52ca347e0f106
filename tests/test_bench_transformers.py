"""benchmarks/bench_transformers.py: how rounds are pooled and ratios formed (exact, on made-up
numbers), and a --quick end-to-end run in a subprocess (slow: every variant is a fresh process that
imports transformers)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="bench_transformers.py needs transformers (extra hf)")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_transformers.py"


def _bench():
    sys.path.insert(0, str(BENCH.parent))  # it imports its sibling harness.py
    spec = importlib.util.spec_from_file_location("_tf_bench_transformers", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(variant, dtype, cpu, growth, loss=10.0):
    return {"variant": variant, "dtype": dtype, "cpu_s": cpu, "cpu_median_s": sorted(cpu)[len(cpu) // 2],
            "growth_bytes": growth, "first_loss": loss, "first_step_s": 1.0}


def test_rounds_pool_steps_and_take_the_median_growth():
    b = _bench()
    merged = b._merge([_run("patch", "float32", [3.0, 1.0, 2.0], 100),
                       _run("patch", "float32", [5.0, 4.0, 6.0], 300),
                       _run("patch", "float32", [9.0, 8.0, 7.0], 200)])
    assert merged["cpu_s"] == [3.0, 1.0, 2.0, 5.0, 4.0, 6.0, 9.0, 8.0, 7.0]
    assert merged["cpu_median_s"] == 5.0
    assert merged["growth_bytes"] == 200 and merged["growth_bytes_rounds"] == [100, 300, 200]


def test_table_ratios_against_the_matching_baseline():
    b = _bench()
    results = [_run("transformers", "float32", [2.0], 400 << 20), _run("patch", "float32", [1.6], 200 << 20),
               _run("transformers+compile", "float32", [1.5], 400 << 20),
               _run("patch+compile", "float32", [1.6], 100 << 20)]
    text = b.table(results)
    rows = {line.split()[1]: line.split() for line in text.splitlines()[3:]}
    assert rows["patch"][3] == "1.25x"  # 2.0 / 1.6, against eager transformers
    assert rows["patch"][-3:] == ["PASS", "/", "PASS"]  # speed >= 1.25x, memory 0.50x <= 0.6x
    assert rows["patch+compile"][3] == "0.94x" and rows["patch+compile"][-1] == "FAIL"  # vs compiled
    assert rows["patch+compile"][7] == "0.25x"  # memory always against the eager unpatched model


def test_paired_ratios_are_per_turn():
    """--paired: the ratio of each turn is transformers' step of that turn over the variant's, and the
    median is over turns, not the ratio of the medians (a slow turn slows all variants alike)."""
    b = _bench()
    r = b.paired_ratios({"transformers": [2.0, 4.0, 3.0], "patch": [1.0, 4.0, 2.0]})
    assert r["patch"]["ratios"] == [2.0, 1.0, 1.5] and r["patch"]["ratio_median"] == 1.5
    assert r["patch"]["cpu_median_s"] == 2.0 and r["transformers"]["ratio_median"] == 1.0
    # where they differ: medians 3.0 / 3.5 = 0.86x, turns 2.0, 0.86, 1.25 -> 1.25x
    r = b.paired_ratios({"transformers": [1.0, 3.0, 5.0], "patch": [0.5, 3.5, 4.0]})
    assert r["patch"]["ratio_median"] == 1.25 and r["patch"]["cpu_median_s"] == 3.5


def test_paired_quick_run_end_to_end(tmp_path):
    out = tmp_path / "paired.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--paired", "--quick", "--steps", "2", "--dtypes",
                           "float32", "--json", str(out)], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())["results"]["float32"]
    assert set(res) == {"transformers", "optimize", "patch"}
    assert all(len(r["cpu_s"]) == 2 and len(r["ratios"]) == 2 for r in res.values())
    assert res["transformers"]["ratios"] == [1.0, 1.0]
    assert "paired turns" in proc.stdout


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    out = tmp_path / "bt.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--dtypes", "float32", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [r["variant"] for r in data["results"]] == ["transformers", "optimize", "patch"]
    assert not data["failures"]
    assert "Llama training step" in proc.stdout
