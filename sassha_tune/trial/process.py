"""The parent side of the trial protocol: a job and the child process running it.

:class:`TrialProcess` is a job of ``python -m sassha_tune.trial``: it sends the job, iterates the
child's messages, answers its epoch messages when the job prunes, and stops and reaps the process.
Where the job runs is its one policy: a fresh process of its own (packs, each rank of a multi-rank
trial: :func:`sassha_tune.trial.ranks.launch_ranks`, ``study.fresh_process``), or a
:class:`WarmWorker` (a study's default for single trials), one long-lived process running job
after job, each ended by a ``done`` message. See :mod:`sassha_tune.trial` for the protocol.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import suppress
from typing import IO, Any, Protocol

__all__ = ["PARENT_PID_ENV", "STARTUP_SECONDS", "STEP_SECONDS", "TrialProcess", "WarmWorker", "Watchdog"]

#: how much longer than its trial timeout a job's process may take to take the job up (start, imports)
STARTUP_SECONDS = 60.0

#: seconds between two ``step`` messages (progress within an epoch) when a study asks for them
STEP_SECONDS = 1.0

# The child watches this process and exits when it is gone (a killed coordinator leaves no orphan).
PARENT_PID_ENV = "SASSHA_TUNE_PARENT_PID"


def _reap(proc: subprocess.Popen, timeout: float, escalation: Sequence[Callable[[], None]]) -> int:
    """Wait for ``proc`` to exit, ``timeout`` seconds at a time, taking the next step of
    ``escalation`` (SIGTERM, SIGKILL) after each wait it outlasts; its exit code."""
    for step in escalation:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            step()
    return proc.wait()


class _Child:
    """One ``python -m sassha_tune.trial`` process (``--serve``: a warm worker) and its pipes:
    lines in, JSON messages out, signals, and its end."""

    def __init__(self, *args: str, env: Mapping[str, str] | None, listen: bool = True) -> None:
        full_env = dict(os.environ if env is None else env)
        full_env[PARENT_PID_ENV] = str(os.getpid())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sassha_tune.trial", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if listen else subprocess.DEVNULL,
            text=True,
            env=full_env,
            bufsize=1,
        )

    def write(self, line: str) -> bool:
        """Send one line; False when the child is gone (its exit code tells why)."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return False
        return True

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

    def send_signal(self, sig: int) -> None:
        """``sig`` unless it has exited (it may exit in between: then nothing happens); safe from
        another thread (:class:`Watchdog`)."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def end(self, timeout: float, *, asked: bool) -> int:
        """Reap it and close its pipes; the exit code (negative: killed by that signal). ``asked``:
        end of input asks it to exit (a warm worker between jobs), SIGTERM only after ``timeout``
        seconds; otherwise SIGTERM at once (before its input closes: a child waiting for a reply
        would take the end of input for its parent's death). SIGKILL after a further ``timeout``."""
        terminate = functools.partial(self.send_signal, signal.SIGTERM)
        if asked:
            self._close(self.proc.stdin)
            _reap(self.proc, timeout, [terminate, self.proc.kill])
        else:
            terminate()
            _reap(self.proc, timeout, [self.proc.kill])
            self._close(self.proc.stdin)
        self._close(self.proc.stdout)
        return self.proc.returncode

    @staticmethod
    def _close(pipe: IO[str] | None) -> None:
        with suppress(OSError):
            if pipe is not None:
                pipe.close()


class WarmWorker:
    """A long-lived ``python -m sassha_tune.trial --serve``: one job after another through the same
    protocol, each ended by a ``done`` message (imports and process start paid once).

    :meth:`start` hands a job to it: a :class:`TrialProcess` that runs in this worker. The worker is
    spent (:attr:`spent`) after a job that may have poisoned it (it says so and exits), when it died
    (SIGKILL) or when its job was cut short (:meth:`TrialProcess.retire`): start a new one then."""

    def __init__(self, *, env: Mapping[str, str] | None = None) -> None:
        self.child = _Child("--serve", env=env)
        self.spent = False
        self.jobs = 0

    @property
    def pid(self) -> int:
        return self.child.proc.pid

    @property
    def proc(self) -> subprocess.Popen:
        return self.child.proc

    def start(self, job: Mapping[str, Any]) -> TrialProcess:
        return TrialProcess(job, worker=self)

    def close(self, timeout: float = 10.0) -> int:
        """End it: end of input (it exits 0 between jobs), then SIGTERM / SIGKILL after ``timeout``.
        A worker that never got a job (a study refused before its first trial) gets SIGTERM at
        once: it holds nothing, and waiting for its imports to finish would only delay the error."""
        self.spent = True
        if self.jobs == 0:
            self.child.send_signal(signal.SIGTERM)
        return self.child.end(timeout, asked=True)


class TrialProcess:
    """A job of the trial protocol (``python -m sassha_tune.trial``) and the process running it:
    JSON job in, JSON lines out, go/stop replies, its exit code.

    Fresh or warm is the one policy: by default the job gets a fresh process of its own, which ends
    with it; with ``worker`` (:meth:`WarmWorker.start`) it runs in that warm worker, its messages end
    with the worker's ``done`` and its exit code is the one ``done`` reports (that of the worker,
    negative, if it died in the job). ``env``: a fresh process's environment (default: this
    process's); ``listen=False`` discards its messages (the ranks of a multi-rank trial other
    than rank 0)."""

    def __init__(self, job: Mapping[str, Any], *, env: Mapping[str, str] | None = None, listen: bool = True,
                 worker: WarmWorker | None = None) -> None:
        self.job, self.worker = dict(job), worker
        self.code: int | None = None  # a warm job's exit code, once known
        self.why_spent = ""  # why its warm worker cannot take another job ("" while it can)
        if worker is None:
            self.child = _Child(env=env, listen=listen)
            self.child.write(json.dumps(self.job))
            return
        assert not worker.spent, "a spent worker takes no job"
        self.child = worker.child
        worker.jobs += 1
        if not self.child.write(json.dumps(self.job)):
            worker.spent = True  # it died between jobs: the job ends at once, its exit code tells why

    @property
    def proc(self) -> subprocess.Popen:
        return self.child.proc

    def messages(self) -> Iterator[dict[str, Any]]:
        """The job's messages: a fresh process's until it closes its stdout, a warm job's until
        ``done`` (or the worker's death)."""
        if self.worker is None:
            yield from self.child.messages()
            return
        if not self.worker.spent:
            for msg in self.child.messages():
                if msg.get("type") == "done":
                    self.code = int(msg.get("code", 1))
                    if msg.get("replace"):
                        self.worker.spent = True
                        self.why_spent = f"exit code {self.code}" if self.code else "out of memory"
                    return
                yield msg
        # no done: the worker died in this job
        self.worker.spent = True
        self.code = self.proc.wait()
        self.why_spent = f"killed by signal {-self.code}" if self.code < 0 else f"exit code {self.code}"

    def answer(self, stop: bool) -> None:
        """Answer an epoch message: ``stop`` or ``go`` (only a pruning job waits for one)."""
        if self.job.get("prune") and not (self.worker is not None and self.worker.spent):
            self.child.write("stop" if stop else "go")

    def retire(self, why: str) -> None:
        """Its warm worker takes no further job (e.g. the trial timeout signalled it, even after
        ``done``; its trial was taken over); a fresh process ends with its job anyway."""
        if self.worker is not None:
            self.worker.spent = True
            self.why_spent = why

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        """The exit code, waiting up to ``timeout`` seconds (a fresh process: ``subprocess.TimeoutExpired``
        after). A warm job reads its messages to ``done``, and closes a worker it spent."""
        if self.worker is None:
            return self.proc.wait(timeout=timeout)
        if self.code is None:
            for _ in self.messages():
                pass
        assert self.code is not None
        if self.worker.spent:
            self.worker.close(timeout if timeout is not None else 10.0)
        return self.code

    def terminate(self) -> None:
        """SIGTERM, if it still runs."""
        self.send_signal(signal.SIGTERM)

    def send_signal(self, sig: int) -> None:
        """``sig`` to its process, if it still runs (safe from another thread: :class:`Watchdog`)."""
        self.child.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop its process (a run that stops early): SIGTERM, then SIGKILL after ``timeout``
        seconds; returns when it has exited. A warm worker stopped so is spent."""
        if self.worker is None:
            self.terminate()
            _reap(self.proc, timeout, [self.proc.kill])
            return
        self.worker.spent = True
        self.terminate()
        self.worker.close(timeout)

    def close(self, timeout: float = 10.0) -> int:
        """The job's exit code (negative: killed by that signal): a fresh process is stopped
        (:meth:`stop`) and its pipes closed; a warm job is waited for (:meth:`wait`)."""
        if self.worker is None:
            return self.child.end(timeout, asked=False)
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
