"""A tiny decoder-only language model built from every torchfast.nn module, shared by the FSDP2 worker
(tests/train/fsdp_script.py) and the activation-checkpointing tests (tests/train/test_checkpoint.py).

Three block kinds so that each module is inside a sharded block:
- "llama": RMSNorm, attention with bias-free torchfast Linear projections, AddRMSNorm, SwiGLU;
- "gpt": LayerNorm, attention with biased projections, Linear(activation="gelu_tanh") + Linear;
- "gated": LayerNorm without bias, GeGLU, and a Swish -> GELU -> Linear side branch.
The head is LinearCrossEntropyLoss (head="fused") or Linear + CrossEntropyLoss (head="plain"). The
vocabulary (67) is odd on purpose: FSDP2 shards dimension 0 over 2 ranks unevenly (34 + 33 rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import torchfast

VOCAB, HIDDEN, HEADS, INTER, SEQ = 67, 32, 4, 64, 8
KINDS = ("llama", "gpt", "gated")


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        # No bias on k_proj even in the biased form (as Whisper): softmax ignores what it adds to a row of
        # scores, so its true gradient is 0 and the computed one is rounding noise, which no relative
        # comparison between two runs can judge (and AdamW's step would blow the noise up to lr).
        self.q_proj, self.v_proj, self.o_proj = (
            torchfast.nn.Linear(hidden, hidden, bias=bias) for _ in range(3)
        )
        self.k_proj = torchfast.nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        # -1 heads: under tensor parallelism (benchmarks/bench_distributed.py) each rank holds a share.
        q, k, v = (p(x).view(b, s, -1, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))


class Block(nn.Module):
    """A pre-norm residual block of one of KINDS. `checkpointed=True` runs it under non-reentrant
    torch.utils.checkpoint: only the block input is kept, the rest is recomputed in backward."""

    def __init__(self, kind: str, hidden: int = HIDDEN, heads: int = HEADS, inter: int = INTER):
        super().__init__()
        self.kind = kind
        self.checkpointed = False
        if kind == "llama":
            self.input_layernorm = torchfast.nn.RMSNorm(hidden, eps=1e-6)
            self.self_attn = Attention(hidden, heads, bias=False)
            self.post_attention_layernorm = torchfast.nn.AddRMSNorm(hidden, eps=1e-6)
            self.mlp = torchfast.nn.SwiGLU(hidden, inter)
        elif kind == "gpt":
            self.ln_1 = torchfast.nn.LayerNorm(hidden)
            self.attn = Attention(hidden, heads, bias=True)
            self.ln_2 = torchfast.nn.LayerNorm(hidden)
            self.mlp = nn.Sequential(torchfast.nn.Linear(hidden, inter, activation="gelu_tanh"),
                                     torchfast.nn.Linear(inter, hidden))
        elif kind == "gated":
            self.norm = torchfast.nn.LayerNorm(hidden, bias=False)
            self.mlp = torchfast.nn.GeGLU(hidden, inter, approximate="tanh")
            self.side = nn.Sequential(torchfast.nn.Swish(), torchfast.nn.GELU(),
                                      torchfast.nn.Linear(hidden, hidden))
        else:
            raise ValueError(f"Block: kind must be one of {KINDS}, got {kind!r}")

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "llama":
            a = self.self_attn(self.input_layernorm(x))
            y, h = self.post_attention_layernorm(a, x)  # h = x + a, y = RMSNorm(h)
            return h + self.mlp(y)
        if self.kind == "gpt":
            h = x + self.attn(self.ln_1(x))
            return h + self.mlp(self.ln_2(h))
        return x + self.mlp(self.norm(x)) + self.side(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointed:
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class TinyLM(nn.Module):
    """forward(tokens [B, S+1]) -> mean next-token loss (a scalar)."""

    def __init__(self, kinds=KINDS, head: str = "fused", vocab: int = VOCAB, hidden: int = HIDDEN):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Block(k, hidden) for k in kinds)
        self.norm = torchfast.nn.RMSNorm(hidden, eps=1e-6)
        self.head = head
        if head == "fused":
            self.lm_loss = torchfast.nn.LinearCrossEntropyLoss(hidden, vocab, chunk_size=5)
        else:
            self.lm_head = torchfast.nn.Linear(hidden, vocab, bias=True)
            self.loss_fn = torchfast.nn.CrossEntropyLoss()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(tokens[:, :-1])
        for layer in self.layers:
            h = layer(h)
        h = self.norm(h)
        target = tokens[:, 1:]
        if self.head == "fused":
            return self.lm_loss(h, target)
        return self.loss_fn(self.lm_head(h), target)


def batches(steps: int, batch: int, seed: int = 0, vocab: int = VOCAB) -> list[torch.Tensor]:
    """`steps` global batches of token rows [batch, SEQ + 1] that count up from a random start (a
    pattern the model can learn, so the loss moves)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (batch, 1), generator=g) + torch.arange(SEQ + 1)) % vocab
            for _ in range(steps)]
