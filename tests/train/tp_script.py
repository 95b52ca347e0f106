"""Run under `torchrun --standalone --nproc_per_node=2 tests/train/tp_script.py OUT SECTION[,SECTION...]`.

DTensor / tensor-parallel checks of torchfast over a 2-process CPU mesh (Gloo). Rank 0 writes
OUT/results.json with what each section measured; tests/train/test_tp.py launches this once and judges
the numbers. Not a test module.

Sections:
  rules   every sharding rule of every torchfast op (torchfast/_dtensor.py), forward and backward: the
          inputs are laid out as the rule says (Shard, Replicate, Partial split into random parts), the
          op runs through DTensor, and per rule it records the collectives the call issued (must be 0),
          the output placements DTensor chose against those the rule promised, and the largest error of
          each gathered output against the op on the whole tensors (float64)
  plans   tensor-parallel plans over models of torchfast modules and over the same models written with
          plain PyTorch modules: outputs and every gathered gradient against the unsharded model, and the
          collectives of forward + backward of both, per kind (CommDebugMode)
  errors  bad input: a vocabulary-sharded loss, a plan that does not divide the shapes, a module that
          cannot be sharded (the messages, raised on both ranks before any collective)
  docs    the example of docs/distributed.md's tensor-parallel section
  fsdp-tp the same with FSDP2 on the other dimension of a 1 x 2 mesh (FSDP + TP)
  compile-aot, compile   the same with the model under torch.compile (aot_eager; inductor)
"""

from __future__ import annotations

import copy
import json
import re
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torchfast
from torchfast import _dtensor
from torchfast.ops.rope import rope_cache

torch.set_num_threads(1)
out = Path(sys.argv[1])
sections = sys.argv[2].split(",")
world = torchfast.distributed.init(expected_world_size=2)
rank = world.rank
mesh = init_device_mesh("cpu", (2,))
F64 = torch.float64


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        return float("inf")
    if want.numel() == 0:
        return 0.0
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def comms(mode: CommDebugMode) -> dict[str, int]:
    return {str(k).split(".")[-1]: v for k, v in mode.get_comm_counts().items() if v}


# ---- rules: every rule of every op ----------------------------------------------------------------------

def op_cases() -> list[tuple[str, str, tuple, dict]]:
    """(case name, op name, global args, kwargs): float64, small, seeded (the same on both ranks)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)
    ops = torch.ops.torchfast
    x, gy = r(4, 6, 8), r(4, 6, 8)
    w, b = r(8) * 0.5 + 1, r(8)
    packed = r(4, 6, 16)
    cases = [
        ("swish", "swish", (x,), {}),
        ("swish_backward", "swish_backward", (gy, x), {}),
        ("swiglu", "swiglu", (x, r(4, 6, 8)), {}),
        ("swiglu_backward", "swiglu_backward", (gy, x, r(4, 6, 8)), {}),
        ("geglu-tanh", "geglu", (x, r(4, 6, 8)), {"approximate": "tanh"}),
        ("geglu_backward", "geglu_backward", (gy, x, r(4, 6, 8)), {"approximate": "none"}),
        ("swiglu_packed", "swiglu_packed", (packed,), {}),
        ("swiglu_packed_backward", "swiglu_packed_backward", (gy, packed), {}),
        ("geglu_packed", "geglu_packed", (packed,), {"approximate": "tanh"}),
        ("geglu_packed_backward", "geglu_packed_backward", (gy, packed), {"approximate": "tanh"}),
        ("bias_act-gelu", "bias_act", (x, b), {"act": "gelu"}),
        ("bias_act-nobias", "bias_act", (x, None), {"act": "relu"}),
        ("bias_act_backward", "bias_act_backward", (gy, x, b), {"act": "swish"}),
        ("bias_act_backward-nobias", "bias_act_backward", (gy, x, None), {"act": "gelu_tanh"}),
    ]
    _, rstd = ops.rms_norm(x, w, 1e-6)
    h = r(4, 6, 8)
    _, _, hrstd = ops.add_rms_norm(x, h, w, 1e-6)
    hsum = x + h
    _, mean, lrstd = ops.layer_norm(x, w, b, 1e-5)
    cases += [
        ("rms_norm", "rms_norm", (x, w, 1e-6), {}),
        ("rms_norm-noweight", "rms_norm", (x, None, 1e-6), {}),
        ("rms_norm_backward", "rms_norm_backward", (gy, x, w, rstd), {}),
        ("rms_norm_backward-noweight", "rms_norm_backward", (gy, x, None, rstd), {}),
        ("add_rms_norm", "add_rms_norm", (x, h, w, 1e-6), {}),
        ("add_rms_norm_backward", "add_rms_norm_backward", (gy, r(4, 6, 8), hsum, w, hrstd), {}),
        ("add_rms_norm_backward-nogradh", "add_rms_norm_backward", (gy, None, hsum, w, hrstd), {}),
        ("layer_norm", "layer_norm", (x, w, b, 1e-5), {}),
        ("layer_norm-nobias", "layer_norm", (x, w, None, 1e-5), {}),
        ("layer_norm_backward", "layer_norm_backward", (gy, x, w, b, mean, lrstd), {}),
        ("layer_norm_backward-noaffine", "layer_norm_backward", (gy, x, None, None, mean, lrstd), {}),
    ]
    # rope: [B, H, T, D] with GQA (4 query heads, 2 key heads) and per-batch cos [B, T, D]; [B, T, H, D]
    # with partial rotary (R = 4 of 8) and cos [T, R] broadcast over the batch.
    q, k, cos, sin = r(2, 4, 6, 8), r(2, 2, 6, 8), r(2, 6, 8), r(2, 6, 8)
    q2, k2, cos2, sin2 = r(2, 6, 4, 8), r(2, 6, 2, 8), r(6, 4), r(6, 4)
    cases += [
        ("rope-bhtd", "rope", (q, k, cos, sin), {"unsqueeze_dim": 1}),
        ("rope_backward-bhtd", "rope_backward", (q, k, cos, sin), {"unsqueeze_dim": 1}),
        ("rope-bthd-partial", "rope", (q2, k2, cos2, sin2), {"unsqueeze_dim": 1, "interleaved": True}),
        ("rope_backward-bthd-partial", "rope_backward", (q2, k2, cos2, sin2), {"unsqueeze_dim": 1}),
    ]
    logits, target = r(2, 6, 10), torch.randint(0, 10, (2, 6), generator=g)
    target[0, 1] = -100
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3}
    _, lse = ops.cross_entropy(logits, target, **opts)
    hid, wv, bv = r(2, 6, 8), r(10, 8), r(10)
    _, llse, *_ = ops.linear_cross_entropy(hid, wv, target, bv, reduction="none", **opts)
    cases += [
        ("cross_entropy", "cross_entropy", (logits, target), opts),
        ("cross_entropy_backward", "cross_entropy_backward", (r(2, 6), logits, target, lse), opts),
        ("linear_cross_entropy-none", "linear_cross_entropy", (hid, wv, target, bv),
         {**opts, "reduction": "none", "chunk_size": 5}),
        ("linear_cross_entropy-sum", "linear_cross_entropy", (hid, wv, target, bv),
         {**opts, "reduction": "sum", "chunk_size": 5, "grad_mask": 7}),
        ("linear_cross_entropy-sum-nobias", "linear_cross_entropy", (hid, wv, target, None),
         {**opts, "reduction": "sum", "grad_mask": 3}),
        ("linear_cross_entropy_backward", "linear_cross_entropy_backward",
         (r(2, 6), hid, wv, target, bv, llse), {**opts, "chunk_size": 5, "grad_mask": 7}),
        ("linear_cross_entropy_backward-hidden-only", "linear_cross_entropy_backward",
         (r(2, 6), hid, wv, target, None, llse), {**opts, "grad_mask": 1}),
    ]
    return cases


# A 2-D mesh of 1 x 2 (data parallel x tensor parallel, as FSDP + TP lay it out): the rules are given
# for one mesh dimension and DTensor expands them over both; the first is Replicate here.
# One case per rule family is checked there too (all of them would add ~10 s to the default suite).
mesh2 = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "tp"))
ON_2D = {"swiglu_backward", "swiglu_packed_backward", "bias_act_backward", "rms_norm_backward",
         "add_rms_norm_backward", "layer_norm_backward", "rope_backward-bhtd", "cross_entropy_backward",
         "linear_cross_entropy-sum", "linear_cross_entropy_backward"}


def lay_out(t: torch.Tensor, placement, on=None) -> DTensor:
    """t as a DTensor on the 1-D mesh (or `on`, the 1 x 2 mesh, Replicate on its first dimension):
    Partial as two random parts that add up to t."""
    m = mesh if on is None else on
    placements = [placement] if on is None else [Replicate(), placement]
    if isinstance(placement, Partial):
        noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(7), dtype=t.dtype)
        local = t * 0.25 + noise if rank == 0 else t * 0.75 - noise
        return DTensor.from_local(local, m, placements, run_check=False)
    return distribute_tensor(t, m, placements)


def run_rules() -> dict:
    res = {"cases": {}}
    for case, name, args, kwargs in op_cases():
        op = getattr(torch.ops.torchfast, name).default
        want = op(*args, **kwargs)
        want = want if isinstance(want, tuple) else (want,)
        specs = [distribute_tensor(a, mesh, [Replicate()])._spec if isinstance(a, torch.Tensor) else a
                 for a in args]
        rules = _dtensor._RULES[name][0](*specs, **kwargs)
        per_rule = []
        for (outs, ins), on in [(r, None) for r in rules] + [(r, mesh2) for r in rules if case in ON_2D]:
            dargs = [lay_out(a, p, on) if p is not None else a for a, p in zip(args, ins)]
            with CommDebugMode() as mode:
                got = op(*dargs, **kwargs)
            got = got if isinstance(got, tuple) else (got,)
            placements = [None if o is None else str(o.placements[-1]) for o in got]
            if on is not None:  # the dp dimension must stay Replicate
                placements = [p if o is None or o.placements[0] == Replicate() else f"dp {o.placements}"
                              for p, o in zip(placements, got)]
            errs = [0.0 if o is None and wnt is None else rel_err(full(o), wnt) for o, wnt in zip(got, want)]
            per_rule.append({"op": name, "mesh": "1x2" if on is not None else "2",
                             "ins": [str(p) for p in ins],
                             "promised": [None if p is None else str(p) for p in outs],
                             "placements": placements, "comms": comms(mode), "err": max(errs)})
        res["cases"][case] = per_rule
    # Positive control of the comparison: rms_norm run on shards of the normalized (last) dimension, a
    # layout no rule offers, is wrong (each rank normalizes half a row), and the same check must say so.
    x, w = {c[0]: c for c in op_cases()}["rms_norm"][2][:2]
    shard = distribute_tensor(x, mesh, [Shard(2)]).to_local()
    y = torch.ops.torchfast.rms_norm(shard, w.chunk(2)[rank], 1e-6)[0]
    wrong = DTensor.from_local(y, mesh, [Shard(2)], run_check=False).full_tensor()
    res["control-last-dim"] = rel_err(wrong, torch.ops.torchfast.rms_norm(x, w, 1e-6)[0])
    return res



# ---- plans: tensor-parallel models of torchfast modules against plain PyTorch ----------------------------

from torch import nn
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)

from torchfast.distributed import SequenceParallel

VOCAB, HIDDEN, HEADS, INTER, SEQ, BATCH = 48, 32, 4, 64, 8, 2
HEAD_DIM = HIDDEN // HEADS


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class PlainSwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Causal attention with rotary embedding; heads sharded once q/k/v are Colwise-sharded DTensors."""

    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(HIDDEN, HIDDEN, bias=False)
                                                              for _ in range(4))

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, -1, HEAD_DIM).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        if isinstance(q, DTensor):  # the rotary tables: the same on every rank
            cos, sin = (DTensor.from_local(t, q.device_mesh, [Replicate()], run_check=False)
                        for t in (cos, sin))
        if self.fused:
            q, k = torchfast.rope(q, k, cos, sin)
        else:
            c, sn = cos.unsqueeze(1), sin.unsqueeze(1)
            q, k = q * c + rotate_half(q) * sn, k * c + rotate_half(k) * sn
        if isinstance(q, DTensor):
            # torch 2.13 has no DTensor rule for CPU attention (_scaled_dot_product_flash_attention_for_cpu);
            # each rank attends over its own heads, which is what a rule would do (both models alike).
            y = nn.functional.scaled_dot_product_attention(q.to_local(), k.to_local(), v.to_local(),
                                                           is_causal=True)
            y = DTensor.from_local(y, q.device_mesh, q.placements, run_check=False)
        else:
            y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))


class LlamaBlock(nn.Module):
    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused
        self.input_layernorm = (torchfast.nn.RMSNorm(HIDDEN, eps=1e-6) if fused
                                else nn.RMSNorm(HIDDEN, eps=1e-6))
        self.self_attn = Attention(fused)
        self.post_attention_layernorm = (torchfast.nn.AddRMSNorm(HIDDEN, eps=1e-6) if fused
                                         else nn.RMSNorm(HIDDEN, eps=1e-6))
        self.mlp = torchfast.nn.SwiGLU(HIDDEN, INTER) if fused else PlainSwiGLU()

    def forward(self, x, cos, sin):
        a = self.self_attn(self.input_layernorm(x), cos, sin)
        if self.fused:
            y, h = self.post_attention_layernorm(a, x)
        else:
            h = x + a
            y = self.post_attention_layernorm(h)
        return h + self.mlp(y)


class GptBlock(nn.Module):
    """LayerNorm and a biased GELU MLP: torchfast.nn.Linear(activation=...) (bias_act on the Colwise
    shard) against nn.Linear + nn.GELU."""

    def __init__(self, fused: bool):
        super().__init__()
        self.ln = torchfast.nn.LayerNorm(HIDDEN) if fused else nn.LayerNorm(HIDDEN)
        self.fc = (torchfast.nn.Linear(HIDDEN, INTER, activation="gelu_tanh") if fused
                   else nn.Linear(HIDDEN, INTER))
        self.act = nn.Identity() if fused else nn.GELU(approximate="tanh")
        self.proj = nn.Linear(INTER, HIDDEN)

    def forward(self, x, cos, sin):
        return x + self.proj(self.act(self.fc(self.ln(x))))


class TPModel(nn.Module):
    """forward(tokens [B, S + 1]) -> mean next-token loss; fused=True: torchfast modules."""

    def __init__(self, fused: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList([LlamaBlock(fused), GptBlock(fused)])
        self.norm = torchfast.nn.LayerNorm(HIDDEN) if fused else nn.LayerNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.loss_fn = torchfast.nn.CrossEntropyLoss() if fused else None

    def forward(self, tokens):
        cos, sin = rope_cache(torch.arange(SEQ)[None], HEAD_DIM, dtype=torch.float64)
        h = self.embed_tokens(tokens[:, :-1])
        for layer in self.layers:
            h = layer(h, cos, sin)
        logits = self.lm_head(self.norm(h))
        target = tokens[:, 1:].clone()
        target[0, :3] = -100  # padding, all in rank 0's tokens: the mean counts the valid ones of all ranks
        if isinstance(logits, DTensor) and not isinstance(target, DTensor):
            target = distribute_tensor(target, logits.device_mesh, logits.placements)
        if self.loss_fn is not None:
            return self.loss_fn(logits, target)
        return nn.functional.cross_entropy(logits.transpose(1, 2), target)


def tp_plan(model: TPModel) -> dict:
    """Sequence parallel norms on a token-sharded (Shard(1)) residual stream, Colwise q/k/v and MLP up
    projections (heads / intermediate sharded), Rowwise output projections back to Shard(1); DTensors
    throughout (use_local_output=False), so every torchfast op sees DTensors."""
    seq, rep = Shard(1), Replicate()
    col = ColwiseParallel(use_local_output=False)
    row = RowwiseParallel(output_layouts=seq, use_local_output=False)
    plan = {
        "embed_tokens": RowwiseParallel(input_layouts=rep, output_layouts=seq, use_local_output=False),
        "norm": SequenceParallel(),
        "lm_head": SequenceParallel(),  # replicated weight on the token-sharded hidden states
        "layers.0.input_layernorm": SequenceParallel(),
        "layers.0.self_attn": PrepareModuleInput(input_layouts=(seq, None, None),
                                                 desired_input_layouts=(rep, None, None),
                                                 use_local_output=False),
        "layers.0.post_attention_layernorm": SequenceParallel(),
        "layers.0.mlp": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(rep,),
                                           use_local_output=False),
        "layers.1.ln": SequenceParallel(),
        "layers.1.fc": ColwiseParallel(input_layouts=seq, use_local_output=False),
        "layers.1.proj": row,
    }
    for name in ("q_proj", "k_proj", "v_proj"):
        plan[f"layers.0.self_attn.{name}"] = col
    plan["layers.0.self_attn.o_proj"] = row
    plan["layers.0.mlp.gate_proj"] = col
    plan["layers.0.mlp.up_proj"] = col
    plan["layers.0.mlp.down_proj"] = row
    return plan


def run_plans() -> dict:
    torch.manual_seed(0)
    tokens = (torch.randint(0, VOCAB, (BATCH, 1)) + torch.arange(SEQ + 1)) % VOCAB
    res = {}
    for fused in (True, False):
        torch.manual_seed(1)
        model = TPModel(fused).double()
        ref = copy.deepcopy(model)
        loss_ref = ref(tokens)
        loss_ref.backward()
        parallelize_module(model, mesh, tp_plan(model))
        with CommDebugMode() as fwd:
            loss = model(tokens)
        with CommDebugMode() as bwd:
            loss.backward()
        want = dict(ref.named_parameters())
        grads = {n: rel_err(full(p.grad), want[n].grad) for n, p in model.named_parameters()}
        res["fused" if fused else "plain"] = {
            "loss_err": rel_err(full(loss), loss_ref), "grad_err": grads,
            "fwd": comms(fwd), "bwd": comms(bwd),
            "grad_placements": {n: str(p.grad.placements) for n, p in model.named_parameters()},
        }
    res["linear_cross_entropy"] = run_linear_cross_entropy(tokens)
    return res


def run_linear_cross_entropy(tokens) -> dict:
    """torchfast.linear_cross_entropy (mean, with padding on rank 0's tokens) of token-sharded hidden
    states and a replicated classifier, against the unsharded call: loss, gradients, collectives."""
    torch.manual_seed(2)
    hidden, weight = torch.randn(BATCH, SEQ, HIDDEN, dtype=F64), torch.randn(VOCAB, HIDDEN, dtype=F64)
    target = tokens[:, 1:].clone()
    target[0, :3] = -100
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_ref = torchfast.linear_cross_entropy(h, w, target, chunk_size=5)
    loss_ref.backward()
    dh = distribute_tensor(hidden, mesh, [Shard(1)]).requires_grad_()
    dw = distribute_tensor(weight, mesh, [Replicate()]).requires_grad_()
    dt = distribute_tensor(target, mesh, [Shard(1)])
    with CommDebugMode() as fwd:
        loss = torchfast.linear_cross_entropy(dh, dw, dt, chunk_size=5)
    with CommDebugMode() as bwd:
        loss.backward()
    return {"loss_err": rel_err(full(loss), loss_ref), "grad_err": {
        "hidden": rel_err(full(dh.grad), h.grad), "weight": rel_err(full(dw.grad), w.grad)},
        "fwd": comms(fwd), "bwd": comms(bwd),
        "placements": [str(dh.grad.placements), str(dw.grad.placements)]}


# ---- errors: bad input refused by name, on both ranks, before a collective -----------------------------

def expect_error(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (the message is what the test judges)
        return f"{type(e).__name__}: {e}"
    return "no error"


def run_errors() -> dict:
    from torchfast.distributed import parallelize

    m = {}
    logits = distribute_tensor(torch.randn(2, 8, 10, dtype=F64), mesh, [Shard(2)])
    target = distribute_tensor(torch.randint(0, 10, (2, 8)), mesh, [Replicate()])
    m["vocab-logits"] = expect_error(lambda: torchfast.cross_entropy(logits, target))
    hidden = distribute_tensor(torch.randn(2, 8, 4, dtype=F64), mesh, [Shard(1)])
    weight = distribute_tensor(torch.randn(10, 4, dtype=F64), mesh, [Shard(0)])
    m["vocab-weight"] = expect_error(lambda: torchfast.linear_cross_entropy(
        hidden, weight, distribute_tensor(torch.randint(0, 10, (2, 8)), mesh, [Shard(1)])))
    col = ColwiseParallel(use_local_output=False)
    model = TPModel(True)
    model.layers[0].mlp.gate_proj = nn.Linear(HIDDEN, 63, bias=False)
    m["not-divisible"] = expect_error(lambda: parallelize(model, mesh, {"layers.0.mlp.gate_proj": col}))
    m["not-shardable"] = expect_error(lambda: parallelize(TPModel(True), mesh, {"layers.*.mlp": col}))
    m["no-such-module"] = expect_error(lambda: parallelize(TPModel(True), mesh, {"layers.0.ffn": col}))
    ddp = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 4)))
    m["ddp"] = expect_error(lambda: parallelize(nn.Sequential(ddp), mesh, {"0.module.0": col}))
    done = TPModel(True)
    parallelize(done, mesh, {"layers.0.mlp.gate_proj": col})
    m["twice"] = expect_error(lambda: parallelize(done, mesh, {"layers.0.mlp.up_proj": col}))
    from torch.distributed.fsdp import fully_shard

    fsdp = TPModel(True)
    fully_shard(fsdp.layers[0], mesh=mesh)
    m["fsdp"] = expect_error(lambda: parallelize(fsdp, mesh, {"layers.1.fc": col}))
    # Why torchfast has its own SequenceParallel: torch's passes AddRMSNorm only its first input.
    from torch.distributed.tensor.parallel import SequenceParallel as TorchSequenceParallel

    norm = parallelize_module(torchfast.nn.AddRMSNorm(HIDDEN), mesh, TorchSequenceParallel())
    x = torch.randn(BATCH, SEQ // 2, HIDDEN)
    m["torch-sequence-parallel"] = expect_error(lambda: norm(x, x))
    return {"messages": m}


FSDP_AFTER_TP = """mesh2d = init_device_mesh("cpu", (1, dist.get_world_size()), mesh_dim_names=("dp", "tp"))
mesh = mesh2d["tp"]
"""
FULLY_SHARD = """from torch.distributed.fsdp import fully_shard

for layer in model.layers:
    fully_shard(layer, mesh=mesh2d["dp"])
fully_shard(model, mesh=mesh2d["dp"])
sharded_by_fsdp = len(model.layers[0].mlp.gate_proj.weight.placements) == 2
batch = torch.randint"""


def run_docs(backend: str | None = None, fsdp: bool = False) -> dict:
    """The python block of docs/distributed.md's tensor-parallel section, on these 2 processes (the docs
    test runs it as a world of 1); it asserts its own results (loss and gradients equal the unsharded
    model's). `backend`: the model's forward runs through torch.compile with it. `fsdp`: tensor
    parallel on the "tp" dimension of a 1 x 2 mesh, then FSDP2 (fully_shard per block and the root)
    on its "dp" dimension, the 2-D layout of FSDP + TP (with one data-parallel rank). The block's final
    cleanup() is left out: the process group serves the sections after it."""
    text = (ROOT / "docs" / "distributed.md").read_text()
    section = text[text.index("## Tensor parallel"):text.index("## Activation checkpointing")]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    edits = [("torchfast.distributed.cleanup()\n", "")]
    if backend is not None:
        edits.append(("loss = model(batch)", f"loss = torch.compile(model, backend={backend!r})(batch)"))
    if fsdp:
        edits += [('mesh = init_device_mesh("cpu", (dist.get_world_size(),))\n', FSDP_AFTER_TP),
                  ("batch = torch.randint", FULLY_SHARD)]
    for old, new in edits:
        assert old in code, f"docs/distributed.md: the tensor-parallel example no longer has {old!r}"
        code = code.replace(old, new)
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    namespace = {"__name__": "__main__"}
    exec(compile(code, "docs/distributed.md (tensor parallel)", "exec"), namespace)  # noqa: S102  (docs code)
    return {"mesh_size": namespace["mesh"].size(), "fsdp": namespace.get("sharded_by_fsdp", False),
            "graph_breaks": dict(torch._dynamo.utils.counters["graph_break"]),
            "frames": torch._dynamo.utils.counters["stats"]["unique_graphs"]}


SECTIONS = {"rules": run_rules, "plans": run_plans, "errors": run_errors, "docs": run_docs,
            "fsdp-tp": lambda: run_docs(fsdp=True),
            "compile-aot": lambda: run_docs("aot_eager"), "compile": lambda: run_docs("inductor")}

results = {}
for section in sections:
    try:
        results[section] = {"status": "ok", **SECTIONS[section]()}
    except Exception as e:  # noqa: BLE001  (recorded, so the test shows which section failed and why)
        results[section] = {"status": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    dist.barrier()
if rank == 0:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("TP-OK")
torchfast.distributed.cleanup()
