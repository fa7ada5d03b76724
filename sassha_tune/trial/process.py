"""The parent side of the trial protocol: one child process running a job.

:class:`TrialProcess` starts ``python -m sassha_tune.trial``, sends the job, iterates the child's
messages, answers its epoch messages when the job prunes, and stops and reaps it. A study's single
trials and packs use it, and so does :func:`sassha_tune.trial.ranks.launch_ranks` for each rank of
a multi-rank trial. :class:`WarmWorker` is the long-lived variant (a study's default for single trials): one process running
job after job, each ended by a ``done`` message. See :mod:`sassha_tune.trial` for the protocol.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

__all__ = ["PARENT_PID_ENV", "STARTUP_SECONDS", "STEP_SECONDS", "TrialProcess", "WarmJob", "WarmWorker", "Watchdog"]

#: how much longer than its trial timeout a job's process may take to take the job up (start, imports)
STARTUP_SECONDS = 60.0

#: seconds between two ``step`` messages (progress within an epoch) when a study asks for them
STEP_SECONDS = 1.0

# The child watches this process and exits when it is gone (a killed coordinator leaves no orphan).
PARENT_PID_ENV = "SASSHA_TUNE_PARENT_PID"


def _signal_if_running(proc: subprocess.Popen, sig: int) -> None:
    """``sig`` to ``proc`` unless it has exited (it may exit in between: then nothing happens)."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


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
        self.send_signal(signal.SIGTERM)

    def send_signal(self, sig: int) -> None:
        """``sig`` to the child, if it still runs (safe from another thread: :class:`Watchdog`)."""
        _signal_if_running(self.proc, sig)

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


class WarmWorker:
    """A long-lived ``python -m sassha_tune.trial --serve``: one job after another through the same
    protocol, each ended by a ``done`` message (imports and process start paid once).

    :meth:`start` hands a job to it and returns a :class:`WarmJob`, which the study loop drives like
    a :class:`TrialProcess`. The worker is spent (:attr:`spent`) after a job that may have
    poisoned it (it says so and exits) or when it died (SIGKILL): start a new one then."""

    def __init__(self, *, env: Mapping[str, str] | None = None) -> None:
        full_env = dict(os.environ if env is None else env)
        full_env[PARENT_PID_ENV] = str(os.getpid())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sassha_tune.trial", "--serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=full_env, bufsize=1,
        )
        self.spent = False
        self.jobs = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, job: Mapping[str, Any]) -> WarmJob:
        assert not self.spent, "a spent worker takes no job"
        self.jobs += 1
        warm = WarmJob(self, job)
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(dict(job)) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.spent = True  # it died between jobs: the job ends at once, its exit code tells why
        return warm

    def close(self, timeout: float = 10.0) -> int:
        """End it: end of input (it exits 0 between jobs), then SIGTERM / SIGKILL after ``timeout``.
        A worker that never got a job (a study refused before its first trial) gets SIGTERM at
        once: it holds nothing, and waiting for its imports to finish would only delay the error."""
        self.spent = True
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        if self.jobs == 0 and self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            try:
                self.proc.stdout.close()
            except OSError:
                pass
        return self.proc.returncode


class WarmJob:
    """One job of a :class:`WarmWorker`, with :class:`TrialProcess`'s interface: messages until
    ``done``, go/stop answers, the job's exit code (that of the worker, negative, if it died)."""

    def __init__(self, worker: WarmWorker, job: Mapping[str, Any]) -> None:
        self.worker, self.job = worker, dict(job)
        self.code: int | None = None
        self.why_spent = ""  # why the worker cannot take another job ("" while it can)

    def messages(self) -> Iterator[dict[str, Any]]:
        stdout = self.worker.proc.stdout
        assert stdout is not None
        if not self.worker.spent:
            for line in stdout:
                line = line.strip()
                if not line:
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if msg.get("type") == "done":
                    self.code = int(msg.get("code", 1))
                    if msg.get("replace"):
                        self.worker.spent = True
                        self.why_spent = f"exit code {self.code}" if self.code else "out of memory"
                    return
                yield msg
        # no done: the worker died in this job
        self.worker.spent = True
        self.code = self.worker.proc.wait()
        self.why_spent = f"killed by signal {-self.code}" if self.code < 0 else f"exit code {self.code}"

    def retire(self, why: str) -> None:
        """The worker takes no further job (e.g. the trial timeout signalled it, even after ``done``)."""
        self.worker.spent = True
        self.why_spent = why

    def send_signal(self, sig: int) -> None:
        """``sig`` to the worker running this job, if it still runs (:class:`Watchdog`)."""
        _signal_if_running(self.worker.proc, sig)

    def answer(self, stop: bool) -> None:
        if self.job.get("prune") and not self.worker.spent:
            try:
                assert self.worker.proc.stdin is not None
                self.worker.proc.stdin.write(("stop" if stop else "go") + "\n")
                self.worker.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass

    def wait(self, timeout: float | None = None) -> int:
        if self.code is None:
            for _ in self.messages():
                pass
        assert self.code is not None
        if self.worker.spent:
            self.worker.close(timeout if timeout is not None else 10.0)
        return self.code

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker (a run that stops early): SIGTERM, then SIGKILL after ``timeout``."""
        self.worker.spent = True
        if self.worker.proc.poll() is None:
            self.worker.proc.terminate()
        self.worker.close(timeout)

    def close(self, timeout: float = 10.0) -> int:
        return self.wait(timeout)


class _Signalled(Protocol):
    def send_signal(self, sig: int) -> None: ...


class Watchdog:
    """A deadline for one job (``budget.trial_timeout``): ``seconds`` after the job's process said
    it has begun the job (:meth:`begin`, on its ``started`` message) the process gets SIGTERM, and
    SIGKILL ``grace`` seconds later if it is still there; :attr:`fired` says whether it came to that.
    Starting the process (a new warm worker importing torch) is not the trial's time: until
    :meth:`begin` the clock runs from the job's handing with its own allowance, ``startup``
    (default ``seconds`` + :data:`STARTUP_SECONDS`), so that a process that never begins is stopped
    too (:attr:`began` tells the two apart). A context manager around the reading of the job's
    messages: the killed process closes its stdout, so the reader ends as for any dead process.
    ``seconds`` None: no deadline. A warm worker killed this way is spent and replaced, like any
    dead one."""

    def __init__(self, proc: _Signalled, seconds: float | None, *, grace: float = 10.0,
                 startup: float | None = None) -> None:
        self.proc, self.seconds, self.grace = proc, seconds, grace
        self.startup = startup if startup is not None or seconds is None else seconds + STARTUP_SECONDS
        self.fired = False
        # one condition for the deadline and the end: begin() and __exit__ wake the watching thread,
        # so it always sleeps until the earliest deadline it has, never past a moved one
        self._changed = threading.Condition()
        self._done = False
        self._deadline = 0.0
        self._begun = False
        self._thread = threading.Thread(target=self._watch, daemon=True, name="trial-watchdog")

    @property
    def began(self) -> bool:
        """Whether the process said it took the job up."""
        with self._changed:
            return self._begun

    def begin(self) -> None:
        """The process began the job: the trial's ``seconds`` count from now (once)."""
        with self._changed:
            if not self._begun and self.seconds is not None:
                self._begun = True
                self._deadline = time.monotonic() + self.seconds
                self._changed.notify_all()

    def _until(self, deadline: float | None) -> bool:
        """Sleep until ``deadline`` (None: the current one, followed when :meth:`begin` moves it)
        or the end; whether the deadline came first."""
        with self._changed:
            while not self._done:
                left = (self._deadline if deadline is None else deadline) - time.monotonic()
                if left <= 0:
                    return True
                self._changed.wait(left)
            return False

    def _watch(self) -> None:
        if not self._until(None):
            return
        self.fired = True
        self.proc.send_signal(signal.SIGTERM)
        if self._until(time.monotonic() + self.grace):
            self.proc.send_signal(signal.SIGKILL)

    def __enter__(self) -> Watchdog:
        if self.seconds is not None:
            assert self.startup is not None
            self._deadline = time.monotonic() + self.startup
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._changed:
            self._done = True
            self._changed.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
