"""torchfast.hooks on torchfast and torch.nn modules: what they record, and that they leave no hook."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import torchfast
from torchfast.hooks import (
    ActivationStats,
    GradientStats,
    NonFiniteDetector,
    NonFiniteError,
    capture,
    count_hooks,
)


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        torchfast.nn.Linear(8, 16, activation="swish"),  # "0"
        torchfast.nn.RMSNorm(16),  # "1"
        nn.ReLU(),  # "2"  (a torch.nn module)
        nn.Linear(16, 4),  # "3"
    )


def test_activation_stats_records_and_removes_its_hooks():
    model = make_model()
    x = torch.randn(32, 8)
    assert count_hooks(model) == 0
    with ActivationStats(model) as acts:
        assert count_hooks(model) == 4
        out = model(x)
    assert count_hooks(model) == 0
    assert list(acts.stats) == ["0", "1", "2", "3"]  # execution order, qualified names
    relu_in = model[1](model[0](x))
    s = acts.stats["2"]
    assert s.shape == (32, 16) and s.dtype == "float32"
    torch.testing.assert_close(s.zero_fraction, (relu_in <= 0).float().mean().item())
    torch.testing.assert_close(s.mean, relu_in.relu().mean().item())
    torch.testing.assert_close(s.max, relu_in.max().item())
    torch.testing.assert_close(acts.stats["3"].std, out.std().item())
    assert acts.stats["3"].nonfinite == 0
    table = acts.summary(file=io.StringIO())
    assert table.splitlines()[0].split()[:3] == ["module", "shape", "dtype"] and len(table.splitlines()) == 5


def test_activation_stats_counts_nonfinite_and_selects_modules():
    model = make_model()
    with ActivationStats(model, modules=["0"]) as acts:
        x = torch.randn(4, 8)
        x[0, 0] = float("nan")
        model(x)
    s = acts.stats["0"]
    assert list(acts.stats) == ["0"] and s.nonfinite == 16  # the NaN input spreads to one row
    assert s.mean == s.mean  # statistics are over the finite values: not NaN
    with pytest.raises(ValueError, match=r"ActivationStats: no submodule named \['nope'\]"):
        ActivationStats(model, modules=["nope"])


def test_activation_stats_log_writes_tensorboard(tmp_path):
    pytest.importorskip("tensorboard", reason="the train extra (tensorboard) is part of the test extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from torchfast.trainer import summary_writer

    model = make_model()
    with ActivationStats(model) as acts:
        model(torch.randn(16, 8))
    writer = summary_writer(tmp_path)
    acts.log(writer, step=7)
    writer.close()
    ev = EventAccumulator(str(tmp_path))
    ev.Reload()
    assert "activations/1/std" in ev.Tags()["scalars"] and "activations/3" in ev.Tags()["histograms"]
    (event,) = ev.Scalars("activations/1/std")
    assert event.step == 7 and event.value == pytest.approx(acts.stats["1"].std, rel=1e-6)


def test_gradient_stats_uses_full_backward_and_post_accumulate_hooks():
    model = make_model()
    x, y = torch.randn(8, 8), torch.randn(8, 4)
    with GradientStats(model) as grads:
        n_hooks = count_hooks(model)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
    # one full backward hook per leaf module, one post-accumulate hook per parameter
    assert n_hooks == 4 + len(list(model.parameters()))
    assert count_hooks(model) == 0
    assert set(grads.param_norms) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        assert grads.param_norms[name] == pytest.approx(p.grad.norm().item(), rel=1e-6)
    out_norm, in_norm = grads.module_grads["3"]
    # d loss / d output of the head: 2 (out - y) / numel
    expected = (2 * (model(x) - y) / y.numel()).norm().item()
    assert out_norm == pytest.approx(expected, rel=1e-5) and in_norm > 0


def test_nonfinite_detector_names_the_first_module_forward():
    model = make_model()
    with torch.no_grad():
        model[1].weight[3] = float("inf")  # RMSNorm's weight: its output is the first non-finite one
    with NonFiniteDetector(model) as det:
        det.step = 12
        with pytest.raises(NonFiniteError, match=r"forward output of module '1' at step 12") as err:
            model(torch.randn(4, 8))
    assert err.value.module == "1" and err.value.phase == "forward" and err.value.step == 12
    assert count_hooks(model) == 0


def test_nonfinite_detector_backward():
    model = make_model()

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    class Poison(nn.Module):
        def forward(self, x):
            return NanGrad.apply(x)

    model.insert(2, Poison())  # "2": finite forward, NaN gradient in backward
    with NonFiniteDetector(model):
        out = model(torch.randn(4, 8))
        with pytest.raises(NonFiniteError, match=r"backward input gradient of module '2'"):
            out.sum().backward()
    assert count_hooks(model) == 0


def test_capture_returns_named_activations():
    model = make_model()
    x = torch.randn(4, 8)
    with capture(model, ["0", "3"]) as acts:
        out = model(x)
    assert set(acts) == {"0", "3"} and count_hooks(model) == 0
    torch.testing.assert_close(acts["3"], out.detach())
    torch.testing.assert_close(
        acts["0"], torchfast.bias_act(x @ model[0].weight.T, model[0].bias, act="swish")
    )
    assert not acts["0"].requires_grad
    with pytest.raises(ValueError, match="capture: no submodule named"):
        capture(model, ["4"])


def test_hooks_removed_after_an_exception():
    model = make_model()
    with pytest.raises(RuntimeError), ActivationStats(model), GradientStats(model):
        model(torch.randn(4, 3))  # wrong width
    assert count_hooks(model) == 0
