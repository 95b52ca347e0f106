"""Activation checkpointing (non-reentrant torch.utils.checkpoint) over blocks built from torchfast
modules: the same loss and gradients as without it, and what autograd keeps for a Llama-style block,
counted with saved-tensor hooks (FSDP2 + checkpoint is the "checkpoint" configuration of
tests/train/test_fsdp.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.train.tiny_lm import Block, TinyLM, batches


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _loss_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    loss = model(tokens)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("head", ["fused", "plain"])
def test_checkpointed_blocks_give_the_same_gradients(head):
    """Recomputation in backward runs the same kernels on the same inputs, so the loss and every
    gradient are bit-for-bit those of the plain run (all three block kinds: every torchfast.nn module)."""
    torch.manual_seed(0)
    plain = TinyLM(head=head)
    ckpt = copy.deepcopy(plain)
    for block in ckpt.layers:
        block.checkpointed = True
    tokens = batches(1, 4)[0]
    want_loss, want = _loss_and_grads(plain, tokens)
    got_loss, got = _loss_and_grads(ckpt, tokens)
    assert torch.equal(got_loss, want_loss)
    for name, g in want.items():
        assert g is not None and g.abs().max() > 0, f"{name}: no gradient"
        diff = (got[name] - g).abs().max().item()
        assert torch.equal(got[name], g), f"{name}: checkpointed gradient differs by up to {diff:.2e}"


def _saved_bytes(module, *inputs, params) -> tuple[int, int]:
    """(bytes, count) of the distinct storages autograd saves for backward during module(*inputs),
    parameters left out: what a training step keeps alive per block until its backward."""
    storages: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs)
    return sum(storages.values()), len(storages)


def test_checkpointed_llama_block_keeps_only_its_input():
    """A Llama-style block of torchfast modules (RMSNorm, attention with torchfast Linear projections,
    AddRMSNorm, SwiGLU) keeps, without checkpointing, its input x, the two norms' outputs and rstd,
    q, k, v, the attention output (whose transposed reshape is o_proj's input, the same storage) and
    log-sum-exp, h = x + attention, and SwiGLU's gate and up (the product is recomputed): 8 tensors of
    [B, S, H], 2 of [B, S, I] and small per-row statistics. Checkpointed, it keeps x alone: with
    I = 2H, 12x less."""
    torch.manual_seed(0)
    b, s, h, heads, inter = 4, 64, 256, 4, 512
    block = Block("llama", hidden=h, heads=heads, inter=inter)
    params = {p.data_ptr() for p in block.parameters()}
    x = torch.randn(b, s, h, requires_grad=True)
    f32 = 4
    eager, n_eager = _saved_bytes(block, x, params=params)
    expected = (8 * b * s * h + 2 * b * s * inter + 2 * b * s + b * heads * s) * f32
    assert (eager, n_eager) == (expected, 13), f"eager block saved {eager} bytes in {n_eager} storages"
    block.checkpointed = True
    kept, n_kept = _saved_bytes(block, x, params=params)
    assert (kept, n_kept) == (b * s * h * f32, 1), f"checkpointed: {kept} bytes in {n_kept} storages"
    assert eager / kept > 12


def test_checkpointed_stack_keeps_one_input_per_block():
    """Three checkpointed blocks in a row keep three block inputs, nothing else."""
    torch.manual_seed(0)
    stack = torch.nn.Sequential(*(Block(k) for k in ("llama", "gpt", "gated")))
    for block in stack:
        block.checkpointed = True
    params = {p.data_ptr() for p in stack.parameters()}
    x = torch.randn(2, 8, 32, requires_grad=True)
    assert _saved_bytes(stack, x, params=params) == (3 * x.numel() * 4, 3)
