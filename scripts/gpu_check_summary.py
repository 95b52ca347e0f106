"""The one table that scripts/gpu_check.sh ends with: the build, the test counts from the junit XML, each
benchmark's median speedups from its JSON; a step stopped by its time limit says so.

    python scripts/gpu_check_summary.py OUT "GPU name" ARCHS BUILD_S TOTAL_S BUDGET_S

OUT holds what gpu_check.sh wrote: NAME.log, NAME.seconds and NAME.rc per step (exit status 124 = stopped
by `timeout`), gpu-tests.xml / all-tests.xml (junit), bench_*.json (benchmarks/_report.py's format:
cases with params and speedup medians), cpu-only-benchmarks.txt."""

from __future__ import annotations

import json
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def took(out: Path, name: str) -> tuple[str, int | None]:
    """(seconds as text, exit status or None) of a step."""
    secs, rc = out / f"{name}.seconds", out / f"{name}.rc"
    t = f"{secs.read_text().strip()} s" if secs.exists() else ""
    code = int(rc.read_text()) if rc.exists() else None
    return t, code


def status(code: int | None) -> str:
    return {None: "", 0: "", 124: ", timed out", 137: ", killed (time)"}.get(code, f", exit {code}")


def summary(out: Path, gpu: str, archs: str, build_s: str, total_s: str, budget: str) -> str:
    """The table as text."""
    rows = [("build", f"ok, arch {archs}", f"{build_s} s")]
    for name in ("gpu-tests", "all-tests"):
        t, code = took(out, name)
        xml = out / f"{name}.xml"
        if not xml.exists():
            if code is not None:
                rows.append((name, f"no result{status(code)} (see {name}.log)", t))
            continue
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        for suite in ET.parse(xml).getroot().iter("testsuite"):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
        failed = counts["failures"] + counts["errors"]
        passed = counts["tests"] - failed - counts["skipped"]
        rows.append((name, f"{passed} passed, {failed} failed, {counts['skipped']} skipped{status(code)}", t))

    for log in sorted(out.glob("bench_*.log")):
        path = log.with_suffix(".json")
        t, code = took(out, log.stem)
        if not path.exists():
            rows.append((log.stem, f"failed, no results{status(code)} (see {log.name})", t))
            continue
        try:
            data = json.loads(path.read_text())
            groups = {}
            for case in data["cases"]:
                p = case["params"]
                for target, per_base in case.get("speedup", {}).items():
                    for base, stats in per_base.items():
                        groups.setdefault((p["mode"], p["dtype"], target, base), []).append(stats["median"])
            rows.append((log.stem, "ok" if code == 0 else f"partial{status(code)}", t))
            for (mode, dtype, target, base), ratios in sorted(groups.items()):
                rows.append((f"  {mode} {dtype} {target} vs {base}",
                             f"{statistics.median(ratios):.2f}x median, {min(ratios):.2f}x..{max(ratios):.2f}x over "
                             f"{len(ratios)} sizes", ""))
        except (KeyError, TypeError, ValueError) as e:
            rows.append((log.stem, f"unreadable JSON: {type(e).__name__}: {e}", t))
    cpu_only = out / "cpu-only-benchmarks.txt"
    if cpu_only.exists():
        names = ", ".join(Path(b).stem for b in cpu_only.read_text().split())
        rows.append(("not run", f"CPU-only benchmarks (no --device): {names}", ""))
    rows.append(("total", f"budget {budget} s", f"{total_s} s"))

    header = ("step", "result", "time")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [f"==== GPU check: {gpu} ====  (speedup = baseline time / torchfast time)", fmt.format(*header),
             fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]
    return "\n".join(lines + ["", f"logs, junit XML and benchmark JSON: {out}"])


if __name__ == "__main__":
    print()
    print(summary(Path(sys.argv[1]), *sys.argv[2:7]))
