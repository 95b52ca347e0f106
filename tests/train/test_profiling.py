"""torchfast.profiling: the trace holds torchfast's ops under their own names; detect_anomaly."""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch import nn

import torchfast
from torchfast.hooks import count_hooks
from torchfast.profiling import detect_anomaly, profile, trace_files


def make_model() -> nn.Module:
    return nn.Sequential(
        torchfast.nn.Linear(8, 16, activation="swish"), torchfast.nn.RMSNorm(16), nn.Linear(16, 2)
    )


def test_trace_names_torchfast_ops(tmp_path):
    model = make_model()
    x = torch.randn(32, 8)
    table = io.StringIO()
    with profile(tmp_path, wait=1, warmup=1, active=2, file=table) as prof:
        for _ in range(4):
            model(x).sum().backward()
            prof.step()
    (trace,) = trace_files(tmp_path)
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    for op in (
        "torchfast::bias_act",
        "torchfast::bias_act_backward",
        "torchfast::rms_norm",
        "torchfast::rms_norm_backward",
    ):
        assert (
            op in names
        ), f"{op} not in the trace; it has {sorted(n for n in names if n and 'torchfast' in n)}"
    assert "torchfast::rms_norm" in table.getvalue() and "Self CPU" in table.getvalue()


def test_too_few_steps_says_so(tmp_path):
    out = io.StringIO()
    with profile(tmp_path, wait=1, warmup=1, active=3, file=out) as prof:
        prof.step()
    assert "1 steps profiled; the schedule needs wait+warmup+active = 5" in out.getvalue()
    assert trace_files(tmp_path) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [({"active": 0}, "active must be an int >= 1"), ({"wait": -1}, "wait must be an int >= 0")],
)
def test_bad_schedule(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=f"torchfast.profiling.profile: {match}"):
        with profile(tmp_path, **kwargs):
            pass


def test_detect_anomaly_finds_the_nan_and_cleans_up():
    model = make_model()
    x = torch.randn(4, 8)
    x[1, 2] = float("nan")
    with pytest.raises((RuntimeError, FloatingPointError), match=r"nan|NaN|non-finite"):
        with detect_anomaly(model):
            model(x).sum().backward()
    assert not torch.is_anomaly_enabled() and count_hooks(model) == 0
