"""Data-parallel training launched by `torchrun`, and a world of size 1 without it.

    world = torchfast.distributed.init()             # reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
    model = torchfast.distributed.wrap(model)        # DistributedDataParallel when world_size > 1
    loader = torchfast.distributed.data_loader(dataset, batch_size=32, shuffle=True)
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)              # a new shuffle each epoch, the same on every rank
        ...
    torchfast.distributed.print_main("done")         # rank 0 only
    torchfast.distributed.cleanup()

Launch with `torchrun --standalone --nproc_per_node=N script.py`. CPU processes talk over Gloo,
GPU processes over NCCL, one GPU per process (LOCAL_RANK). `nn.DataParallel` is not offered: it runs
one process with a thread per GPU, scatters inputs and gathers outputs through GPU 0 every step and
is held back by the GIL; DDP runs one process per device and all-reduces gradients while backward
is still running, and PyTorch itself recommends it instead.
"""

from __future__ import annotations

import atexit
import builtins
import gc
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among `world_size` processes, its rank on this node
    (`local_rank`), the device it computes on and the backend ("gloo", "nccl"; None for a world of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_world: World | None = None


def _env_int(name: str) -> int:
    text = os.environ[name]
    try:
        return int(text)
    except ValueError:
        raise RuntimeError(
            f"torchfast.distributed.init: environment variable {name}={text!r} is not an "
            "integer; launch with torchrun, which sets it"
        ) from None


def _read_env(expected_world_size: int | None) -> tuple[int, int, int] | None:
    present = [k for k in _ENV if k in os.environ]
    if not present:
        return None
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"torchfast.distributed.init: {', '.join(present)} set but {', '.join(missing)} "
            "missing; launch with torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK"
        )
    rank, world_size, local_rank = (_env_int(k) for k in _ENV)
    if world_size < 1 or not 0 <= rank < world_size:
        raise RuntimeError(f"torchfast.distributed.init: RANK={rank} is not in [0, WORLD_SIZE={world_size})")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if not 0 <= local_rank < local_world:
        raise RuntimeError(
            f"torchfast.distributed.init: LOCAL_RANK={local_rank} is not in "
            f"[0, LOCAL_WORLD_SIZE={local_world})"
        )
    if expected_world_size is not None and world_size != expected_world_size:
        raise RuntimeError(
            f"torchfast.distributed.init: torchrun started WORLD_SIZE={world_size} processes "
            f"but world_size={expected_world_size} was expected; launch with "
            f"--nnodes x --nproc_per_node = {expected_world_size}"
        )
    return rank, world_size, local_rank


def init(
    backend: str | None = None,
    *,
    device: str | torch.device | None = None,
    expected_world_size: int | None = None,
) -> World:
    """Join the process group that `torchrun` describes in the environment, once per process.

    Without torchrun's variables this is a world of size 1 and nothing is initialised. The backend
    is NCCL when the processes compute on CUDA (each binds GPU LOCAL_RANK), Gloo on CPU; `device`
    ("cpu"/"cuda") overrides the choice of device, `backend` the backend. Raises RuntimeError when the
    environment is inconsistent (a partial set of variables, RANK outside WORLD_SIZE) or when
    `expected_world_size` is given and differs from WORLD_SIZE. Calling it again returns the same World.
    """
    global _world
    if _world is not None:
        if expected_world_size is not None and _world.world_size != expected_world_size:
            raise RuntimeError(
                f"torchfast.distributed.init: the world has {_world.world_size} processes "
                f"but world_size={expected_world_size} was expected"
            )
        return _world
    env = _read_env(expected_world_size)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if env is None:
        if expected_world_size not in (None, 1):
            raise RuntimeError(
                f"torchfast.distributed.init: world_size={expected_world_size} was expected, "
                "but this process was not launched by torchrun (no RANK/WORLD_SIZE set)"
            )
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        _world = World(device=dev)
        return _world
    rank, world_size, local_rank = env
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"torchfast.distributed.init: LOCAL_RANK={local_rank} but only "
                f"{torch.cuda.device_count()} GPUs are visible; use --nproc_per_node <= that"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(
            backend=backend, init_method="env://", rank=rank, world_size=world_size, **kwargs
        )
    elif dist.get_world_size() != world_size:
        raise RuntimeError(
            f"torchfast.distributed.init: the existing process group has "
            f"{dist.get_world_size()} processes but WORLD_SIZE={world_size}"
        )
    _world = World(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend)
    _register_exit_cleanup()
    return _world


def world() -> World:
    """The current World (init() first; before it, a world of size 1 on CPU is reported)."""
    return _world if _world is not None else World()


def is_main() -> bool:
    """True on rank 0 (and in a world of size 1): the process that prints, logs and saves."""
    return world().rank == 0


def barrier() -> None:
    """Wait for every rank (a no-op in a world of size 1)."""
    if world().distributed:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor | float) -> torch.Tensor:
    """The mean of `value` over all ranks, as a new tensor (the input is left unchanged). A float is
    turned into a float64 tensor on the world's device; a world of size 1 returns a copy."""
    w = world()
    t = (
        value.detach().clone()
        if isinstance(value, torch.Tensor)
        else torch.tensor(float(value), dtype=torch.float64, device=w.device)
    )
    if w.distributed:
        # NCCL reduces only GPU tensors, Gloo only CPU ones: move to the world's device and back.
        moved = t.to(w.device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        t = (moved / w.world_size).to(t.device)
    return t


def wrap(model: nn.Module, **ddp_kwargs: Any) -> nn.Module:
    """`model` moved to this process's device and, when world_size > 1, wrapped in
    DistributedDataParallel (gradients averaged over ranks during backward). A world of size 1 gets
    the model back unwrapped. Use `model.no_sync()` (or torchfast.amp.Stepper, which does) for all but
    the last micro-batch of an accumulated step."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"torchfast.distributed.wrap: model must be an nn.Module, got {type(model).__name__}")
    sharded = _first_sharded(model)
    if sharded is not None:
        raise ValueError(
            f"torchfast.distributed.wrap: module {sharded!r} of the model is already sharded with FSDP2 "
            "(fully_shard); DDP and FSDP cannot be mixed: both reduce the gradients. Train the sharded "
            "model without DDP (torchfast.Trainer(..., strategy='fsdp') takes it as it is; see "
            "docs/distributed.md)"
        )
    w = world()
    model = model.to(w.device)
    if not w.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [w.device.index] if w.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **ddp_kwargs)


def _first_sharded(model: nn.Module) -> str | None:
    """The qualified name of the first module of `model` that fully_shard was applied to, or None.
    Without torch.distributed.fsdp imported no module can be one: wrap() then costs no import."""
    if "torch.distributed.fsdp" not in sys.modules:
        return None
    from torch.distributed.fsdp import FSDPModule

    return _first(model, FSDPModule)


def _first(model: nn.Module, cls: type) -> str | None:
    """The qualified name of the first module of `model` (itself: "<root>") that is a `cls`, or None."""
    for name, m in model.named_modules():
        if isinstance(m, cls):
            return name or "<root>"
    return None


def _select_blocks(model: nn.Module, blocks: Any) -> list[tuple[str, nn.Module]]:
    if blocks is None:  # the layers of a transformer: the children of every nn.ModuleList
        return [(f"{n}.{i}" if n else str(i), c) for n, m in model.named_modules()
                if isinstance(m, nn.ModuleList) for i, c in enumerate(m)]
    if isinstance(blocks, type) or (isinstance(blocks, tuple) and all(isinstance(b, type) for b in blocks)):
        chosen = [(n, m) for n, m in model.named_modules() if n and isinstance(m, blocks)]
    elif callable(blocks):
        chosen = [(n, m) for n, m in model.named_modules() if n and blocks(n, m)]
    else:
        raise TypeError(
            "torchfast.distributed.shard: argument 'blocks' must be None (the children of every "
            "nn.ModuleList), a module class or tuple of classes, or a function (name, module) -> bool; "
            f"got {type(blocks).__name__}"
        )
    if not chosen:
        raise ValueError(f"torchfast.distributed.shard: blocks={blocks!r} matched no submodule of the model")
    return chosen


def _check_shardable(model: nn.Module, chosen: list[tuple[str, nn.Module]]) -> None:
    """Everything fully_shard would refuse late, or get wrong without a word, refused here by name,
    before any collective runs (a rank that raises in the middle of a collective leaves the others
    waiting)."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = _first(model, DistributedDataParallel)
    if ddp is not None:
        raise ValueError(
            f"torchfast.distributed.shard: module {ddp!r} of the model is a DistributedDataParallel; DDP "
            "and FSDP cannot be mixed (both reduce the gradients): shard the plain module "
            "(torchfast.distributed.unwrap gives it)"
        )
    done = _first_sharded(model)
    if done is not None:
        raise ValueError(
            f"torchfast.distributed.shard: module {done!r} of the model is already sharded (fully_shard "
            "was applied); shard a model once"
        )
    owner: dict[int, tuple[str, str]] = {}  # parameter -> (its group: a block or "<root>", its name)
    groups = {n for n, _ in chosen}
    for mod_name, m in model.named_modules():
        for p_name, p in m.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p.dim() == 0:
                raise ValueError(
                    f"torchfast.distributed.shard: parameter {full!r} is a scalar (0 dimensions); FSDP2 "
                    "shards dimension 0 of every parameter: make it a 1-D tensor of one element"
                )
    for p_name, p in model.named_parameters(remove_duplicate=False):
        parts = p_name.split(".")
        group = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)
                      if ".".join(parts[:i]) in groups), "<root>")
        first_group, first_name = owner.setdefault(id(p), (group, p_name))
        if first_group != group:
            raise ValueError(
                f"torchfast.distributed.shard: parameter {p_name!r} (group {group!r}) is the same tensor "
                f"as {first_name!r} (group {first_group!r}); FSDP2 gives each parameter to one group: "
                "leave the modules that share it out of `blocks` (the root's group then holds it)"
            )


def shard(
    model: nn.Module,
    *,
    blocks: Any = None,
    mesh: Any = None,
    reshard_after_forward: bool = True,
    mp_policy: Any = None,
    offload: bool = False,
) -> nn.Module:
    """`model` sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`) over the world's processes:
    each block its own group (all-gathered just before it runs, freed after), then the root holding
    the rest (embeddings, final norm, head); fully_shard moves the parameters to the mesh's device.
    Returns the same module, now an FSDPModule; its parameters are DTensors sharded on dimension 0
    (uneven sizes are padded, as fully_shard does). Gradients are averaged over the ranks in backward;
    build the optimizer after this call. Each rank keeps its slice of its own weights (nothing is
    broadcast): build the model from the same seed or checkpoint everywhere.

    blocks: None (the children of every nn.ModuleList: a transformer's layers; a model without one is
        a single group), a module class or tuple of classes, or a function (qualified name, module) ->
        bool.
    mesh: a DeviceMesh; default one dimension over all processes on the world's device type.
    reshard_after_forward: free each block's gathered parameters after its forward (True: least
        memory, gathered again in backward) or keep them until backward (False: one all-gather less).
    mp_policy: a torch.distributed.fsdp.MixedPrecisionPolicy, e.g. bfloat16 parameters for compute and
        float32 gradient reduction.
    offload: keep the sharded parameters, gradients and optimizer state in CPU memory
        (CPUOffloadPolicy; memory is pinned when computing on CUDA).

    A world of size 1 gets the model back moved to its device, not sharded (the same checks run).
    Raises ValueError, naming the module or parameter, before any collective when the model holds a
    DistributedDataParallel or is already sharded, a parameter is a scalar, a parameter is shared
    between two blocks (or a block and the root), or `blocks` matches nothing; TypeError for a `blocks`
    of another kind.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"torchfast.distributed.shard: model must be an nn.Module, got {type(model).__name__}"
        )
    w = world()
    chosen = _select_blocks(model, blocks)
    _check_shardable(model, chosen)
    if not w.distributed:
        return model.to(w.device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if mesh is None:
        mesh = init_device_mesh(w.device.type, (w.world_size,))
    kwargs = {
        "mesh": mesh,
        "reshard_after_forward": reshard_after_forward,
        "mp_policy": mp_policy if mp_policy is not None else MixedPrecisionPolicy(),
        # pinned memory needs CUDA; on a CPU mesh the shards already live in CPU memory
        "offload_policy": (CPUOffloadPolicy(pin_memory=w.device.type == "cuda") if offload
                           else OffloadPolicy()),
    }
    chosen_ids = {id(m) for _, m in chosen}
    # Bottom-up, as fully_shard requires: reversed pre-order puts every block after the blocks in it.
    for _, m in reversed(list(model.named_modules())):
        if id(m) in chosen_ids:
            fully_shard(m, **kwargs)
    fully_shard(model, **kwargs)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP and/or torch.compile wrapper (what to save and to export)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def default_num_workers() -> int:
    """Data-loading workers per process: the CPUs this process may use, shared among the processes of
    this node, minus one for the training process itself; at most 8, at least 0."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(0, min(8, cpus // max(1, local) - 1))


def data_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = True,
    *,
    drop_last: bool = False,
    num_workers: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> DataLoader:
    """A DataLoader that gives each rank its own shard of `dataset`, through a DistributedSampler.

    `batch_size` is per process (the global batch is batch_size x world_size). The sampler is used
    in a world of size 1 as well, so shuffling is the same function of (seed, epoch) everywhere: call
    `loader.sampler.set_epoch(epoch)` at the start of each epoch (the Trainer does) for a new order.
    `num_workers` defaults to default_num_workers(); workers persist across epochs; memory is pinned
    when training on CUDA. Extra keyword arguments go to DataLoader.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"torchfast.distributed.data_loader: batch_size must be a positive int, " f"got {batch_size!r}"
        )
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            "torchfast.distributed.data_loader: dataset must be a map-style Dataset with a "
            f"length; got {type(dataset).__name__}"
        ) from None
    if n == 0:
        raise ValueError("torchfast.distributed.data_loader: the dataset is empty")
    w = world()
    sampler = DistributedSampler(
        dataset, num_replicas=w.world_size, rank=w.rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    workers = default_num_workers() if num_workers is None else num_workers
    kwargs.setdefault("pin_memory", w.device.type == "cuda")
    kwargs.setdefault("persistent_workers", workers > 0)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last, **kwargs
    )


def print_main(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only."""
    if is_main():
        builtins.print(*args, **kwargs)


_exit_cleanup_registered = False


def _exit_cleanup() -> None:
    """At interpreter exit, while it is still whole: leave the process group and collect the garbage
    that still references it (a DDP wrapper kept alive by a reference cycle holds the process group).
    Otherwise the Gloo process group is destroyed during interpreter finalization, where its worker
    threads' pending work can no longer release its tensors, and the process aborts ("terminate
    called without an active exception"; seen in about 1 of 10 torchrun runs of the tests here)."""
    cleanup()
    gc.collect()


def _register_exit_cleanup() -> None:
    global _exit_cleanup_registered
    if not _exit_cleanup_registered:
        atexit.register(_exit_cleanup)
        _exit_cleanup_registered = True


def cleanup() -> None:
    """Leave the process group (if one was joined) and forget the World; safe to call twice."""
    global _world
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # DDP wrappers that are already garbage let go of the group first
        dist.destroy_process_group()
    _world = None


# ---- tensor parallelism (torchfast/_tp.py, imported on first use) -------------------------------------

_TP_NAMES = ("SequenceParallel", "parallelize")


def __getattr__(name: str) -> Any:
    # torch.distributed.tensor.parallel costs about a second to import: only when asked for.
    if name in _TP_NAMES:
        from torchfast import _tp

        return getattr(_tp, name)
    raise AttributeError(f"module 'torchfast.distributed' has no attribute {name!r}")
