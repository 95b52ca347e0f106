"""Running a snippet in a fresh Python process, as a user who just started Python would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_fresh(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `python -c code *args` with the repository importable; fail the test with its output if the
    process fails."""
    paths = [str(ROOT), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    env.pop("TRITON_INTERPRET", None)  # a plain user session, not the test suite's Triton interpreter
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (f"fresh process failed (exit {proc.returncode})\n--- stdout ---\n"
                                  f"{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}")
    return proc
