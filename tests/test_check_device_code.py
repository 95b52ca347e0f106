"""The rules of scripts/check_device_code.py, which the CUDA build check (scripts/check_cuda_build.sh) runs
on the built _C with cuobjdump: every .cu file compiled for every arch of the list (PTX for +PTX ones),
every kernel launchable at the block size it is given. Checked here on synthetic cuobjdump listings, so
a rule that stops catching what it is for fails on a machine without CUDA too."""

import importlib.util
import sys
from pathlib import Path

from .test_cuda_archs import default_archs

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_device_code", ROOT / "scripts" / "check_device_code.py")
cdc = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("check_device_code", cdc)  # dataclasses look their module up there
_spec.loader.exec_module(cdc)

CONSTS = {"kMapThreads": 256, "kMaxRowThreads": 1024}
SOURCES = ["glu_cuda", "layer_norm_cuda"]
ALL = "8.0;9.0;10.0;12.0+PTX"
ELF = [f"{s}.sm_{a}.cubin" for s in SOURCES for a in (80, 90, 100, 120)]
PTX = [f"{s}.sm_120.ptx" for s in SOURCES]


def kernel(name, regs, shared=0):
    return cdc.Kernel(f"_ZN9torchfast_{len(name)}{name}ILi8EEvv", "sm_90", regs, 0, shared, 0)


def test_launch_constants_are_read_from_launch_math_h():
    assert cdc.launch_constants() == CONSTS


def test_default_arch_list_wants_four_cubins_and_ptx_of_the_newest():
    sass, ptx = cdc.wanted_archs(default_archs())
    assert sass == {"sm_80", "sm_90", "sm_100", "sm_120"} and ptx == {"sm_120"}


def test_a_complete_build_passes():
    ks = [kernel("glu_bwd_kernel", 80), kernel("layer_norm_bwd_kernel", 64, shared=1536)]
    assert cdc.problems(ks, ELF, PTX, ALL, SOURCES, CONSTS) == []


def test_a_missing_arch_or_ptx_is_named():
    ks = [kernel("glu_fwd_kernel", 40)]
    found = cdc.problems(ks, [e for e in ELF if e != "glu_cuda.sm_100.cubin"], PTX[1:], ALL, SOURCES, CONSTS)
    assert found == ["glu_cuda.cu: no sm_100 cubin in the build",
                     "glu_cuda.cu: no sm_120 PTX in the build (the list asks for sm_120+PTX)"]


def test_registers_against_the_block_each_kernel_gets():
    ok = [kernel("glu_bwd_kernel", 255), kernel("ce_rows_kernel", 64), kernel("rms_norm_fwd_kernel", 57)]
    assert cdc.problems(ok, ELF, PTX, ALL, SOURCES, CONSTS) == []
    # 65 registers round up to 72: 72 x 1024 > 64K. The fp64 cross_entropy backward had 77 before its
    # launch bound. A kernel the script does not know is held to the row kernels' 1024 threads.
    for bad in (kernel("ce_rows_kernel", 65), kernel("layer_norm_bwd_kernel", 77), kernel("new_kernel", 72)):
        found = cdc.problems([bad], ELF, PTX, ALL, SOURCES, CONSTS)
        assert len(found) == 1 and "x 1024 threads > 65536" in found[0], found


def test_static_shared_memory_over_48_kib_is_refused():
    found = cdc.problems([kernel("glu_fwd_kernel", 32, shared=49153)], ELF, PTX, ALL, SOURCES, CONSTS)
    assert len(found) == 1 and "49153 bytes of static shared memory" in found[0]


def test_parse_cuobjdump_resource_usage():
    text = """
Fatbin elf code:
================
arch = sm_100
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function _ZN9torchfast_kernel_a:
  REG:16 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN9torchfast_kernel_b:
  REG:64 STACK:80 SHARED:1024 LOCAL:4 CONSTANT[0]:640 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert cdc.parse_resource_usage(text) == [cdc.Kernel("_ZN9torchfast_kernel_a", "sm_100", 16, 0, 0, 0),
                                              cdc.Kernel("_ZN9torchfast_kernel_b", "sm_100", 64, 80, 1024, 4)]
