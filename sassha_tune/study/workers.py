"""One ``sassha-tune worker`` process per GPU of this machine (``run --gpus``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from .progress import PLAIN_ENV
from .storage import STORAGE_ENV

__all__ = ["run_gpu_workers"]


def run_gpu_workers(
    study_name: str, storage_url: str, gpus: list[str], *, log: Callable[[str], None] = print, pack: str | int = 1,
    fresh_process: bool = False,
) -> int:
    """Start one ``sassha-tune worker`` per GPU (``CUDA_VISIBLE_DEVICES=N``); wait for all of them.

    Each worker trains on ``cuda`` (its one visible GPU) with ``--pack pack``. The storage URL goes
    to the workers in the environment, so a password never shows in ``ps``.
    """
    procs = []
    for i, gpu in enumerate(gpus):
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = gpu
        env[STORAGE_ENV] = storage_url
        env[PLAIN_ENV] = "1"  # the workers share this terminal: log lines only, no live view each
        cmd = [sys.executable, "-m", "sassha_tune.app.cli", "worker", study_name, "--device", "cuda",
               "--worker-id", str(i), "--pack", str(pack), *(["--fresh-process"] if fresh_process else [])]
        procs.append(subprocess.Popen(cmd, env=env))
        log(f"worker {i} started on GPU {gpu} (pid {procs[-1].pid})")
        time.sleep(0.5)  # stagger the first storage writes
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    bad = [c for c in codes if c != 0]
    return bad[0] if bad else 0
