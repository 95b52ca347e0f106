"""quantize_onnx picks int8 settings for the CPU it runs on and refuses a model whose error is far beyond
what int8 gives. These run on whatever CPU the tests run on (VNNI or not), never assuming one: the
decision is tested with fake CPU flags, saturation on a real non-VNNI CPU where there is one, and the
check itself with a quantizer made to go wrong."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")

import torchfast.compress as C  # noqa: E402
from torchfast.compress import _onnx  # noqa: E402

BOUND = _onnx.INT8_MAX_REL_ERROR


@contextlib.contextmanager
def _no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


@pytest.mark.parametrize("flags,machine,reduce_range", [
    ({"sse4_2", "avx2", "fma"}, "x86_64", True),                   # AMD Zen 3, Haswell...: no VNNI
    ({"avx2", "avx512f", "avx512bw"}, "x86_64", True),             # Skylake-SP: AVX-512 without VNNI
    ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", False),         # Cascade Lake and later, Zen 4
    ({"avx2", "avx_vnni"}, "x86_64", False),                        # Alder Lake: AVX-VNNI without AVX-512
    ({"avx2", "amx_int8"}, "AMD64", False),
    ({"fp", "asimd"}, "aarch64", False),                            # ARM: the x86 kernels do not run
], ids=["avx2", "avx512-no-vnni", "avx512-vnni", "avx-vnni", "amx", "arm"])
def test_decision_from_cpu_flags(flags, machine, reduce_range):
    rr, why = _onnx.int8_settings(flags, machine)
    assert rr is reduce_range and why


def test_unreadable_flags_on_x86_take_the_setting_accurate_everywhere(monkeypatch):
    monkeypatch.setattr(_onnx, "_cpu_flags", lambda: None)
    assert _onnx.int8_settings(machine="x86_64")[0] is True


def _saturating_model(tmp_path):
    """One Linear whose int8 form saturates onnxruntime's u8s8 kernels without VNNI: inputs near their
    maximum quantize to u8 values near 255, positive weights to s8 near 127, and vpmaddubsw adds two
    such products (up to 64770) in 16 bits (max 32767)."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(256, 64).eval()
    with torch.no_grad():
        model.weight.copy_(torch.rand(64, 256, generator=gen) * 0.5 + 0.5)
        model.bias.zero_()
    x = torch.rand(64, 256, generator=gen) * 0.2 + 0.8
    src = str(tmp_path / "sat.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter: quick, and enough here
        torch.onnx.export(model, (x,), src, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    return model, x, src


def _u8s8_pairs_saturated(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w.T as a non-VNNI x86 kernel computes it: u8 x s8 products summed in pairs into int16
    with saturation (vpmaddubsw), then in int32; per-tensor scales as quantize_dynamic picks them."""
    sx = max(x.max(), 0) / 255.0
    sw = np.abs(w).max() / 127.0
    qx = np.clip(np.round(x / sx), 0, 255).astype(np.int64)
    qw = np.clip(np.round(w / sw), -127, 127).astype(np.int64)
    prod = qx[:, None, :] * qw[None, :, :]
    pairs = np.clip(prod[..., 0::2] + prod[..., 1::2], -32768, 32767)
    return pairs.sum(-1) * sx * sw


def test_the_model_saturates_u8s8_pairs(tmp_path):
    """The construction is what the non-VNNI cases below rely on: emulated, it is far beyond the bound."""
    model, x, _ = _saturating_model(tmp_path)
    exact = model(x).detach().numpy()
    emulated = _u8s8_pairs_saturated(x.numpy(), model.weight.detach().numpy())
    assert _onnx.rel_l2_error(exact, emulated) > 4 * BOUND


def test_default_settings_are_within_the_bound_on_this_cpu(tmp_path):
    _, x, src = _saturating_model(tmp_path)
    with _no_warnings():
        r = C.quantize_onnx(src, tmp_path / "q.onnx", calibration_data=x)
    assert r.reduce_range is _onnx.int8_settings()[0] and r.settings == _onnx.int8_settings()[1]
    assert r.rel_error <= BOUND, r


def test_forced_8bit_weights_on_this_cpu(tmp_path):
    """Full 8-bit weights: accurate with VNNI; on an x86 CPU without it onnxruntime saturates, and the
    check must refuse the model instead of returning it."""
    _, x, src = _saturating_model(tmp_path)
    needs_reduce_range, why = _onnx.int8_settings()
    if why.startswith("CPU flags unreadable"):
        pytest.skip(f"whether this CPU has VNNI is unknown ({why})")
    if not needs_reduce_range:  # VNNI, or not x86
        r = C.quantize_onnx(src, tmp_path / "q.onnx", calibration_data=x, reduce_range=False)
        assert r.rel_error <= BOUND and r.reduce_range is False
    else:
        with pytest.raises(RuntimeError, match=r"quantize_onnx: the int8 model .* off the float model"):
            C.quantize_onnx(src, tmp_path / "q.onnx", calibration_data=x, reduce_range=False)


@pytest.fixture
def broken_8bit(monkeypatch):
    """This CPU made to look like it has VNNI, and onnxruntime's quantize_dynamic made to go wrong as
    saturating kernels do (the weight scales halved, so outputs are about half) whenever it is asked
    for full 8-bit weights; with reduce_range=True it is left alone. `always=True` breaks both."""
    import onnx
    import onnxruntime.quantization as oq

    real = oq.quantize_dynamic
    state = {"always": False}

    def quantize_dynamic(src, dst, *args, reduce_range=False, **kwargs):
        real(src, dst, *args, reduce_range=reduce_range, **kwargs)
        if reduce_range and not state["always"]:
            return
        model = onnx.load(dst)
        for init in model.graph.initializer:
            if init.name.endswith("_scale") and init.data_type == onnx.TensorProto.FLOAT:
                arr = onnx.numpy_helper.to_array(init) * 0.5
                init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), init.name))
        onnx.save(model, dst)

    monkeypatch.setattr(oq, "quantize_dynamic", quantize_dynamic)
    monkeypatch.setattr(_onnx, "int8_settings", lambda: (False, "CPU has AVX512_VNNI (faked)"))
    return state


def test_check_falls_back_to_reduce_range_and_says_so(tmp_path, broken_8bit):
    _, x, src = _saturating_model(tmp_path)
    with pytest.warns(RuntimeWarning, match=r"off \(relative L2; bound 5%\).*quantized again with reduce_range=True"):
        r = C.quantize_onnx(src, tmp_path / "q.onnx", calibration_data=x)
    assert r.reduce_range is True and r.rel_error <= BOUND and "after 8-bit weights were" in r.settings


def test_check_fails_loudly(tmp_path, broken_8bit):
    _, x, src = _saturating_model(tmp_path)
    with pytest.raises(RuntimeError, match=r"is 50\.\d% off the float model.*beyond the 5%"):
        C.quantize_onnx(src, tmp_path / "q.onnx", calibration_data=x, reduce_range=False)  # asked for: no fallback
    broken_8bit["always"] = True
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match=r"reduce_range=True"):
        C.quantize_onnx(src, tmp_path / "q.onnx", calibration_data=x)
    # A looser bound accepts it; no bound disables the check.
    assert C.quantize_onnx(src, tmp_path / "q.onnx", calibration_data=x, reduce_range=True,
                           max_rel_error=0.6).rel_error > BOUND
    assert C.quantize_onnx(src, tmp_path / "q.onnx", calibration_data=x, max_rel_error=None).rel_error > BOUND


def test_compare_reports_relative_error_and_warns_for_a_broken_int8_model(tmp_path, broken_8bit):
    _, x, src = _saturating_model(tmp_path)
    broken_8bit["always"] = True
    bad = tmp_path / "bad.onnx"
    C.quantize_onnx(src, bad, calibration_data=x, max_rel_error=None)
    with pytest.warns(RuntimeWarning, match=r"compare: the int8 ONNX model .* is 50\.\d% off"):
        r = C.compare(src, bad, x, repeats=1)
    assert r.rel_error == pytest.approx(0.5, abs=0.02) and "relative 5" in r.table()
    with _no_warnings():
        good = C.compare(src, src, x, repeats=1)
    assert good.rel_error == 0.0
