"""Model definitions written the way people write them, without torchfast: a Llama-style pre-norm
decoder block, a GPT-2-style block, a BERT-style encoder layer and a small CNN. Shared by the tests
and benchmarks/bench_optimize.py (which imports this file by path)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# -- Llama style ------------------------------------------------------------------------------------


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaAttention(nn.Module):
    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (
            p(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, hidden_size=32, num_heads=4, intermediate_size=64, eps=1e-6):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(hidden_size, eps=eps)
        self.self_attn = LlamaAttention(hidden_size, num_heads)
        self.post_attention_layernorm = LlamaRMSNorm(hidden_size, eps=eps)
        self.mlp = LlamaMLP(hidden_size, intermediate_size)

    def forward(self, hidden_states):
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states))
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LlamaStack(nn.Module):
    def __init__(self, layers=2, hidden_size=32, num_heads=4, intermediate_size=64):
        super().__init__()
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(hidden_size, num_heads, intermediate_size) for _ in range(layers)
        )
        self.norm = LlamaRMSNorm(hidden_size)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


# -- GPT-2 style --------------------------------------------------------------------------------------


class NewGELUActivation(nn.Module):
    """GELU, tanh approximation, written out (as in the original GPT-2 code)."""

    def forward(self, input):
        return (
            0.5
            * input
            * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (input + 0.044715 * torch.pow(input, 3.0))))
        )


class GPT2MLP(nn.Module):
    def __init__(self, n_embd, inner):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, inner)
        self.c_proj = nn.Linear(inner, n_embd)
        self.act = NewGELUActivation()
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPT2Attention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (t.view(b, s, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, s, d))


class GPT2Block(nn.Module):
    def __init__(self, n_embd=32, n_head=4):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5)
        self.attn = GPT2Attention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5)
        self.mlp = GPT2MLP(n_embd, 4 * n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Stack(nn.Module):
    def __init__(self, layers=2, n_embd=32, n_head=4):
        super().__init__()
        self.h = nn.ModuleList(GPT2Block(n_embd, n_head) for _ in range(layers))
        self.ln_f = nn.LayerNorm(n_embd)

    def forward(self, x):
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


# -- BERT style ---------------------------------------------------------------------------------------


class BertLayer(nn.Module):
    """Post-norm encoder layer; the feed-forward is an nn.Sequential(Linear, GELU, Linear)."""

    def __init__(self, hidden=32, heads=4, inter=64):
        super().__init__()
        self.attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.attention_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, inter), nn.GELU(), nn.Linear(inter, hidden), nn.Dropout(0.1)
        )
        self.output_norm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x):
        x = self.attention_norm(x + self.attention(x, x, x, need_weights=False)[0])
        return self.output_norm(x + self.ffn(x))


# -- CNN ----------------------------------------------------------------------------------------------


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class SmallCNN(nn.Module):
    def __init__(self, channels=8, classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            Swish(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(channels, 32), Swish(), nn.Linear(32, classes))

    def forward(self, x):
        return self.head(self.features(x))
