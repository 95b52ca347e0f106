#!/usr/bin/env python3
"""Checks the device code of a CUDA build of torchfast._C without a GPU, from what ptxas recorded in it.

    python scripts/check_device_code.py <_C.so> <TORCH_CUDA_ARCH_LIST> [cuobjdump]

1. Architectures: every csrc/ops/*/*_cuda.cu has a cubin for every arch of the list (sm_80, sm_90, ...),
   and PTX for each arch marked +PTX (what a GPU newer than the list JIT-compiles at load time).
2. Launch resources: a kernel launched with B threads per block needs B x (its registers, rounded up to
   the allocation unit of 8) <= 64K registers (the register file of an SM on every arch since 5.0),
   else the launch fails with "too many resources requested for launch". The elementwise and row-map
   kernels (MAP_KERNELS) are launched with launch_math.h's kMapThreads (256); every other kernel is
   taken to be a row kernel, which row_launch may give kMaxRowThreads (1024) threads. So a new kernel
   is held to the strict rule until it is listed here as a 256-thread one.
3. Static shared memory <= 48 KiB per kernel (more needs an opt-in attribute at launch).
The largest stack frame (register spills, printf buffers of device asserts) is reported, not refused.

cuobjdump comes from the pip package nvidia-cuda-cuobjdump (scripts/check_cuda_build.sh installs it in
.venv-cuda); the toolkit's own is used when that is absent. Exit status 1 with the list of problems.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 8  # registers are allocated to a thread in multiples of 8 (256 per warp)
MAX_STATIC_SHARED = 48 * 1024
# Kernels launched with kMapThreads threads per block (act_cuda.cuh, cuda_utils.cuh, norm_cuda.cuh's
# sum_partials, bias_act's column reduction of 32 x 8).
MAP_KERNELS = ("map1_kernel", "map2_kernel", "bias_act_fwd_kernel", "bias_act_dx_kernel",
               "bias_act_bwd_reduce_kernel", "glu_fwd_kernel", "glu_bwd_kernel", "sum_partials_kernel",
               "rope_kernel")  # rope: 32 x 8 threads (rope_cuda.cu)


@dataclass
class Kernel:
    name: str  # mangled
    arch: str
    regs: int
    stack: int
    shared: int
    local: int


def launch_constants(header: Path = ROOT / "csrc" / "include" / "torchfast" / "launch_math.h") -> dict[str, int]:
    """kMapThreads and kMaxRowThreads as launch_math.h defines them."""
    text = header.read_text()
    return {k: int(re.search(rf"constexpr int {k} = (\d+);", text).group(1)) for k in ("kMapThreads", "kMaxRowThreads")}


def parse_resource_usage(text: str) -> list[Kernel]:
    """cuobjdump --dump-resource-usage output: per cubin an `arch = sm_XX` header, then per kernel
    `Function <name>:` and a `REG:n STACK:n SHARED:n LOCAL:n ...` line."""
    kernels, arch, name = [], "?", None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            name = m.group(1)
        elif name and (m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)):
            kernels.append(Kernel(name, arch, *(int(g) for g in m.groups())))
            name = None
    return kernels


def wanted_archs(arch_list: str) -> tuple[set[str], set[str]]:
    """({'sm_80', ...} cubins, {'sm_120', ...} PTX) of a TORCH_CUDA_ARCH_LIST such as "8.0;9.0;12.0+PTX"."""
    sass, ptx = set(), set()
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        if not entry:
            continue
        sm = "sm_" + entry.split("+")[0].replace(".", "")
        sass.add(sm)
        if entry.endswith("+PTX"):
            ptx.add(sm)
    return sass, ptx


def problems(kernels: list[Kernel], elf_files: list[str], ptx_files: list[str], arch_list: str,
             sources: list[str], consts: dict[str, int]) -> list[str]:
    """Everything wrong with a build; elf_files / ptx_files as cuobjdump --list-elf / --list-ptx name them
    (e.g. 'swish_cuda.sm_90.cubin', 'swish_cuda.sm_120.ptx'); sources: the .cu file stems."""
    out = []
    sass, ptx = wanted_archs(arch_list)
    for stem in sources:
        for sm in sorted(sass):
            if not any(f.startswith(f"{stem}.") and f".{sm}." in f and f.endswith(".cubin") for f in elf_files):
                out.append(f"{stem}.cu: no {sm} cubin in the build")
        for sm in sorted(ptx):
            if not any(f.startswith(f"{stem}.") and f".{sm}." in f and f.endswith(".ptx") for f in ptx_files):
                out.append(f"{stem}.cu: no {sm} PTX in the build (the list asks for {sm}+PTX)")
    if not kernels:
        out.append("no kernel found in the resource usage dump")
    for k in kernels:
        threads = consts["kMapThreads"] if any(n in k.name for n in MAP_KERNELS) else consts["kMaxRowThreads"]
        regs = -(-k.regs // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
        if regs * threads > REGS_PER_SM:
            out.append(f"{k.name} ({k.arch}): {k.regs} registers x {threads} threads > {REGS_PER_SM}: the launch "
                       "would fail. Give it __launch_bounds__ (row kernels) or, if it is launched with "
                       f"{consts['kMapThreads']} threads, list it in MAP_KERNELS (scripts/check_device_code.py)")
        if k.shared > MAX_STATIC_SHARED:
            out.append(f"{k.name} ({k.arch}): {k.shared} bytes of static shared memory > 48 KiB")
    return out


def cuobjdump_path() -> str:
    own = Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cu13" / "bin" / "cuobjdump"
    return str(own) if own.exists() else (shutil.which("cuobjdump") or "")


def main(argv: list[str]) -> int:
    so, arch_list = argv[0], argv[1]
    tool = argv[2] if len(argv) > 2 else cuobjdump_path()
    if not tool:
        print("check_device_code: no cuobjdump (pip install nvidia-cuda-cuobjdump)", file=sys.stderr)
        return 1

    def dump(flag):
        r = subprocess.run([tool, flag, so], capture_output=True, text=True)
        return r.stdout + r.stderr  # --list-ptx says "No PTX file found" on stderr when there is none

    elf = re.findall(r"ELF file\s+\d+: (\S+)", dump("--list-elf"))
    ptx = re.findall(r"PTX file\s+\d+: (\S+)", dump("--list-ptx"))
    kernels = parse_resource_usage(dump("--dump-resource-usage"))
    sources = sorted(p.stem for p in ROOT.glob("csrc/ops/*/*_cuda.cu"))
    found = problems(kernels, elf, ptx, arch_list, sources, launch_constants())
    row = [k for k in kernels if not any(n in k.name for n in MAP_KERNELS)]
    stack = max((k.stack + k.local for k in kernels), default=0)
    print(f"check_device_code: {len(sources)} .cu files, {len(elf)} cubins ({', '.join(sorted({e.split('.')[-2] for e in elf}))})"
          f", {len(ptx)} PTX; {len(kernels)} kernels, registers at most {max((k.regs for k in kernels), default=0)} "
          f"(row kernels {max((k.regs for k in row), default=0)}), static shared at most "
          f"{max((k.shared for k in kernels), default=0)} B, stack frame at most {stack} B")
    for p in found:
        print("  - " + p, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
