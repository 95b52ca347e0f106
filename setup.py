"""Builds torchfast._C: CPU kernels (several ISA variants) and, when possible, CUDA kernels.

Sources are found by glob: csrc/*.cpp, csrc/ops/*/*_cpu.cpp and csrc/ops/*/*_autograd.cpp always (compiled
as two unity files, build/unity/*.cpp), csrc/ops/*/*_kernel.cpp once
per CPU ISA (x86-64: DEFAULT, AVX2, AVX512, AVX512_BF16; picked at run time like ATen's kernels), and
csrc/ops/*/*_cuda.cu for CUDA. Knobs (environment):
  TORCHFAST_CUDA=1|0     force / disable the CUDA kernels (default: when torch has CUDA and nvcc exists)
  TORCH_CUDA_ARCH_LIST   CUDA archs (default DEFAULT_CUDA_ARCHS: sm_80, sm_90, sm_100, sm_120 and PTX)
  TORCHFAST_CPU_ISAS     comma-separated subset of the CPU ISA variants to build (default: all of this
                         architecture's; DEFAULT is always built), for quicker builds that do not need
                         them all, e.g. the CUDA build check
  MAX_JOBS               parallel compile jobs (torch's ninja build)
  TORCHFAST_DEBUG_INFO   -g level of the C++ objects: 0, 1 (default: line tables, enough for a backtrace with
                         files and lines) or 2 (full -g, as Python's own flags ask; twice the compile time)
Build against the installed torch: pip install --no-build-isolation -e .
"""

import concurrent.futures
import glob
import os
import platform
import shutil
import subprocess

import torch
from setuptools import find_packages, setup


def _toolkit_of_nvcc():
    """The CUDA toolkit folder of the `nvcc` on PATH, where torch would guess it wrong, else None.

    Without CUDA_HOME, torch takes the folder above nvcc's bin/, which is wrong when nvcc on PATH is a
    wrapper script (/usr/local/bin/nvcc gives /usr/local: no CUDA headers, no libcudart to link).
    nvcc itself names its toolkit (TOP) in a dry run."""
    nvcc = shutil.which("nvcc")
    if nvcc is None or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return None
    if os.path.isfile(os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include", "cuda_runtime_api.h")):
        return None
    dry = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True)
    tops = [ln[len("#$ TOP="):] for ln in (dry.stdout + dry.stderr).splitlines() if ln.startswith("#$ TOP=")]
    return os.path.realpath(tops[0]) if tops else None


# Must be settled before cpp_extension is imported: it reads CUDA_HOME once, at import.
if torch.version.cuda and os.environ.get("TORCHFAST_CUDA") != "0" and (home := _toolkit_of_nvcc()):
    os.environ["CUDA_HOME"] = home
from torch.utils import cpp_extension as ce  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
# A100 (8.0), H100/H200 (9.0), B200 (10.0), RTX 50xx / RTX PRO Blackwell (12.0), plus compute_120 PTX that the
# driver compiles at load time for any newer GPU, so a default build runs on GPUs newer than this list.
DEFAULT_CUDA_ARCHS = "8.0;9.0;10.0;12.0+PTX"
X86 = platform.machine().lower() in ("x86_64", "amd64")
# The flags ATen compiles its own per-ISA kernels with (aten/src/ATen/CMakeLists.txt).
ISA_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}
# One more variant ATen does not have: AVX-512 plus the BF16 extension, whose VCVTNE2PS2BF16 rounds 32
# floats to bfloat16 in one instruction (at::vec emulates it in about ten). It uses at::vec's AVX-512
# code (CPU_CAPABILITY_AVX512) in a namespace of its own, and runs only where CPUID reports AVX512_BF16.
ISA_FLAGS["AVX512_BF16"] = ISA_FLAGS["AVX512"] + ["-mavx512bf16"]
VEC_CODE = {"AVX512_BF16": "AVX512"}  # the at::vec implementation each variant compiles
ISAS = list(ISA_FLAGS) if X86 else ["DEFAULT"]
if _wanted := os.environ.get("TORCHFAST_CPU_ISAS", "").strip():
    _asked = {v.strip().upper() for v in _wanted.split(",") if v.strip()}
    if not _asked or not _asked <= set(ISAS):
        raise SystemExit(
            f"torchfast setup.py: TORCHFAST_CPU_ISAS={_wanted!r} names {sorted(_asked - set(ISAS))}, "
            f"not among this architecture's variants {ISAS}"
        )
    ISAS = [isa for isa in ISAS if isa == "DEFAULT" or isa in _asked]


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda():
    """Decide from the torch build and the toolkit, never from a visible GPU (build hosts have none)."""
    flag = os.environ.get("TORCHFAST_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise RuntimeError(f"TORCHFAST_CUDA={flag!r}: use 1 (force the CUDA kernels), 0 (no CUDA) or unset")
    if flag == "0":
        return False
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build (install a CUDA build of torch)")
    if ce.CUDA_HOME is None:
        reasons.append("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    elif not os.path.isfile(os.path.join(ce.CUDA_HOME, "bin", "nvcc")):
        reasons.append(f"the CUDA toolkit folder {ce.CUDA_HOME} has no bin/nvcc (set CUDA_HOME)")
    if flag == "1" and reasons:
        raise RuntimeError("TORCHFAST_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons))
    return not reasons


def _nvidia_include_dirs():
    """Header folders of the NVIDIA pip packages the CUDA torch depends on (cusparse.h, cublas_v2.h, ...).

    ATen's CUDA headers include them, and a bare toolkit install lacks them. They sit beside torch in
    its site-packages (nvidia/cu13/include for CUDA 13, nvidia/<library>/include before that)."""
    import site

    roots = [os.path.dirname(os.path.dirname(torch.__file__))] + site.getsitepackages()
    found = []
    for root in roots:
        for pattern in ("cu*", "*"):  # cu13/ (CUDA 13's bundle of the toolkit libraries) first
            found += sorted(glob.glob(os.path.join(root, "nvidia", pattern, "include")))
    return list(dict.fromkeys(d for d in found if os.path.isdir(d)))


class BuildExtension(ce.BuildExtension):
    """torch's BuildExtension, compiling the C++ in groups that run side by side: the op glue (two unity
    files, see _unity_sources) and the `*_kernel.cpp` sources once per CPU ISA variant."""

    def finalize_options(self):
        super().finalize_options()
        # Objects go to one fixed folder inside the checkout, not the random temporary folder of pip's
        # editable builds: ninja then recompiles only what changed since the last build, and ccache
        # (scripts/compiler_cache.sh), which rewrites paths below the checkout to relative ones, finds the
        # objects of a build made in another clone.
        self.build_temp = os.path.join(ROOT, "build", "temp")

    def build_extension(self, ext):
        cxx = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args
        kernels = [os.path.join(ROOT, s) for s in _rel("csrc/ops/*/*_kernel.cpp")]
        # (folder, sources, flags) of every group: the op glue once, the kernels once per ISA, the .cu files.
        groups = [("glue", [os.path.join(ROOT, s) for s in _unity_sources()], {"cxx": cxx})]
        groups += [(f"isa-{isa}", kernels, {"cxx": cxx + [f"-DCPU_CAPABILITY={isa}",
                                                          f"-DCPU_CAPABILITY_{VEC_CODE.get(isa, isa)}"]
                                                    + ISA_FLAGS[isa]})
                   for isa in ISAS]
        if cuda := [os.path.join(ROOT, s) for s in ext.sources if s.endswith(".cu")]:
            groups.append(("cuda", cuda, ext.extra_compile_args))

        def compile_group(group):
            folder, sources, flags = group
            return self.compiler.compile(sources, output_dir=os.path.join(self.build_temp, folder),
                                         include_dirs=ext.include_dirs, extra_postargs=flags)

        # Each group is one ninja run. One after another, every run ended with cores idle while its
        # longest file finished (bias_act_kernel.cpp, five times); run together, the cores stay busy to
        # the end. Together they share ninja's usual number of jobs (cores + 2) instead of taking it
        # each: 5 groups x 4 jobs put 14 compilers of up to 0.9 GB each on 2 cores. An explicit
        # MAX_JOBS is a limit (memory), so it keeps the runs one at a time, each with MAX_JOBS jobs.
        if os.environ.get("MAX_JOBS"):
            workers, jobs = 1, os.environ["MAX_JOBS"]
        else:
            workers = len(groups)
            jobs = str(max(1, ((os.cpu_count() or 1) + 2) // workers))
        saved = os.environ.get("MAX_JOBS")
        os.environ["MAX_JOBS"] = jobs  # read by torch's ninja runner at each compile call
        try:
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                for objects in pool.map(compile_group, groups):
                    ext.extra_objects.extend(objects)
        finally:
            if saved is None:
                del os.environ["MAX_JOBS"]
            else:
                os.environ["MAX_JOBS"] = saved
        # Everything is compiled; setuptools still wants one source of its own before it links.
        ext.sources = [_link_stub()]
        super().build_extension(ext)


def _write_if_changed(path, text):
    """Writes a generated file only when its text changes: ninja rebuilds by time stamp."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.isfile(path):
        with open(path) as fh:
            if fh.read() == text:
                return os.path.relpath(path, ROOT)
    with open(path, "w") as fh:
        fh.write(text)
    return os.path.relpath(path, ROOT)


def _link_stub():
    return _write_if_changed(os.path.join(ROOT, "build", "unity", "link_stub.cpp"),
                             "// Generated by setup.py: the one source setuptools asks for; all code is elsewhere.\n")


def _unity_sources():
    """The op glue (csrc/*.cpp, csrc/ops/*/*_cpu.cpp, *_autograd.cpp) as two unity files in build/unity/.

    Each glue file is small, but each includes torch's operator and autograd headers, whose parsing and
    inline code were most of its compile time: 7 autograd files took 140 s of CPU one by one and 27 s
    as one file; the 8 others 64 s and 12 s. Two files, so that two cores build them side by side.
    Written only when their text changes, with paths relative to the checkout, so that ccache
    (CCACHE_BASEDIR) matches them across clones. The glue files therefore must not clash in names: each
    keeps its helpers in an anonymous namespace under names no other glue file uses."""
    out = []
    for name, patterns in (("ops_autograd.cpp", ["csrc/ops/*/*_autograd.cpp"]),
                           ("ops_cpu.cpp", ["csrc/*.cpp", "csrc/ops/*/*_cpu.cpp"])):
        files = [f for pattern in patterns for f in _rel(pattern)]
        text = "// Generated by setup.py (_unity_sources): the op glue compiled as one file.\n" + "".join(
            f'#include "../../{f}"\n' for f in files)
        out.append(_write_if_changed(os.path.join(ROOT, "build", "unity", name), text))
    return out


def extension():
    with_cuda = _want_cuda()
    defines = [f"-DTORCHFAST_HAVE_{isa}" for isa in ISAS if isa != "DEFAULT"]
    # No -std: cpp_extension adds the standard torch's headers need (C++20 for torch 2.14).
    # After Python's CFLAGS, which carry a full -g: full debug information of code that instantiates
    # ATen's templates doubled the compile time of the op glue (cross_entropy_autograd.cpp: 41 s of CPU
    # with -g, 20 s with -g1) and made _C 95 MB; line tables keep backtraces readable.
    debug_level = os.environ.get("TORCHFAST_DEBUG_INFO", "1").strip()
    if debug_level not in ("0", "1", "2"):
        raise SystemExit(f"torchfast setup.py: TORCHFAST_DEBUG_INFO={debug_level!r}; expected 0, 1 or 2")
    cxx = ["-O3", "-fopenmp", "-Wno-unused-parameter", f"-g{debug_level}"] + defines
    sources = []  # the C++ is compiled by BuildExtension.build_extension, in groups
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    kwargs = dict(extra_link_args=["-fopenmp"])
    if not with_cuda:
        return ce.CppExtension("torchfast._C", sources, include_dirs=include_dirs,
                               extra_compile_args={"cxx": cxx}, **kwargs)
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    cuda_defines = ["-DTORCHFAST_WITH_CUDA", f'-DTORCHFAST_CUDA_ARCHS="{archs}"']
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + defines + cuda_defines
    ext = ce.CUDAExtension("torchfast._C", sources + _rel("csrc/ops/*/*_cuda.cu"), include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx + cuda_defines, "nvcc": nvcc}, **kwargs)
    # Searched after the toolkit's own include folder, so they only fill in what the toolkit lacks.
    ext.include_dirs += _nvidia_include_dirs()
    return ext


setup(
    packages=find_packages(include=["torchfast", "torchfast.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
