#!/usr/bin/env bash
# The GPU check, for a machine WITH a CUDA GPU (`make gpu-check`): builds torchfast with its CUDA
# kernels, runs every GPU test (those marked `gpu`, those parametrized over the cuda device, and the
# Triton tests, which run on the GPU when there is one), then the benchmarks that take --device cuda,
# within a time budget (default 8 minutes in all), and prints one summary table at the end.
#
#   bash scripts/gpu_check.sh                     # sets up .venv-gpu: torch==2.14.1 (CUDA 13.0 build)
#   PY=/path/to/python bash scripts/gpu_check.sh  # an environment that already has a CUDA torch
#
# The build is of a copy of the source tree as git sees it, in $OUT/src (editable install with
# TORCHFAST_CUDA=1 into that environment, test extras included; CUDA for the visible GPU's arch and only
# the DEFAULT CPU variant, for time), so this tree's own build (the CPU .venv's torchfast/_C*.so) is left
# alone; tests and benchmarks run from that copy. A step that runs out of its time is stopped and shows
# as "timed out" in the table. Knobs:
#   GPU_CHECK_OUT         results folder (default runs/gpu-check): logs, junit XML, benchmark JSON
#   GPU_CHECK_BUDGET_S    seconds for the whole check, setup and build included (default 480)
#   GPU_CHECK_BENCH_S     seconds of it kept for the benchmarks (default 150)
#   GPU_CHECK_BENCH_ARGS  arguments of every benchmark (default "--repeats 5 --warmup 3")
#   GPU_TESTS             pytest -k expression of the GPU tests (default "cuda or triton or gpu")
#   GPU_CHECK_ALL_TESTS=1 also run the whole suite afterwards (outside the budget)
#   TORCHFAST_GPU_VENV    the virtualenv made when PY is unset (default .venv-gpu)
#   TORCH_GPU_SPEC        torch requirement for that virtualenv (default torch==2.14.1; CUDA 13 needs
#                         an NVIDIA driver >= 580, pick an older torch for an older driver)
#   TORCH_CUDA_ARCH_LIST  archs to build (default: those of the visible GPUs)
#   TORCHFAST_CPU_ISAS    CPU variants to build (default DEFAULT)
#   PYTEST_ARGS           extra pytest arguments, e.g. "-x"
# Exit status 0 only when a GPU is visible, the build works, and every test and benchmark passes in time.
set -uo pipefail  # not -e: a failing step is recorded and the later steps still run

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${GPU_CHECK_OUT:-$ROOT/runs/gpu-check}"
VENV="${TORCHFAST_GPU_VENV:-$ROOT/.venv-gpu}"
TORCH_SPEC="${TORCH_GPU_SPEC:-torch==2.14.1}"
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
BENCH_S="${GPU_CHECK_BENCH_S:-150}"
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
rm -f "$OUT"/*.xml "$OUT"/*.json "$OUT"/*.log "$OUT"/*.seconds "$OUT"/*.rc "$OUT/cpu-only-benchmarks.txt"

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
  TORCHFAST_CPU_ISAS="${TORCHFAST_CPU_ISAS:-DEFAULT}" \
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
left() { echo $((BUDGET - (SECONDS - START))); }
# timed LIMIT NAME COMMAND...: runs COMMAND with its output in $OUT/NAME.log, stopped (SIGINT, so pytest
# still writes its report; SIGKILL 20 s later) after LIMIT seconds; records the seconds and the status.
timed() {
  local limit="$1" name="$2" t0=$SECONDS rc
  shift 2
  if [ "$limit" -le 0 ]; then
    echo "out of time before it started" >"$OUT/$name.log"
    rc=124
  else
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
  fi
  echo "$((SECONDS - t0))" >"$OUT/$name.seconds"
  echo "$rc" >"$OUT/$name.rc"
  [ "$rc" -eq 0 ] || STATUS=1  # pytest's exit 5 (no test collected) counts as a failure too
  return "$rc"
}
step "pytest -k '${GPU_TESTS:-cuda or triton or gpu}' (log: $OUT/gpu-tests.log; $(($(left) - BENCH_S)) s left for it)"
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
timed $(($(left) - BENCH_S)) gpu-tests "$PY" -m pytest -q -rfEs --junitxml="$OUT/gpu-tests.xml" ${PYTEST_ARGS:-} \
  -k "${GPU_TESTS:-cuda or triton or gpu}" tests
tail -n 3 "$OUT/gpu-tests.log"

# ---- 4. benchmarks ----------------------------------------------------------------------------------
# Only those that take --device cuda (the others measure the CPU kernels); the time left is shared out.
benches=()
for bench in benchmarks/bench_*.py; do
  if grep -q -e '"--device"' -e 'common_args(' "$bench"; then
    benches+=("$bench")
  else
    echo "$bench" >>"$OUT/cpu-only-benchmarks.txt"
  fi
done
for i in "${!benches[@]}"; do
  bench="${benches[$i]}"
  name="$(basename "$bench" .py)"
  limit=$(($(left) / (${#benches[@]} - i)))
  step "$bench --device cuda ${GPU_CHECK_BENCH_ARGS:---repeats 5 --warmup 3} (log: $OUT/$name.log; ${limit} s)"
  # shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS is a list of words
  if ! timed "$limit" "$name" "$PY" "$bench" --device cuda ${GPU_CHECK_BENCH_ARGS:---repeats 5 --warmup 3} \
    --json "$OUT/$name.json"; then
    tail -n 15 "$OUT/$name.log" >&2
    echo "gpu_check: $bench failed or ran out of time (log: $OUT/$name.log)" >&2
  fi
done
if [ "${GPU_CHECK_ALL_TESTS:-0}" = "1" ]; then
  step "the whole suite (GPU_CHECK_ALL_TESTS=1, outside the budget; log: $OUT/all-tests.log)"
  # shellcheck disable=SC2086
  timed 3600 all-tests "$PY" -m pytest -q -rfEs --junitxml="$OUT/all-tests.xml" ${PYTEST_ARGS:-} tests
  tail -n 3 "$OUT/all-tests.log"
fi

# ---- 5. summary -------------------------------------------------------------------------------------
"$PY" "$ROOT/scripts/gpu_check_summary.py" "$OUT" "${GPU_DESC#* }" "$ARCHS" "$BUILD_S" "$((SECONDS - START))" "$BUDGET"
if [ "$STATUS" -eq 0 ]; then
  step "OK: the GPU tests and the benchmarks passed within the budget"
else
  step "FAILED: see the summary above and the logs in $OUT"
fi
exit "$STATUS"
