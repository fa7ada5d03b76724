"""Data parallelism on ``torch.distributed``: process-group helpers and the coalesced all-reduces
the optimizers use (the launcher that runs one trial as N rank processes is
:mod:`sassha_tune.trial.ranks`).

* :func:`active_group` — the group to synchronize over, or ``None`` when there is nothing to do
  (``torch.distributed`` unavailable or not initialized, or world size 1). The optimizers call
  collectives only when it is not ``None``, so a single process runs exactly as before.
* :func:`all_reduce_mean` — average a list of tensors across ranks with one ``all_reduce`` per
  (device, dtype) bucket on a flat buffer.
* :func:`setup` — used by the trainer: join the process group described by the environment
  (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, as torchrun or
  :func:`sassha_tune.trial.ranks.launch_ranks` set them) with gloo on CPU and nccl on CUDA and a
  collective timeout (:func:`timeout`).

See ``docs/distributed.md``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

TIMEOUT_ENV = "SASSHA_TUNE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


def timeout() -> timedelta:
    """Collective timeout: ``$SASSHA_TUNE_DIST_TIMEOUT`` seconds, default 600.

    A backstop only: the launcher notices a dead rank within a fraction of a second and gloo
    reports a closed peer at once; the timeout bounds what neither catches (e.g. a hung GPU).
    """
    return timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))


def launched_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when absent): > 1 inside torchrun or
    :func:`~sassha_tune.trial.ranks.launch_ranks`."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def active_group(process_group: Any = None) -> Any:
    """The process group to average over, or ``None`` when running as one process.

    ``process_group=None`` means the default group. Returns ``None`` unless
    ``torch.distributed`` is available and initialized and the group has more than one rank.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_world_size(group) <= 1:
        return None
    return group


def all_reduce_mean(tensors: Sequence[Any], group: Any = None) -> None:
    """Average ``tensors`` in place across the ranks of ``group`` (the default group when ``None``).

    Tensors are bucketed by (device, dtype); each bucket is flattened into one buffer, all-reduced
    with SUM once and divided by the world size, then copied back. A no-op on a single process.
    """
    _all_reduce(tensors, group, mean=True)


def all_reduce_sum(tensors: Sequence[Any], group: Any = None) -> None:
    """Sum ``tensors`` in place across the ranks of ``group``, bucketed like :func:`all_reduce_mean`."""
    _all_reduce(tensors, group, mean=False)


def _all_reduce(tensors: Sequence[Any], group: Any, *, mean: bool) -> None:
    import torch
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    group = active_group(group)
    if group is None or not tensors:
        return
    world = dist.get_world_size(group)
    buckets: dict[tuple[Any, Any], list[Any]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    for bucket in buckets.values():
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        if mean:
            flat.div_(world)
        torch._foreach_copy_(bucket, list(_unflatten_dense_tensors(flat, bucket)))


def any_true(flag: bool, group: Any = None) -> bool:
    """``flag`` OR-ed over all ranks (one tiny all-reduce); ``flag`` itself on a single process."""
    import torch
    import torch.distributed as dist

    group = active_group(group)
    if group is None:
        return flag
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item() > 0)


def broadcast_object(obj: Any, group: Any = None, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled); ``obj`` itself on a single process."""
    import torch.distributed as dist

    group = active_group(group)
    if group is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def broadcast_module(module: Any, group: Any = None, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (one coalesced broadcast)."""
    import torch.distributed as dist

    group = active_group(group)
    if group is None:
        return
    tensors = [t.data for t in list(module.parameters()) + list(module.buffers())]
    if tensors:
        dist._broadcast_coalesced(group, tensors, 256 * 1024 * 1024, src)


class Ranks:
    """Where this process stands: ``rank``, ``world_size``, ``local_rank``, the ``group`` (or None)
    and whether :func:`setup` created the group (then :meth:`close` destroys it)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, group: Any = None, owned: bool = False):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.group, self.owned = group, owned

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owned = False


def setup(processes: int, device: Any) -> tuple[Ranks, Any]:
    """Join (or reuse) the process group for a training run; returns (ranks, device of this rank).

    An already initialized default group (your own script) is reused as is. Otherwise, when the
    environment describes several ranks (torchrun, or :func:`~sassha_tune.trial.ranks.launch_ranks`),
    the default group is initialized with ``env://``, gloo on CPU or nccl on CUDA and
    :func:`timeout`; a CUDA device becomes ``cuda:LOCAL_RANK``. ``processes > 1`` without such an environment is a user error.
    """
    import torch
    import torch.distributed as dist

    from .errors import UserError

    owned = False
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    else:
        world = launched_world_size()
        if world > 1:
            if not dist.is_available():
                raise UserError("device.processes > 1 needs torch.distributed, which this torch build lacks")
            if device.type == "cuda":
                local = int(os.environ.get("LOCAL_RANK", "0"))
                if local >= torch.cuda.device_count():
                    raise UserError(
                        f"device.processes: {world} ranks on this machine but only {torch.cuda.device_count()} "
                        "CUDA device(s) visible (one GPU per rank)"
                    )
                torch.cuda.set_device(local)
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method="env://", timeout=timeout())
            owned = True
    if processes > 1 and world != processes:
        if world == 1:
            raise UserError(
                f"device.processes: {processes} needs {processes} ranks: run through sassha-tune (which starts "
                f"them) or torchrun --nproc-per-node {processes}"
            )
        raise UserError(f"device.processes: {processes} but the launcher started {world} ranks")
    if world <= 1:
        return Ranks(), device
    rank = dist.get_rank()
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        device = torch.device("cuda", local)
    return Ranks(rank, world, local, active_group(), owned), device
