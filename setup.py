"""Builds torchfast._C: CPU kernels (several ISA variants) and, when possible, CUDA kernels.

Sources are found by glob: csrc/*.cpp and csrc/ops/*/*_cpu.cpp always, csrc/ops/*/*_kernel.cpp once
per CPU ISA (x86-64: DEFAULT, AVX2, AVX512; picked at run time like ATen's kernels), and
csrc/ops/*/*_cuda.cu for CUDA. Knobs (environment):
  TORCHFAST_CUDA=1|0     force / disable the CUDA kernels (default: when torch has CUDA and nvcc exists)
  TORCH_CUDA_ARCH_LIST   CUDA archs (default "8.0;9.0")
  MAX_JOBS               parallel compile jobs (torch's ninja build)
Build against the installed torch: pip install --no-build-isolation -e .
"""

import glob
import os
import platform

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension as ce

ROOT = os.path.dirname(os.path.abspath(__file__))
X86 = platform.machine().lower() in ("x86_64", "amd64")
# The flags ATen compiles its own per-ISA kernels with (aten/src/ATen/CMakeLists.txt).
ISA_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}
ISAS = list(ISA_FLAGS) if X86 else ["DEFAULT"]


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda():
    """Decide from the torch build and the toolkit, never from a visible GPU (build hosts have none)."""
    flag = os.environ.get("TORCHFAST_CUDA", "").strip()
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    if ce.CUDA_HOME is None:
        reasons.append("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    if flag == "0":
        return False
    if flag == "1" and reasons:
        raise RuntimeError("TORCHFAST_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons))
    return not reasons


def _nvidia_include_dirs():
    """Header folders of the NVIDIA pip packages torch depends on (cusparse.h, cublas_v2.h, ...).

    torch's CUDA headers include them, and a bare toolkit install may lack them."""
    import site

    roots = site.getsitepackages() + [site.getusersitepackages()]
    found = []
    for root in roots:
        found += glob.glob(os.path.join(root, "nvidia", "cu*", "include"))
        found += glob.glob(os.path.join(root, "nvidia", "*", "include"))
    return sorted(set(d for d in found if os.path.isdir(d)))


class BuildExtension(ce.BuildExtension):
    """torch's BuildExtension, plus the per-ISA compilation of the `*_kernel.cpp` sources."""

    def build_extension(self, ext):
        base = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args
        kernels = [os.path.join(ROOT, s) for s in _rel("csrc/ops/*/*_kernel.cpp")]
        for isa in ISAS:
            objects = self.compiler.compile(
                kernels,
                output_dir=os.path.join(self.build_temp, f"isa-{isa}"),
                include_dirs=ext.include_dirs,
                extra_postargs={"cxx": base + [f"-DCPU_CAPABILITY={isa}", f"-DCPU_CAPABILITY_{isa}"] + ISA_FLAGS[isa]},
            )
            ext.extra_objects.extend(objects)
        super().build_extension(ext)


def extension():
    with_cuda = _want_cuda()
    defines = [f"-DTORCHFAST_HAVE_{isa}" for isa in ISAS if isa != "DEFAULT"]
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-Wno-unused-parameter"] + defines
    sources = _rel("csrc/*.cpp") + _rel("csrc/ops/*/*_cpu.cpp")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    kwargs = dict(extra_link_args=["-fopenmp"])
    if not with_cuda:
        return ce.CppExtension("torchfast._C", sources, include_dirs=include_dirs,
                               extra_compile_args={"cxx": cxx}, **kwargs)
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    cuda_defines = ["-DTORCHFAST_WITH_CUDA", f'-DTORCHFAST_CUDA_ARCHS="{archs}"']
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"] + defines + cuda_defines
    return ce.CUDAExtension(
        "torchfast._C",
        sources + _rel("csrc/ops/*/*_cuda.cu"),
        include_dirs=include_dirs + _nvidia_include_dirs(),
        extra_compile_args={"cxx": cxx + cuda_defines, "nvcc": nvcc},
        **kwargs,
    )


setup(
    packages=find_packages(include=["torchfast", "torchfast.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
