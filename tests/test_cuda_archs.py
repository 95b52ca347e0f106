"""The default CUDA architectures of setup.py: every current data-center and consumer generation, plus PTX
for GPUs newer than the list (checked here without a GPU and without building: through the same
torch.utils.cpp_extension code that turns TORCH_CUDA_ARCH_LIST into nvcc flags at build time)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]


def default_archs() -> str:
    """setup.py's DEFAULT_CUDA_ARCHS, read without running setup.py."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DEFAULT_CUDA_ARCHS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no DEFAULT_CUDA_ARCHS")


def nvcc_flags(archs: str, monkeypatch) -> list[str]:
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", archs)
    return cpp_extension._get_cuda_arch_flags()


def test_default_covers_ampere_to_blackwell_with_ptx(monkeypatch):
    flags = nvcc_flags(default_archs(), monkeypatch)
    for sm in ("80", "90", "100", "120"):  # A100, H100/H200, B200, RTX 50xx: machine code for each
        assert f"-gencode=arch=compute_{sm},code=sm_{sm}" in flags, (sm, flags)
    # PTX of the newest listed arch: the driver JIT-compiles it on GPUs newer than the list.
    assert "-gencode=arch=compute_120,code=compute_120" in flags, flags


def test_setup_uses_the_default_only_when_the_user_sets_nothing():
    src = (ROOT / "setup.py").read_text()
    assert 'os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)' in src


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit (nvcc) on PATH")
def test_nvcc_here_knows_every_default_arch():
    listed = subprocess.run(["nvcc", "--list-gpu-code"], capture_output=True, text=True, check=True).stdout.split()
    for arch in default_archs().replace("+PTX", "").split(";"):
        assert f"sm_{arch.replace('.', '')}" in listed, (arch, listed)
