"""Probing: does a candidate replacement compute what the original module computes?

Both run on the same random inputs (several shapes, several dtypes, fixed seed), forward and backward;
outputs, input gradients and parameter gradients (matched by name, which also proves the state_dict
keys agree) must match within torchfast._optimize._compare's bound. Copies are probed, so the model,
its parameters' `.grad` and the global random state are left as they were.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from torchfast._optimize._compare import GRAD_SCALE, LOW, compare, float_tensors, ref_dtype, run_fwd_bwd

PROBE_SEED = 20240607


def _copy(module: nn.Module, *dtypes: torch.dtype) -> nn.Module:
    m = copy.deepcopy(module)
    for d in dtypes:
        m = m.to(dtype=d)
    return m.eval()


def probe(
    original: nn.Module,
    candidate: nn.Module,
    shapes: Sequence[tuple[int, ...]],
    dtypes: Sequence[torch.dtype],
    device: torch.device,
) -> str | None:
    """None when `candidate` matches `original` on every probe, else the first difference, in words."""
    names_o = {n for n, _ in original.named_parameters()}
    names_c = {n for n, _ in candidate.named_parameters()}
    if names_o != names_c or set(original.state_dict()) != set(candidate.state_dict()):
        keys_o, keys_c = sorted(original.state_dict()), sorted(candidate.state_dict())
        return f"state_dict keys differ: {keys_o} vs {keys_c}"
    gen = torch.Generator().manual_seed(PROBE_SEED)
    for dtype in dtypes:
        rd = ref_dtype(dtype)
        try:
            ref = _copy(original, dtype, rd)  # through `dtype` first: the same rounded weights
            cand = _copy(candidate, dtype)
            base = _copy(original, dtype) if dtype in LOW else None
        except Exception as e:  # noqa: BLE001 (a module that cannot be copied is not probed)
            return f"could not copy the module for probing ({type(e).__name__}: {e})"
        for shape in shapes:
            why = _probe_one(ref, cand, base, shape, dtype, device, gen)
            if why:
                return f"{why} [probe {dtype_name(dtype)} {list(shape)}]"
    return None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _probe_one(ref, cand, base, shape, dtype, device, gen) -> str | None:
    rd = ref_dtype(dtype)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    try:
        with torch.no_grad():
            out_shapes = [o.shape for o in float_tensors(ref(x.to(rd)))]
        grads = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in out_shapes]
        out_r, gin_r, gp_r = run_fwd_bwd(ref, (x.to(rd),), grads)
        out_b, gin_b, gp_b = run_fwd_bwd(base, (x,), grads) if base is not None else (None,) * 3
        out_c, gin_c, gp_c = run_fwd_bwd(cand, (x,), grads)
    except Exception as e:  # noqa: BLE001 (the original or candidate cannot run this probe: no match)
        return f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if len(out_c) != len(out_r):
        return f"{len(out_c)} outputs vs the original's {len(out_r)}"
    for i, (c, r) in enumerate(zip(out_c, out_r)):
        want = out_b[i].dtype if out_b is not None else r.dtype
        if c.dtype != want:
            return f"output {i} is {dtype_name(c.dtype)}, the original's {dtype_name(want)}"
        bad = compare(c, r, dtype, f"output {i}", baseline=None if out_b is None else out_b[i])
        if bad:
            return str(bad)
    checks = [
        (
            "input gradient",
            gin_c[0] if gin_c else None,
            gin_r[0] if gin_r else None,
            gin_b[0] if gin_b else None,
        )
    ]
    checks += [
        (f"gradient of {n}", gp_c.get(n), g, None if gp_b is None else gp_b.get(n)) for n, g in gp_r.items()
    ]
    for what, c, r, b in checks:
        if (c is None) != (r is None):
            return f"{what}: present in only one of the two"
        if c is not None:
            bad = compare(c, r, dtype, what, scale=GRAD_SCALE, baseline=b)
            if bad:
                return str(bad)
    return None
