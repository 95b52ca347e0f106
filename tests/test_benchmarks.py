"""The benchmark harness (benchmarks/harness.py) and bench_swish: exact checks of the pieces whose
answer is known (statistics, saved-bytes counting, interleaving order, summary verdicts), and one
end-to-end `bench_swish.py --quick` run in a subprocess."""

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import torchfast

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_tf_bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


H = _load("harness")


# -- statistics ---------------------------------------------------------------------------------------


def test_stats_match_numpy_linear_quartiles():
    s = H.Stats.of([7, 1, 10, 3, 2, 9, 4, 8, 6, 5])  # order must not matter
    assert (s.median, s.q1, s.q3, s.min, s.max, s.n) == (5.5, 3.25, 7.75, 1, 10, 10)
    assert s.iqr == 4.5
    assert s.rel_spread == pytest.approx(4.5 / 2 / 5.5, rel=1e-15)


def test_stats_odd_count_and_single_sample():
    s = H.Stats.of([3.0, 1.0, 2.0])
    assert (s.median, s.q1, s.q3) == (2.0, 1.5, 2.5)
    one = H.Stats.of([4.0])
    assert (one.median, one.q1, one.q3, one.min, one.max, one.n) == (4.0, 4.0, 4.0, 4.0, 4.0, 1)
    with pytest.raises(ValueError, match="no samples"):
        H.Stats.of([])


def test_speedup_is_median_of_paired_ratios():
    # Paired ratios base/target are [2, 4, 1, 3, 5] -> median 3; the ratio of medians would be 2.5.
    target = [1.0, 1.0, 4.0, 2.0, 1.0]
    base = [2.0, 4.0, 4.0, 6.0, 5.0]
    mk = lambda name, xs: H.VariantResult(name, H.Stats.of(xs), xs, 1)  # noqa: E731
    r = H.CaseResult("c", {}, None, {"t": mk("t", target), "b": mk("b", base)})
    sp = r.speedup("t", "b")
    assert (sp.median, sp.min, sp.max, sp.q1, sp.q3) == (3.0, 1.0, 5.0, 2.0, 4.0)
    with pytest.raises(ValueError, match="same length"):
        H.paired_ratios([1.0], [1.0, 2.0])


# -- saved bytes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_saved_bytes_of_the_eager_composite(dtype):
    # mul saves both of its operands (x and sigmoid(x)); sigmoid saves its output sigmoid(x) again:
    # three saves, two distinct tensors.
    x = torch.randn(1000, dtype=dtype, requires_grad=True)
    nbytes = x.numel() * x.element_size()
    s = H.saved_bytes(lambda: x * torch.sigmoid(x))
    assert (s.bytes, s.packed_bytes, s.tensors, s.saves) == (2 * nbytes, 3 * nbytes, 2, 3)


def test_saved_bytes_of_silu_and_torchfast_is_x_alone():
    x = torch.randn(3, 500, requires_grad=True)
    nbytes = x.numel() * 4
    assert H.saved_bytes(lambda: F.silu(x)) == H.SavedBytes(nbytes, nbytes, 1, 1)
    # The property issue 2 asks of torchfast.swish: backward keeps only x alive.
    assert H.saved_bytes(lambda: torchfast.swish(x)) == H.SavedBytes(nbytes, nbytes, 1, 1)


def test_saved_bytes_counts_views_by_their_own_size():
    base = torch.randn(100, requires_grad=True)
    # exp saves its output: the full 100 elements; the slice's exp saves 10 elements.
    s = H.saved_bytes(lambda: (base.exp().sum(), base[:10].exp()))
    assert (s.bytes, s.tensors) == (110 * 4, 2)
    with torch.no_grad():
        assert H.saved_bytes(lambda: base * torch.sigmoid(base)) == H.SavedBytes(0, 0, 0, 0)


# -- run_case -----------------------------------------------------------------------------------------


def test_run_case_interleaves_rotated_and_reports_copy_ceiling():
    log = []
    config = H.Config(repeats=4, warmup=2, min_block_s=0.0)  # min_block 0: one call per sample
    case = H.Case("demo", {"k": 1}, lambda: {n: (lambda n=n: log.append(n)) for n in "abc"}, bytes_moved=8192)
    result = H.run_case(case, config)
    # 2 warm-up calls each, 3 calibration calls each, then repeat r runs the order rotated by r.
    assert log[:15] == list("aabbcc" "aaabbbccc")
    assert log[15:] == list("abc" "bca" "cab" "abc")
    assert set(result.variants) == {"a", "b", "c"} and result.copy is not None
    for v in result.variants.values():
        assert v.calls_per_sample == 1 and len(v.samples_ms) == 4 and v.ms.median > 0
        assert v.gbps == pytest.approx(8192 / (v.ms.median / 1e3) / 1e9, rel=1e-12)
        assert v.copy_fraction == pytest.approx(v.gbps / result.copy.gbps, rel=1e-12)
    json.dumps(result.as_dict())  # serializable as it is


def test_run_case_calibrates_block_length_and_counts_saved_bytes():
    x = torch.randn(64, requires_grad=True)
    calls = []
    variants = {"v": H.Variant(fn=lambda: calls.append(1), forward=lambda: x * torch.sigmoid(x))}
    config = H.Config(repeats=3, warmup=1, min_block_s=1.0, max_block_calls=7, copy_ceiling=False)
    r = H.run_case(H.Case("c", {}, lambda: variants), config)
    v = r.variants["v"]
    assert v.calls_per_sample == 7  # a no-op call needs the cap to keep a sample under 1 s
    assert len(calls) == 1 + 3 + 3 * 7  # warm-up, calibration, 3 samples of 7 calls
    assert v.saved == H.SavedBytes(2 * 64 * 4, 3 * 64 * 4, 2, 3)
    assert r.copy is None and v.gbps is None


def test_time_block_makes_exactly_the_calls_asked():
    n = []
    t = H.time_block(lambda: n.append(0), 5)
    assert len(n) == 5 and t > 0


def test_process_clock_counts_cpu_time_not_waiting():
    # Sleeping takes wall time but (almost) no CPU time: that is what makes --clock process robust
    # to being descheduled on a shared machine.
    assert H.time_block(lambda: time.sleep(0.03), 1, clock="wall") >= 0.03
    assert H.time_block(lambda: time.sleep(0.03), 1, clock="process") < 0.01
    with pytest.raises(ValueError, match="clock must be one of wall, process"):
        H.run_case(H.Case("c", {}, lambda: {"v": lambda: None}), H.Config(clock="cycles"))


def test_set_threads_fixes_torch_thread_count():
    before = torch.get_num_threads()
    try:
        assert H.set_threads(1) == 1 == torch.get_num_threads()
        with pytest.raises(ValueError, match=">= 1"):
            H.set_threads(0)
    finally:
        torch.set_num_threads(before)


# -- reporting ----------------------------------------------------------------------------------------


def test_format_table_aligns_text_left_and_numbers_right():
    text = H.format_table(["name", "ms"], [["ab", "1.5"], ["c", "12.25"], ["d", None]], title="T")
    assert text.splitlines() == ["T", "name     ms", "----  -----", "ab      1.5", "c     12.25",
                                 "d         -"]


def test_formatters():
    assert H.fmt_ms(H.Stats.of([1.0, 1.0, 2.0, 3.0, 3.0])) == "2±50%"
    assert H.fmt_ratio(2.345) == "2.35x" and H.fmt_ratio(None) == "-"
    assert H.fmt_bytes(3 << 20) == "3 MiB" and H.fmt_bytes(512) == "512 B"


def test_write_json_creates_folders_and_nulls_non_finite(tmp_path):
    path = H.write_json(tmp_path / "a" / "b.json", {"x": [1.0, math.nan, math.inf], "y": (1, 2)})
    assert json.loads(path.read_text()) == {"x": [1.0, None, None], "y": [1, 2]}


# -- bench_swish --------------------------------------------------------------------------------------


def _fake_result(dtype, log2n, ratio_vs):
    """A CaseResult whose torchfast is `ratio_vs[b]` times faster than baseline b in every repeat."""
    mk = lambda name, ms: H.VariantResult(name, H.Stats.of([ms] * 3), [ms] * 3, 1)  # noqa: E731
    variants = {"torchfast": mk("torchfast", 1.0)}
    variants.update({b: mk(b, r) for b, r in ratio_vs.items()})
    params = {"mode": "fwd+bwd", "dtype": dtype, "log2_numel": log2n, "numel": 1 << log2n}
    return H.CaseResult("x", params, None, variants)


def test_bench_swish_summary_takes_median_over_target_sizes():
    bench = _load("bench_swish")
    eager = {20: 2.5, 21: 1.5, 22: 3.0, 23: 2.2, 24: 1.9, 16: 0.1}  # 2^16 is outside the target range
    silu = {"float32": 1.1, "bfloat16": 0.9}
    results = [_fake_result(d, n, {"eager": e, "silu": silu[d], "compiled": 1.0})
               for d in ("float32", "bfloat16") for n, e in eager.items()]
    s = bench.summary(results, ["torchfast"])["targets"]
    eager_f32 = s["torchfast vs eager"]["dtypes"]["float32"]
    assert eager_f32["median"] == 2.2 and eager_f32["status"] == "PASS"
    assert sorted(eager_f32["per_size"]) == [20, 21, 22, 23, 24]
    assert s["torchfast vs silu"]["dtypes"]["bfloat16"]["status"] == "FAIL"
    assert s["torchfast vs silu"]["status"] == "FAIL"  # every dtype must pass
    assert s["torchfast vs compiled"]["status"] == "PASS"  # exactly 1.0 meets ">= 1x"
    # Without any size in 2^20..2^24 there is no verdict.
    s = bench.summary([_fake_result("float32", 12, {"eager": 3.0})], ["torchfast"])["targets"]
    assert s["torchfast vs eager"]["status"] == "n/a"


def test_bench_swish_quick_runs_end_to_end(tmp_path):
    """The smoke run: exit 0, the tables on stdout, a JSON file with the expected content."""
    out = tmp_path / "swish.json"
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "bench_swish.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for heading in ("torchfast ms", "eager ms", "silu ms", "compiled ms", "vs eager", "vs silu",
                    "vs compiled", "copy GB/s", "Saved for backward", "Target (issue 2)", "threads "):
        assert heading in proc.stdout, f"'{heading}' missing from output:\n{proc.stdout}"

    data = json.loads(out.read_text())
    assert {"benchmark", "environment", "config", "copy_bandwidth_gbps", "cases", "summary"} <= set(data)
    assert data["environment"]["threads"] == data["config"]["threads"] >= 1
    assert data["copy_bandwidth_gbps"] > 0
    cases = {(c["params"]["mode"], c["params"]["dtype"], c["params"]["log2_numel"]): c for c in data["cases"]}
    assert set(cases) == {("fwd", "float32", 12), ("fwd+bwd", "float32", 12)}
    for c in cases.values():
        assert set(c["variants"]) == {"torchfast", "eager", "silu", "compiled"}
        for v in c["variants"].values():
            assert v["ms"]["median"] > 0 and len(v["samples_ms"]) == 3 and v["gbps"] > 0
        assert set(c["speedup"]["torchfast"]) == {"eager", "silu", "compiled"}
        assert c["copy"]["gbps"] > 0
    saved = {k: v["saved"]["bytes"] for k, v in cases[("fwd+bwd", "float32", 12)]["variants"].items()}
    x_bytes = 4 << 12
    compiled = saved.pop("compiled")
    assert saved == {"torchfast": x_bytes, "silu": x_bytes, "eager": 2 * x_bytes}
    assert compiled in (x_bytes, 2 * x_bytes)  # inductor's partitioner decides; torch 2.13 saves x alone
    assert set(data["summary"]["targets"]) == {"torchfast vs eager", "torchfast vs silu",
                                               "torchfast vs compiled"}


# -- bench_cross_entropy ------------------------------------------------------------------------------


def test_bench_cross_entropy_quick_runs_end_to_end(tmp_path):
    """The smoke run (small sizes, float32, every part): exit 0, tables, JSON with every case. At these
    sizes the peak-RSS growth is within the process's start-up peak, so only its form is checked."""
    out = tmp_path / "ce.json"
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "bench_cross_entropy.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for heading in ("torchfast ms", "eager ms", "compiled ms", "vs eager", "vs compiled", "saved for backward",
                    "threads ", "load average", "peak RSS"):
        assert heading in proc.stdout, f"'{heading}' missing from output:\n{proc.stdout}"
    data = json.loads(out.read_text())
    cases = {c["params"]["op"]: c for c in data["cases"]}
    assert set(cases) == {"cross_entropy", "linear_cross_entropy"} and data["config"]["dtypes"] == ["float32"]
    for c in cases.values():
        assert set(c["variants"]) == {"torchfast", "eager", "compiled"}
        assert all(v["ms"]["median"] > 0 for v in c["variants"].values())
        assert set(c["speedup"]) == {"eager", "compiled"}
        assert c["params"]["check"]["loss_rel_diff"] < 1e-4
    assert len(cases["linear_cross_entropy"]["variants"]["torchfast"]["samples_ms"]) == 2
    # torchfast keeps the logits, the targets and one float per row; F.cross_entropy its log-softmax
    saved = {k: v["saved"]["bytes"] for k, v in cases["cross_entropy"]["variants"].items()}
    logits = 64 * 1000 * 4
    assert logits <= saved["torchfast"] <= logits + 64 * 16 and saved["eager"] >= logits
    (mem,) = data["memory"]
    assert set(mem["variants"]) == {"torchfast", "eager", "compiled"} and mem["status"] in ("PASS", "FAIL", "n/a")
    assert all(v["growth_bytes"] >= 0 and v["first_step_s"] > 0 for v in mem["variants"].values())

