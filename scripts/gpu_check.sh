#!/usr/bin/env bash
# The GPU check, for a machine WITH a CUDA GPU (`make gpu-check`): builds torchfast with its CUDA
# kernels, runs the GPU tests (pytest -m gpu) and then the whole test suite, then the GPU benchmarks
# (benchmarks/bench_*.py --device cuda), and prints a summary table at the end.
#
#   bash scripts/gpu_check.sh                     # sets up .venv-gpu: torch==2.14.1 (CUDA 13.0 build)
#   PY=/path/to/python bash scripts/gpu_check.sh  # an environment that already has a CUDA torch
#
# The build is of a copy of the source tree as git sees it, in $OUT/src (editable install with
# TORCHFAST_CUDA=1 into that environment, test extras included), so this tree's own build (the CPU
# .venv's torchfast/_C*.so) is left alone; tests and benchmarks run from that copy. Knobs:
#   GPU_CHECK_OUT         results folder (default runs/gpu-check): logs, junit XML, benchmark JSON
#   TORCHFAST_GPU_VENV    the virtualenv made when PY is unset (default .venv-gpu)
#   TORCH_GPU_SPEC        torch requirement for that virtualenv (default torch==2.14.1; CUDA 13 needs
#                         an NVIDIA driver >= 580, pick an older torch for an older driver)
#   TORCH_CUDA_ARCH_LIST  archs to build (default: those of the visible GPUs)
#   PYTEST_ARGS           extra pytest arguments, e.g. "-x"
# Exit status 0 only when a GPU is visible, the build works, and every test and benchmark passes.
set -uo pipefail  # not -e: a failing step is recorded and the later steps still run

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${GPU_CHECK_OUT:-$ROOT/runs/gpu-check}"
VENV="${TORCHFAST_GPU_VENV:-$ROOT/.venv-gpu}"
TORCH_SPEC="${TORCH_GPU_SPEC:-torch==2.14.1}"
START=$SECONDS

fail() {
  echo "gpu_check: FAILED: $*" >&2
  exit 1
}
step() { printf 'gpu_check: [%4ds] %s\n' "$((SECONDS - START))" "$*"; }

# ---- 0. a GPU must be visible -----------------------------------------------------------------------
# Checked before anything is installed; torch.cuda.is_available() decides for good below.
if command -v nvidia-smi >/dev/null; then
  GPUS="$(nvidia-smi -L 2>&1)" || fail "no GPU visible: nvidia-smi -L says: $GPUS"
  grep -q '^GPU ' <<<"$GPUS" || fail "no GPU visible: nvidia-smi -L lists none ($GPUS)"
  step "GPUs: $(grep -c '^GPU ' <<<"$GPUS") ($(grep -m1 '^GPU ' <<<"$GPUS"))"
elif [ -z "${PY:-}" ] && ! compgen -G "/dev/nvidia[0-9]*" >/dev/null; then
  fail "no GPU visible: no nvidia-smi and no /dev/nvidia* device (this script needs a CUDA GPU; on a machine without one, scripts/check_cuda_build.sh checks that the CUDA kernels build)"
fi

mkdir -p "$OUT" || fail "cannot create $OUT"
rm -f "$OUT"/*.xml "$OUT"/*.json "$OUT"/*.log "$OUT"/*.seconds

# ---- 1. the Python environment ----------------------------------------------------------------------
if [ -n "${PY:-}" ]; then
  case "$PY" in  # absolute, because the later steps run from the copy of the tree
    /*) ;;
    */*) PY="$PWD/$PY" ;;
    *) PY="$(command -v "$PY")" || fail "PY=$PY: not found" ;;
  esac
  step "using $PY"
else
  PY="$VENV/bin/python"
  DEPS="$TORCH_SPEC ninja setuptools>=64 wheel numpy"
  if [ -x "$PY" ] && [ "$(cat "$VENV/.torchfast-deps" 2>/dev/null)" = "$DEPS" ]; then
    step "reusing $VENV ($DEPS)"
  else
    step "creating $VENV with $DEPS"
    [ -x "$PY" ] || python3 -m venv "$VENV" || fail "could not create the virtualenv $VENV"
    # shellcheck disable=SC2086  # DEPS is a list of words
    "$PY" -m pip install -q --no-compile $DEPS >"$OUT/pip.log" 2>&1 || {
      tail -n 20 "$OUT/pip.log" >&2
      fail "pip install $DEPS failed (log: $OUT/pip.log)"
    }
    echo "$DEPS" >"$VENV/.torchfast-deps"
  fi
fi
GPU_DESC="$("$PY" - 2>"$OUT/gpu-probe.log" <<'EOF'
import sys
import torch
if torch.version.cuda is None:
    sys.exit(f"torch {torch.__version__} is a CPU-only build")
if not torch.cuda.is_available():
    sys.exit(f"no GPU visible to torch {torch.__version__} (CUDA {torch.version.cuda}); "
             "check the driver (CUDA 13 builds of torch need driver >= 580) and CUDA_VISIBLE_DEVICES")
caps = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
print(";".join(caps), torch.cuda.get_device_name(0), f"(torch {torch.__version__})")
EOF
)" || fail "$(tail -n 5 "$OUT/gpu-probe.log")"
ARCHS="${TORCH_CUDA_ARCH_LIST:-${GPU_DESC%% *}}"
step "GPU: ${GPU_DESC#* }; building for arch $ARCHS"

# ---- 2. build a copy of the source tree -------------------------------------------------------------
SRC="$OUT/src"
{ rm -rf "$SRC" && mkdir -p "$SRC"; } || fail "cannot create $SRC"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
  tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -xf - -C "$SRC" ||
  fail "could not copy the source tree (git ls-files) to $SRC"
BUILD_START=$SECONDS
if ! (cd "$SRC" && TORCHFAST_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCHS" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  "$PY" -m pip install --no-build-isolation -e ".[test]" >"$OUT/build.log" 2>&1); then
  grep -E "error|FAILED" "$OUT/build.log" | tail -n 30 >&2
  fail "the build failed (log: $OUT/build.log)"
fi
BUILD_S=$((SECONDS - BUILD_START))
cd "$SRC" || fail "cannot enter $SRC"
unset TRITON_INTERPRET  # the Triton kernels run for real on the GPU
"$PY" -c "import torchfast, sys; i = torchfast.build_info(); sys.exit(0 if i['cuda_kernels'] else 'no CUDA kernels')" ||
  fail "the build has no CUDA kernels (log: $OUT/build.log)"
step "built in ${BUILD_S}s: $("$PY" -c "import torchfast; i = torchfast.build_info(); print('ops', i['ops'], 'archs', i['cuda_arch_list'])")"

# ---- 3. tests ---------------------------------------------------------------------------------------
STATUS=0
run_pytest() {  # name, pytest arguments...
  local name="$1" t0=$SECONDS rc
  shift
  step "pytest $* (log: $OUT/$name.log)"
  # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
  "$PY" -m pytest -q -rfEs --junitxml="$OUT/$name.xml" ${PYTEST_ARGS:-} "$@" tests >"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 3 "$OUT/$name.log"
  echo "$((SECONDS - t0))" >"$OUT/$name.seconds"
  [ "$rc" -eq 0 ] || STATUS=1  # exit 5 (no test collected) counts as a failure too
}
run_pytest gpu-tests -m gpu
run_pytest all-tests

# ---- 4. benchmarks ----------------------------------------------------------------------------------
for bench in benchmarks/bench_*.py; do
  [ -e "$bench" ] || continue
  name="$(basename "$bench" .py)"
  step "$bench --device cuda (log: $OUT/$name.log)"
  if ! "$PY" "$bench" --device cuda --json "$OUT/$name.json" >"$OUT/$name.log" 2>&1; then
    tail -n 15 "$OUT/$name.log" >&2
    echo "gpu_check: $bench failed (log: $OUT/$name.log)" >&2
    STATUS=1
  fi
done

# ---- 5. summary -------------------------------------------------------------------------------------
"$PY" - "$OUT" "${GPU_DESC#* }, arch $ARCHS" "$BUILD_S" <<'EOF'
"""Summary table: test counts from the junit XML files, median speedups from the benchmark JSON."""
import json
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, gpu, build_s = Path(sys.argv[1]), sys.argv[2], sys.argv[3]


def table(headers, rows):
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


rows = [("build", f"ok, {build_s} s", "")]
for name in ("gpu-tests", "all-tests"):
    xml, secs = out / f"{name}.xml", out / f"{name}.seconds"
    took = f"{secs.read_text().strip()} s" if secs.exists() else ""
    if not xml.exists():
        rows.append((name, "no result (see the log)", took))
        continue
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in ET.parse(xml).getroot().iter("testsuite"):
        for k in counts:
            counts[k] += int(suite.get(k, 0))
    failed = counts["failures"] + counts["errors"]
    passed = counts["tests"] - failed - counts["skipped"]
    rows.append((name, f"{passed} passed, {failed} failed, {counts['skipped']} skipped", took))

bench_rows = []
for log in sorted(out.glob("bench_*.log")):
    path = log.with_suffix(".json")
    if not path.exists():
        rows.append((path.stem, f"failed, no results (see {log.name})", ""))
        continue
    try:
        data = json.loads(path.read_text())
        groups = {}
        for case in data["cases"]:
            p = case["params"]
            for target, per_base in case.get("speedup", {}).items():
                for base, stats in per_base.items():
                    key = (p["mode"], p["dtype"], target, base)
                    groups.setdefault(key, []).append(stats["median"])
        for (mode, dtype, target, base), ratios in sorted(groups.items()):
            bench_rows.append((path.stem, mode, dtype, f"{target} vs {base}",
                               f"{statistics.median(ratios):.2f}x", f"{min(ratios):.2f}x..{max(ratios):.2f}x",
                               len(ratios)))
        rows.append((path.stem, "ok", f"{data.get('elapsed_s', 0):.0f} s"))
    except (KeyError, TypeError, ValueError) as e:
        rows.append((path.stem, f"unreadable JSON: {type(e).__name__}: {e}", ""))

print(f"\n==== GPU check: {gpu} ====")
print(table(["step", "result", "time"], rows))
if bench_rows:
    print("\nBenchmarks: speedup = baseline time / torchfast time, median (and range) over the sizes")
    print(table(["benchmark", "mode", "dtype", "comparison", "median", "range", "sizes"], bench_rows))
print(f"\nlogs, junit XML and benchmark JSON: {out}")
EOF
if [ "$STATUS" -eq 0 ]; then
  step "OK: GPU tests, whole suite and benchmarks passed"
else
  step "FAILED: see the summary above and the logs in $OUT"
fi
exit "$STATUS"
