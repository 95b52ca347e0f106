"""torchfast.amp: the per-device policy and the training step's order of operations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchfast
from torchfast import amp


def test_policy_per_device(monkeypatch):
    cpu = amp.policy("cpu")
    assert (cpu.dtype, cpu.use_scaler, cpu.mode) == (torch.bfloat16, False, "bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert amp.policy("cuda").dtype == torch.bfloat16 and not amp.policy("cuda").use_scaler
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    old = amp.policy("cuda")
    assert (old.dtype, old.use_scaler) == (torch.float16, True)
    assert amp.policy("cpu", "fp16").use_scaler and amp.policy("cpu", "fp16").make_scaler().is_enabled()
    off = amp.policy("cpu", "off")
    assert off.dtype is None and not off.make_scaler().is_enabled()
    with off.autocast():
        assert not torch.is_autocast_enabled("cpu")
    with cpu.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_unknown_mode():
    with pytest.raises(
        ValueError, match=r"torchfast.amp.policy: unknown amp mode 'fp8'.*'bf16', 'fp16', 'off'"
    ):
        amp.policy("cpu", "fp8")


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchfast.nn.Linear(16, 8, activation="swish")


def _sum_loss(factor: float = 1.0):
    return lambda out, target: (out.float() * target).sum() * factor


def test_unscale_before_clip_fp16():
    """With fp16 the loss is scaled by 65536; clipping must see the unscaled gradient, so an SGD(lr=1)
    step moves the weights by exactly grad_clip. Clipping the scaled gradient would move them by
    grad_clip / 65536."""
    model = _linear()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    stepper = amp.Stepper(model, opt, amp="fp16", device="cpu", grad_clip=0.01)
    assert stepper.scale == 65536.0
    batch = (torch.randn(32, 16), torch.randn(32, 8))
    # A small loss factor keeps the scaled fp16 gradients finite (the first scale is 65536).
    result = stepper.step([batch], _sum_loss(1e-3))
    assert not result.skipped and result.grad_norm > 0.03  # the true norm is well above the clip
    moved = torch.linalg.vector_norm(
        torch.stack([(p - b).norm() for p, b in zip(model.parameters(), before)])
    )
    assert moved.item() == pytest.approx(0.01, rel=1e-3)
    # The reported norm is the unscaled one: compare with the fp32-autocast-free gradient norm.
    ref = _linear()
    _sum_loss(1e-3)(ref(batch[0]), batch[1]).backward()
    ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]).item()
    assert result.grad_norm == pytest.approx(ref_norm, rel=2e-2)  # fp16 forward vs fp32
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none=True)


def test_fp16_overflow_skips_the_step_and_counts_it():
    model = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stepper = amp.Stepper(model, opt, amp="fp16", device="cpu")
    batch = (torch.randn(4, 16), torch.randn(4, 8))
    before = [p.detach().clone() for p in model.parameters()]
    # 1e4 x scale 65536 overflows the fp16 gradient of the matmul: inf gradients, step skipped.
    result = stepper.step([batch], _sum_loss(1e4))
    assert result.skipped and not torch.isfinite(torch.tensor(result.grad_norm))
    assert stepper.skipped_steps == 1 and result.scale == 32768.0  # the scaler backed off
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b), "a skipped step must leave the weights unchanged"
    result = stepper.step([batch], _sum_loss(1e-3))
    assert not result.skipped and stepper.skipped_steps == 1 and stepper.steps == 2
    assert not torch.equal(model.weight, before[0])


@pytest.mark.parametrize("mode", ["bf16", "off"])
def test_nonfinite_gradient_without_scaler_is_skipped(mode):
    model = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stepper = amp.Stepper(model, opt, amp=mode, device="cpu")
    before = model.weight.detach().clone()
    nan_loss = lambda out, target: (out.float() * target).sum() * float("nan")  # noqa: E731
    result = stepper.step([(torch.randn(4, 16), torch.randn(4, 8))], nan_loss)
    assert result.skipped and stepper.skipped_steps == 1
    assert torch.equal(model.weight, before) and torch.isfinite(model.weight).all()


def test_autocast_covers_forward_only_in_bf16():
    """The model runs in bf16 under the step's autocast; the float32 parameters stay float32."""
    model = _linear()
    seen = []
    model.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    stepper = amp.Stepper(model, torch.optim.SGD(model.parameters(), lr=0.1), amp="bf16", device="cpu")
    stepper.step([(torch.randn(4, 16), torch.randn(4, 8))], _sum_loss())
    assert seen == [torch.bfloat16] and model.weight.dtype == torch.float32


def test_bad_input():
    model = _linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="grad_clip must be a positive number"):
        amp.Stepper(model, opt, grad_clip=-1.0)
    stepper = amp.Stepper(model, opt, device="cpu")
    with pytest.raises(ValueError, match="micro_batches is empty"):
        stepper.step([], _sum_loss())
    with pytest.raises(TypeError, match=r"a batch must be a tuple or list \(input, ..., target\)"):
        stepper.step([torch.randn(4, 16)], _sum_loss())
