"""Data parallelism on ``torch.distributed``: process-group helpers, the coalesced all-reduce the
optimizers use, and the launcher that runs one trial as N rank processes.

* :func:`active_group` — the group to synchronize over, or ``None`` when there is nothing to do
  (``torch.distributed`` unavailable or not initialized, or world size 1). The optimizers call
  collectives only when it is not ``None``, so a single process runs exactly as before.
* :func:`all_reduce_mean` — average a list of tensors across ranks with one ``all_reduce`` per
  (device, dtype) bucket on a flat buffer.
* :func:`setup` — used by the trainer: join the process group described by the environment
  (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, as torchrun or :func:`launch_ranks`
  set them) with gloo on CPU and nccl on CUDA and a collective timeout (:func:`timeout`).
* :func:`launch_ranks` — start N trial processes (``python -m sassha_tune.trial``, through
  :class:`sassha_tune.trial.process.TrialProcess`) with those variables, relay rank 0's messages,
  and fail the trial (``rank_failed: ...``) as soon as a rank dies.

See ``docs/distributed.md``.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
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
    """``WORLD_SIZE`` from the environment (1 when absent): > 1 inside torchrun or :func:`launch_ranks`."""
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
    environment describes several ranks (torchrun, or :func:`launch_ranks`), the default group is
    initialized with ``env://``, gloo on CPU or nccl on CUDA and :func:`timeout`; a CUDA device
    becomes ``cuda:LOCAL_RANK``. ``processes > 1`` without such an environment is a user error.
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


# --------------------------------------------------------------------------------------------
# The launcher: one trial as N rank processes on this machine
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def describe_exit(rank: int, rc: int) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"rank_failed: rank {rank} killed by {name}"
    return f"rank_failed: rank {rank} exited with code {rc}"


def launch_ranks(
    job: dict[str, Any],
    processes: int,
    on_epoch: Callable[[int, dict], bool] | None = None,
    *,
    poll: float = 0.1,
) -> tuple[dict[str, Any] | None, list[dict[str, Any]], str | None]:
    """Run ``job`` (the trial protocol of :mod:`sassha_tune.trial`) as ``processes`` ranks.

    Rank r is a trial process (:class:`~sassha_tune.trial.process.TrialProcess`) with ``RANK=r``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR=127.0.0.1`` and a free ``MASTER_PORT``; each gets
    the job. Rank 0's messages come back (epoch messages go to ``on_epoch``, whose answer is sent
    back when the job prunes); the other ranks' stdout is discarded. Every rank is watched: when
    one exits with a non-zero code (or rank 0 exits without a result) the others are stopped at once.

    Returns ``(result message of rank 0 or None, epoch messages, failure reason or None)``; a
    ``user_error`` message is returned as the result for the caller to raise.
    """
    # imported here: the trainer imports this module and needs none of the trial side
    from .trial.process import TrialProcess

    port = free_port()
    procs: list[TrialProcess] = []
    base = dict(os.environ)
    base.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(processes),
        LOCAL_WORLD_SIZE=str(processes),
    )
    if "OMP_NUM_THREADS" not in base:
        base["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    messages: queue.Queue = queue.Queue()
    try:
        for r in range(processes):
            procs.append(TrialProcess(job, env=dict(base, RANK=str(r), LOCAL_RANK=str(r)), listen=r == 0))

        def read(proc: TrialProcess) -> None:
            for msg in proc.messages():
                messages.put(msg)
            messages.put(None)

        threading.Thread(target=read, args=(procs[0],), daemon=True).start()
        result: dict[str, Any] | None = None
        epochs: list[dict[str, Any]] = []
        failure: str | None = None
        eof = False
        while not eof and failure is None:
            try:
                msg = messages.get(timeout=poll)
            except queue.Empty:
                msg = False
            if msg is None:
                eof = True
            elif msg:
                kind = msg.get("type")
                if kind == "epoch":
                    epochs.append(msg)
                    stop = bool(on_epoch(int(msg["epoch"]), dict(msg.get("metrics") or {}))) if on_epoch else False
                    procs[0].answer(stop)
                elif kind in ("result", "user_error"):
                    result = msg
            for r, p in enumerate(procs[1:], start=1):
                rc = p.poll()
                if rc is not None and rc != 0:
                    failure = describe_exit(r, rc)
                    break
        if failure is None:
            rc0 = procs[0].wait()
            dead = [(r, p.poll()) for r, p in enumerate(procs[1:], start=1)]
            dead = [(r, rc) for r, rc in dead if rc not in (None, 0)]
            rank0_error = result is None or str(result.get("failure_reason") or "").startswith("error")
            if dead and rank0_error:
                failure = describe_exit(*dead[0])
            elif result is None:
                failure = describe_exit(0, rc0)
            else:
                # rank 0 is done; the others finish on their own (they have left the last collective)
                for p in procs[1:]:
                    try:
                        p.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        continue
        return result, epochs, failure
    finally:
        for p in procs:
            p.terminate()
        deadline = time.monotonic() + 5
        for p in procs:
            p.close(timeout=max(0.1, deadline - time.monotonic()))
