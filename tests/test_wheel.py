"""A wheel of the source tree installs into a fresh virtualenv that holds only torch, and works from outside
the source tree: the compiled kernels load, every CPU ISA variant of this build is inside, `torchfast info`
reports it, and an op computes what PyTorch computes. (docs/build.md, "A wheel".)

The wheel is built the way users are told to (`pip wheel --no-build-isolation --no-deps .`) with the same
compiler environment as `make build`, so ninja finds the objects of that build in build/temp and only
links (about 15 s); the virtualenv gets the pinned torch from the package index (seconds from a local
mirror) and the wheel's other dependencies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

import torchfast

ROOT = Path(__file__).resolve().parents[1]

# slow: about 60 s on a quiet 2-core machine, 160 s under load (a virtualenv, torch, numpy and tqdm
# installed into it); `make test-slow` runs it. The default suite checks the build itself.
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torchfast._ext.built(), reason="needs a compiled torchfast._C to compare with")]

PROBE = r"""
import json, sys
import torch, torch.nn.functional as F
import torchfast
from torchfast._info import build_info
x = torch.randn(64, 33, dtype=torch.float64).float()
err = float((torchfast.swish(x) - F.silu(x)).abs().max())
info = build_info()
print(json.dumps({"file": torchfast.__file__, "prefix": sys.prefix, "compiled": info["compiled"],
                  "cpu_isas": info["cpu_isas"], "err": err}))
"""


def compiler_env() -> dict:
    """`make build`'s environment (scripts/compiler_cache.sh), so the wheel build reuses its objects."""
    out = subprocess.run(["sh", str(ROOT / "scripts" / "compiler_cache.sh"), sys.prefix, str(ROOT)],
                         capture_output=True, text=True, check=True).stdout
    env = dict(os.environ)
    for line in out.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value.strip("'")
    return env


def test_wheel_installs_into_a_torch_only_venv_and_runs_outside_the_tree(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
                    str(wheels), str(ROOT)], check=True, cwd=ROOT, env=compiler_env(), capture_output=True)
    (wheel,) = wheels.glob("torchfast-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    subprocess.run([py, "-m", "pip", "install", "-q", torch_pin], check=True, capture_output=True)
    subprocess.run([py, "-m", "pip", "install", "-q", str(wheel)], check=True, capture_output=True)

    run_dir = tmp_path / "elsewhere"  # neither the source tree nor anything importable from it
    run_dir.mkdir()
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    got = json.loads(subprocess.run([py, "-c", PROBE], cwd=run_dir, env=clean, capture_output=True, text=True,
                                    check=True).stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(env_dir)), got
    assert got["compiled"] is True
    assert got["cpu_isas"] == torchfast.build_info()["cpu_isas"]  # every ISA variant of this build
    assert got["err"] <= 1e-6

    info = subprocess.run([env_dir / "bin" / "torchfast", "info"], cwd=run_dir, env=clean, capture_output=True,
                          text=True, check=True).stdout
    lines = dict(line.split(None, 1) for line in info.splitlines() if line.strip() and len(line.split(None, 1)) == 2)
    assert lines["compiled"] == "True", info
    assert lines["cpu_isas"] == ", ".join(torchfast.build_info()["cpu_isas"]), info
