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
from contextlib import suppress
from dataclasses import dataclass, field
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
    env = _rank_env(processes)
    procs: list[TrialProcess] = []
    try:
        for r in range(processes):
            procs.append(TrialProcess(job, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), listen=r == 0))
        rank0 = _Rank0(procs[0], on_epoch, on_phase, on_step)
        failure = rank0.relay(procs[1:], poll)
        if failure is None:
            failure = _after_rank0(procs, rank0.result)
        return rank0.result, rank0.epochs, failure
    finally:
        for p in procs:
            p.terminate()
        deadline = time.monotonic() + 5
        for p in procs:
            p.close(timeout=max(0.1, deadline - time.monotonic()))


def _rank_env(processes: int) -> dict[str, str]:
    """The environment every rank shares: ``torch.distributed``'s rendezvous on a free port, and
    this machine's cores shared among the ranks unless ``OMP_NUM_THREADS`` says otherwise."""
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(processes),
        LOCAL_WORLD_SIZE=str(processes),
    )
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    return env


@dataclass
class _Rank0:
    """Rank 0's messages as they come: its epochs (each answered), phases, steps and result."""

    proc: TrialProcess
    on_epoch: Callable[[int, dict], bool] | None
    on_phase: Callable[[str], None] | None
    on_step: Callable[[int, int, int], None] | None
    result: dict[str, Any] | None = None
    epochs: list[dict[str, Any]] = field(default_factory=list)

    def relay(self, others: list[TrialProcess], poll: float) -> str | None:
        """Read rank 0's messages (on a thread: the others' exits are checked every ``poll``
        seconds meanwhile) until it closes its stdout; a failure reason as soon as another rank dies."""
        messages: queue.Queue = queue.Queue()

        def read() -> None:
            for msg in self.proc.messages():
                messages.put(msg)
            messages.put(None)

        threading.Thread(target=read, daemon=True).start()
        while True:
            try:
                msg = messages.get(timeout=poll)
            except queue.Empty:
                msg = False
            if msg:
                self.take(msg)
            failure = _failed_rank(others)  # checked once more at the end of rank 0's messages
            if failure is not None or msg is None:
                return failure

    def take(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "epoch":
            self.epochs.append(msg)
            stop = bool(self.on_epoch(int(msg["epoch"]), dict(msg.get("metrics") or {}))) if self.on_epoch else False
            self.proc.answer(stop)
        elif kind in ("result", "user_error"):
            self.result = msg
        elif kind == "phase" and self.on_phase is not None:
            self.on_phase(str(msg.get("phase")))
        elif kind == "step" and self.on_step is not None:
            self.on_step(int(msg["epoch"]), int(msg["step"]), int(msg["steps"]))


def _failed_rank(others: list[TrialProcess]) -> str | None:
    """The failure reason of the first rank after rank 0 that exited with a non-zero code."""
    for r, p in enumerate(others, start=1):
        rc = p.poll()
        if rc is not None and rc != 0:
            return describe_exit(r, rc)
    return None


def _after_rank0(procs: list[TrialProcess], result: dict[str, Any] | None) -> str | None:
    """Rank 0 closed its stdout: the trial's failure reason, or None once the others finished. A
    rank 0 that failed with an error because another rank died fails the trial with that rank."""
    rc0 = procs[0].wait()
    dead = [(r, rc) for r, p in enumerate(procs[1:], start=1) if (rc := p.poll()) not in (None, 0)]
    rank0_error = result is None or str(result.get("failure_reason") or "").startswith("error")
    if dead and rank0_error:
        return describe_exit(*dead[0])
    if result is None:
        return describe_exit(0, rc0)
    # rank 0 is done; the others finish on their own (they have left the last collective)
    for p in procs[1:]:
        with suppress(subprocess.TimeoutExpired):
            p.wait(timeout=60)
    return None
