"""The normalization benchmarks (benchmarks/bench_rms_norm.py, bench_layer_norm.py on norm_bench.py):
the target summary on known ratios, and one `--quick` end-to-end run in a subprocess."""

import json
import subprocess
import sys

from .test_benchmarks import BENCH_DIR, H, _load


def _result(shape, ratios):
    mk = lambda name, ms: H.VariantResult(name, H.Stats.of([ms] * 3), [ms] * 3, 1)  # noqa: E731
    variants = {"torchfast": mk("torchfast", 1.0), **{b: mk(b, r) for b, r in ratios.items()}}
    params = {"mode": "fwd+bwd", "dtype": "float32", "shape": shape, "rows": 1, "n": 1}
    return H.CaseResult(shape, params, None, variants)


def test_summary_is_the_median_over_shapes_per_target():
    nb = _load("norm_bench")
    bench = nb.NormBench("demo", None, {"torchfast": None, "F": None}, None, lambda m: 2,
                         targets={("F", "float32"): 4.0, ("F", "bfloat16"): 10.0})
    results = [_result(s, {"F": r}) for s, r in (("a", 3.0), ("b", 5.0), ("c", 4.5))]
    s = nb.summary(bench, results)
    assert s["torchfast vs F (float32)"]["median"] == 4.5
    assert s["torchfast vs F (float32)"]["status"] == "PASS"
    assert s["torchfast vs F (bfloat16)"]["status"] == "n/a"  # no bfloat16 case was run


def test_bench_rms_norm_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "rms.json"
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "bench_rms_norm.py"), "--quick", "--modes", "fwd+bwd",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for heading in ("torchfast ms", "vs F", "vs compiled", "Saved for backward", "Targets (issue 4"):
        assert heading in proc.stdout, f"'{heading}' missing:\n{proc.stdout}"
    data = json.loads(out.read_text())
    (case,) = data["cases"]
    assert set(case["variants"]) == {"torchfast", "eager", "F", "compiled"}
    saved = {k: v["saved"]["bytes"] for k, v in case["variants"].items()}
    x_bytes = 64 * 256 * 4
    # x and one fp32 rstd per row (+ the 1 KiB weight, a parameter counted by the hook)
    assert saved["torchfast"] == x_bytes + 64 * 4 + 256 * 4
    assert saved["eager"] > saved["torchfast"]
