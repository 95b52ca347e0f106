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
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torchfast  # noqa: E402
from torchfast import _dtensor  # noqa: E402

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
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
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


def lay_out(t: torch.Tensor, placement) -> DTensor:
    """t as a DTensor on the 1-D mesh: Partial as two random parts that add up to t."""
    if isinstance(placement, Partial):
        noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(7), dtype=t.dtype)
        local = t * 0.25 + noise if rank == 0 else t * 0.75 - noise
        return DTensor.from_local(local, mesh, [placement], run_check=False)
    return distribute_tensor(t, mesh, [placement])


def run_rules() -> dict:
    res = {}
    for case, name, args, kwargs in op_cases():
        op = getattr(torch.ops.torchfast, name).default
        want = op(*args, **kwargs)
        want = want if isinstance(want, tuple) else (want,)
        specs = [distribute_tensor(a, mesh, [Replicate()])._spec if isinstance(a, torch.Tensor) else a
                 for a in args]
        rules = _dtensor._RULES[name][0](*specs, **kwargs)
        per_rule = []
        for outs, ins in rules:
            dargs = [lay_out(a, p) if p is not None else a for a, p in zip(args, ins)]
            with CommDebugMode() as mode:
                got = op(*dargs, **kwargs)
            got = got if isinstance(got, tuple) else (got,)
            placements = [None if o is None else str(o.placements[0]) for o in got]
            errs = [0.0 if o is None and wnt is None else rel_err(full(o), wnt) for o, wnt in zip(got, want)]
            per_rule.append({"ins": [str(p) for p in ins], "promised": [str(p) for p in outs],
                             "placements": placements, "comms": comms(mode), "err": max(errs)})
        res[case] = per_rule
    return res


SECTIONS = {"rules": run_rules}

results = {}
for section in sections:
    try:
        results[section] = {"status": "ok", **SECTIONS[section]()}
    except Exception as e:  # recorded, so the test shows which section failed and why
        results[section] = {"status": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    dist.barrier()
if rank == 0:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("TP-OK")
torchfast.distributed.cleanup()
