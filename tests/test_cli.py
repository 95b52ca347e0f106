"""The `torchfast` command: `info`, `info --json`, the `demo` main job, and command-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import torchfast
from torchfast import cli, demo

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    paths = [str(ROOT), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    env.pop("TRITON_INTERPRET", None)  # a plain user session, not the test suite's Triton interpreter
    return subprocess.run([sys.executable, "-m", "torchfast", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _explain(proc: subprocess.CompletedProcess) -> str:
    return (f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n"
            f"--- stderr ---\n{proc.stderr[-3000:]}")


def test_info_prints_the_build(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    fields = dict(re.findall(r"^(\w+)\s+(.*)$", out, re.MULTILINE))
    assert fields.get("compiled") == "True", out
    built = [isa.strip() for isa in fields["cpu_isas"].split(",")]
    assert fields["cpu_isa_active"] in built, out
    assert fields["torch"] == torchfast.build_info()["torch"]


def test_info_json_in_a_fresh_process():
    """`python -m torchfast info --json` in a new interpreter: the compiled extension loads there too."""
    proc = run_cli("info", "--json")
    assert proc.returncode == 0, _explain(proc)
    info = json.loads(proc.stdout)
    assert info["compiled"] is True, info.get("load_error")
    # The active variant follows ATen's choice: the best one built that does not exceed it.
    # AVX512_BF16 (ours) sits on top of ATen's AVX512 and needs the CPU's BF16 extension as well.
    order = ["DEFAULT", "AVX2", "AVX512", "AVX512_BF16"]
    ceiling = order.index(info["aten_cpu_capability"]) if info["aten_cpu_capability"] in order else 0
    allowed = [isa for isa in info["cpu_isas"] if order.index(isa) <= ceiling]
    assert info["cpu_isas_runnable"][: len(allowed)] == allowed, info
    assert set(info["cpu_isas_runnable"]) <= set(info["cpu_isas"])
    extra = info["cpu_isas_runnable"][len(allowed):]
    assert extra in ([], ["AVX512_BF16"]) and (not extra or ceiling == order.index("AVX512")), info
    assert info["cpu_isa_active"] == info["cpu_isas_runnable"][-1], info
    expected = torchfast.build_info()
    for key in ("torch", "compiled", "cpu_isas", "cpu_isas_runnable", "cuda_kernels", "ops"):
        assert info[key] == expected[key], key


def test_demo_trains_exports_and_reports(tmp_path: Path):
    out_dir = tmp_path / "onnx-out"
    proc = run_cli("demo", "--steps", "60", "--out", str(out_dir), "--seed", "1", cwd=tmp_path)
    assert proc.returncode == 0, _explain(proc)
    # Readable in a CI log: no carriage-return redraws when the output is not a terminal.
    assert "\r" not in proc.stdout + proc.stderr
    assert "torchfast demo: OK" in proc.stdout

    start, end = map(float, re.search(r"loss\s+start ([\d.]+) -> end ([\d.]+)", proc.stdout).groups())
    assert end < demo.LOSS_DROP * start, proc.stdout

    onnx_path = Path(re.search(r"onnx\s+(\S+\.onnx)", proc.stdout).group(1))
    assert onnx_path == out_dir / demo.ONNX_NAME and onnx_path.is_file()
    max_error = float(re.search(r"max abs error ([\d.e+-]+)", proc.stdout).group(1))
    assert 0 <= max_error < 1e-4, f"float32 model vs onnxruntime: max abs error {max_error}"
    import onnx

    onnx.checker.check_model(str(onnx_path))

    for dtype in ("float32", "bfloat16"):
        row = re.search(rf"^\s+{dtype}\s+([\d.]+) ms\s+([\d.]+) ms\s+([\d.]+)x$", proc.stdout, re.MULTILINE)
        assert row, f"no speed row for {dtype}:\n{proc.stdout}"
        fast, eager, ratio = map(float, row.groups())
        assert fast > 0 and eager > 0 and ratio == pytest.approx(eager / fast, rel=0.02, abs=0.01)
    # The progress bar, as whole lines on stderr (not a TTY here): it reaches the last step.
    assert re.search(r"train: 100%.*60/60", proc.stderr), proc.stderr[-2000:]
    # The Trainer's extras: TensorBoard logs where it says, a profiler trace, an activation table.
    log_dir = tmp_path / re.search(r"^\s+logs\s+(\S+)", proc.stdout, re.MULTILINE).group(1)
    assert list(log_dir.glob("events.out.tfevents.*")), proc.stdout
    trace = tmp_path / re.search(r"^\s+profile\s+(\S+\.json)", proc.stdout, re.MULTILINE).group(1)
    # The optimized demo model runs its Linear + SiLU pairs as torchfast.nn.Linear(activation="swish").
    assert "torchfast::bias_act" in trace.read_text()
    assert re.search(r"^\s+4\s+\[256, 4\]\s+bfloat16", proc.stdout, re.MULTILINE), proc.stdout


def test_demo_fails_clearly_when_the_loss_does_not_fall(tmp_path: Path, capsys):
    # One step cannot halve the loss: the check must fail before anything is exported.
    assert cli.main(["demo", "--steps", "1", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "did not fall" in err, err
    # Nothing exported; the training logs of the failed run stay (they help to see why).
    assert not list(tmp_path.rglob("*.onnx"))


@pytest.mark.parametrize("argv", [
    [],                                   # no command
    ["frobnicate"],                       # unknown command
    ["info", "--bogus"],
    ["demo", "--steps", "abc"],
    ["demo", "--steps", "0"],
    ["demo", "--device", "tpu"],
    ["demo", "--no-such-option"],
], ids=lambda a: " ".join(a) or "(none)")
def test_bad_command_line_exits_2(argv, capsys):
    # argparse exits with status 2 itself; `python -m torchfast` and the console script pass it on.
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: torchfast" in err and "error:" in err, err


def test_console_script_points_at_cli_main():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("torchfast") == "torchfast.cli:main"
