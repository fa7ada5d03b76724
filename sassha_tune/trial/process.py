"""The parent side of the trial protocol: one child process running a job.

:class:`TrialProcess` starts ``python -m sassha_tune.trial``, sends the job, iterates the child's
messages, answers its epoch messages when the job prunes, and stops and reaps it. A study's single
trials and packs use it, and so does :func:`sassha_tune.trial.ranks.launch_ranks` for each rank of
a multi-rank trial. See :mod:`sassha_tune.trial` for the protocol.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["PARENT_PID_ENV", "TrialProcess"]

# The child watches this process and exits when it is gone (a killed coordinator leaves no orphan).
PARENT_PID_ENV = "SASSHA_TUNE_PARENT_PID"


class TrialProcess:
    """``python -m sassha_tune.trial`` running ``job``: JSON job in, JSON lines out, go/stop replies.

    ``env``: the child's environment (default: this process's); ``listen=False`` discards the
    child's messages (the ranks of a multi-rank trial other than rank 0)."""

    def __init__(self, job: Mapping[str, Any], *, env: Mapping[str, str] | None = None, listen: bool = True) -> None:
        self.job = dict(job)
        full_env = dict(os.environ if env is None else env)
        full_env[PARENT_PID_ENV] = str(os.getpid())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sassha_tune.trial"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if listen else subprocess.DEVNULL,
            text=True,
            env=full_env,
            bufsize=1,
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(self.job) + "\n")
        self.proc.stdin.flush()

    def messages(self) -> Iterator[dict[str, Any]]:
        """The child's messages until it closes its stdout. Only the protocol writes there (the
        child sends the trial's own prints to stderr); a line that is not JSON is skipped."""
        assert self.proc.stdout is not None, "messages of a process started with listen=False"
        for line in self.proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except ValueError:
                continue

    def answer(self, stop: bool) -> None:
        """Answer an epoch message: ``stop`` or ``go`` (only a pruning job waits for one)."""
        if self.job.get("prune"):
            self._write("stop" if stop else "go")

    def _write(self, text: str) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the child is gone; its exit code tells why

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        """The exit code, waiting up to ``timeout`` seconds (``subprocess.TimeoutExpired`` after)."""
        return self.proc.wait(timeout=timeout)

    def terminate(self) -> None:
        """SIGTERM, if it still runs."""
        if self.proc.poll() is None:
            self.proc.terminate()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; returns when it has exited."""
        self.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def close(self, timeout: float = 10.0) -> int:
        """Stop it (:meth:`stop`), close the pipes; the exit code (negative: killed by that signal)."""
        self.stop(timeout)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        return self.proc.returncode
