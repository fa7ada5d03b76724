"""One trial as N rank processes on this machine (``device.processes: N``; docs/distributed.md).

:func:`launch_ranks` starts N trial processes (``python -m sassha_tune.trial``, through
:class:`~sassha_tune.trial.process.TrialProcess`) with the ``torch.distributed`` environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, a free ``MASTER_PORT``), relays rank 0's
messages, and fails the trial (``rank_failed: ...``) as soon as a rank dies.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from .process import TrialProcess

__all__ = ["launch_ranks", "free_port", "describe_exit"]

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
    on_phase: Callable[[str], None] | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
) -> tuple[dict[str, Any] | None, list[dict[str, Any]], str | None]:
    """Run ``job`` (the trial protocol of :mod:`sassha_tune.trial`) as ``processes`` ranks.

    Rank r is a trial process (:class:`~sassha_tune.trial.process.TrialProcess`) with ``RANK=r``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR=127.0.0.1`` and a free ``MASTER_PORT``; each gets
    the job. Rank 0's messages come back (epoch messages go to ``on_epoch``, whose answer is sent
    back when the job prunes; ``phase`` messages go to ``on_phase`` and ``step`` messages to ``on_step``, unanswered; other messages
    are ignored); the other ranks' stdout is discarded. Every rank is watched: when
    one exits with a non-zero code (or rank 0 exits without a result) the others are stopped at once.

    Returns ``(result message of rank 0 or None, epoch messages, failure reason or None)``; a
    ``user_error`` message is returned as the result for the caller to raise.
    """
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
                elif kind == "phase" and on_phase is not None:
                    on_phase(str(msg.get("phase")))
                elif kind == "step" and on_step is not None:
                    on_step(int(msg["epoch"]), int(msg["step"]), int(msg["steps"]))
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
