"""Tensor parallelism over torchfast modules: a SequenceParallel style for modules with several tensor
inputs, and `parallelize`, which checks a plan against the model before torch applies it.

Imported on first use (torchfast.distributed reaches it lazily): torch.distributed.tensor.parallel
costs about a second to import. The DTensor sharding rules of the ops are in torchfast/_dtensor.py.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import SequenceParallel as _TorchSequenceParallel


class SequenceParallel(_TorchSequenceParallel):
    """torch's SequenceParallel (parameters replicated, inputs sharded on `sequence_dim`, outputs left
    as DTensors unless `use_local_output=True`), for modules with several tensor inputs too.

    torch's style converts only the first input and drops the others, so `torchfast.nn.AddRMSNorm`'s
    `forward(x, residual)` would lose `residual`. Here every tensor input is laid out alike: a plain
    tensor is taken as this rank's shard of the sequence, a DTensor is redistributed to it if needed.
    The weight gradients of the norms under this style come out Partial (each rank's sum over its
    tokens), as they do for torch.nn's norms, and are reduced when used.
    """

    @staticmethod
    def _prepare_input_fn(sequence_sharding, mod, inputs, device_mesh):
        one = _TorchSequenceParallel._prepare_input_fn
        return tuple(one(sequence_sharding, mod, (t,), device_mesh) if isinstance(t, torch.Tensor) else t
                     for t in inputs)


def _styles():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return ColwiseParallel, RowwiseParallel


def _matches(plan_key: str, module_name: str) -> bool:
    """Whether a plan key ("layers.*.mlp.gate_proj") names the module, atom by atom as torch matches."""
    import fnmatch

    keys, names = plan_key.split("."), module_name.split(".") if module_name else []
    return len(keys) == len(names) and all(fnmatch.fnmatchcase(n, k) for n, k in zip(names, keys))


def _check_module(key: str, name: str, module: nn.Module, style, size: int) -> None:
    Colwise, Rowwise = _styles()
    if not isinstance(style, (Colwise, Rowwise)):
        return  # SequenceParallel and the Prepare* styles take any module
    kind = type(style).__name__
    if not isinstance(module, (nn.Linear, nn.Embedding)):
        linears = [n for n, m in module.named_modules() if n and isinstance(m, (nn.Linear, nn.Embedding))]
        names = ", ".join(repr(f"{name}.{n}") for n in linears[:4])
        hint = f"; plan its projections instead ({names})" if linears else ""
        raise TypeError(
            f"torchfast.distributed.parallelize: module '{name}' ({type(module).__name__}, plan key {key!r}) "
            f"cannot be sharded by {kind}: it shards the weight of an nn.Linear or nn.Embedding{hint}")
    colwise = isinstance(style, Colwise)
    if isinstance(module, nn.Linear):
        dim, what, n = ((0, "out_features", module.out_features) if colwise
                        else (1, "in_features", module.in_features))
    else:
        dim, what, n = (1, "embedding_dim", module.embedding_dim) if colwise else (0, "num_embeddings",
                                                                                    module.num_embeddings)
    if n % size:
        raise ValueError(
            f"torchfast.distributed.parallelize: module '{name}' ({type(module).__name__}, plan key "
            f"{key!r}): {kind} shards dimension {dim} of its weight ({what}={n}) over the {size} ranks of "
            f"the mesh, and {n} is not divisible by {size}; pick a mesh size that divides it or pad the "
            "layer")


def parallelize(model: nn.Module, mesh, plan: dict) -> nn.Module:
    """`torch.distributed.tensor.parallel.parallelize_module(model, mesh, plan)` after checking, on every
    rank and before any collective, that the plan fits the model:

    - the model holds no DistributedDataParallel and no FSDP-sharded module, and no DTensor parameter
      (tensor parallelism is applied first; FSDP may shard the result afterwards on another mesh dim);
    - every plan key names at least one module (keys may use torch's `*` wildcards per name);
    - ColwiseParallel / RowwiseParallel name nn.Linear or nn.Embedding modules (torchfast.nn.Linear is
      one), whose sharded dimension (Colwise: out_features / embedding_dim; Rowwise: in_features /
      num_embeddings) the mesh size divides.

    Each failure is a ValueError (TypeError for a module of the wrong kind) naming the module, the plan
    key and the dimension. `mesh` is a 1-D
    DeviceMesh (or the tensor-parallel dimension of a larger one). Returns the model, parallelized in
    place. torchfast ops on the resulting DTensors run through their sharding rules.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    if not isinstance(plan, dict) or not plan:
        raise TypeError("torchfast.distributed.parallelize: argument 'plan' must be a non-empty dict of "
                        f"module name -> ParallelStyle, got {type(plan).__name__}")
    if mesh.ndim != 1:
        raise ValueError(f"torchfast.distributed.parallelize: argument 'mesh' has {mesh.ndim} dimensions; "
                         "pass the 1-D tensor-parallel mesh (mesh['tp'] of a 2-D mesh)")
    _check_not_wrapped(model)
    size = mesh.size()
    named = list(model.named_modules())
    for key, style in plan.items():
        hits = [(n, m) for n, m in named if _matches(key, n)]
        if not hits:
            raise ValueError(f"torchfast.distributed.parallelize: plan key {key!r} names no module of the "
                             f"model ({type(model).__name__})")
        for name, module in hits:
            _check_module(key, name, module, style, size)
    return parallelize_module(model, mesh, plan)


def _check_not_wrapped(model: nn.Module) -> None:
    from torch.nn.parallel import DistributedDataParallel

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        FSDPModule = ()
    why = None
    for name, m in model.named_modules():
        where = f"module '{name or '<root>'}'"
        if isinstance(m, DistributedDataParallel):
            why = (f"{where} is a DistributedDataParallel; apply tensor parallelism to the bare model (DDP "
                   "does not take DTensor parameters)")
        elif isinstance(m, FSDPModule):
            why = (f"{where} ({type(m).__name__}) is already sharded by FSDP; apply tensor parallelism "
                   "first, then fully_shard over the other mesh dimension")
        if why:
            break
    for pname, p in model.named_parameters():
        if why is None and isinstance(p, DTensor):
            why = (f"parameter '{pname}' is already a DTensor (placements {list(p.placements)}); the model "
                   "was parallelized or sharded before")
    if why:
        raise ValueError(f"torchfast.distributed.parallelize: {why}")
