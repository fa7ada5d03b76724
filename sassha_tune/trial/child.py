"""The child side of the trial protocol: ``python -m sassha_tune.trial``.

Reads the job from stdin, runs it -- one trial or a pack of trials, both
:func:`.objective.evaluate_trials` -- and sends its messages as JSON lines (protocol in
:mod:`sassha_tune.trial`). The protocol gets its own copy of stdout and stdout itself is pointed at
stderr, so nothing the trial prints can corrupt a message. The process exits at once when its
parent is gone (a killed coordinator), and quietly when the protocol pipe breaks. With
``--serve`` it is a warm trial worker: jobs one after another (:func:`_serve`).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, TextIO

from ..config import config_from_stored
from ..errors import UserError
from ..printable import printable
from .objective import evaluate_trials
from .outcome import TrialOutcome, json_safe, one_line
from .process import PARENT_PID_ENV

__all__ = ["StepMessages", "main"]

_PARENT_GONE = 3


def _watch_parent(parent: int) -> None:
    """Exit at once when the process that launched us is gone (killed coordinator)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(_PARENT_GONE)


class StepMessages:
    """A trainer step callback ``(epoch, step, steps[, members])`` that sends ``{"type": "step",
    "epoch": E, "step": S, "steps": N}`` (a pack's with ``"members": [...]``) when ``every``
    seconds passed since the last one (or since it was made), never for a step that ends its
    epoch (the epoch message follows): an epoch shorter than ``every`` sends none."""

    def __init__(self, send: Callable[[dict[str, Any]], None], *, pack: bool, every: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.send, self.pack, self.every, self.clock = send, pack, every, clock
        self.last = clock()

    def __call__(self, epoch: int, step: int, steps: int, members: list[int] | None = None) -> None:
        now = self.clock()
        if step == steps or now - self.last < self.every:
            return
        self.last = now
        msg: dict[str, Any] = {"type": "step", "epoch": epoch, "step": step, "steps": steps}
        if self.pack:
            msg["members"] = list(members or [])
        self.send(msg)


class _Channel:
    """This process's end of the protocol for one job: messages out, go/stop replies in. It ends
    with its job (:meth:`close`): a thread the trial left running that sends later gets an error
    in that thread, and its message never reaches the parent as the next job's."""

    def __init__(self, out: TextIO, prune: bool) -> None:
        self.out, self.prune = out, prune
        self._lock = threading.RLock()  # one message (and its reply) at a time; close waits for it
        self._open = True

    def close(self) -> None:
        with self._lock:
            self._open = False

    def send(self, msg: dict[str, Any]) -> None:
        with self._lock:
            if not self._open:
                raise RuntimeError(f"trial protocol: a {msg.get('type')!r} message after its job ended "
                                   "(from a thread the trial left running?) is not sent")
            try:
                self.out.write(json.dumps(msg) + "\n")
                self.out.flush()
            except (BrokenPipeError, EOFError, OSError):
                # The parent is gone (e.g. SIGKILLed): nobody reads the result; its heartbeat goes stale
                # and the trial is reconciled as lost. Exit quietly, without flushing the dead pipe.
                os._exit(_PARENT_GONE)

    def on_epoch(self, member: int | None = None) -> Callable[[int, dict], bool]:
        """The trainer's epoch callback: report the epoch, then (when pruning) wait for go/stop."""

        def callback(epoch: int, metrics: dict) -> bool:
            with self._lock:  # the reply belongs to this message: no other may come between
                self.send(_tagged({"type": "epoch", "epoch": epoch, "metrics": json_safe(metrics)}, member))
                if not self.prune:
                    return False
                try:
                    reply = sys.stdin.readline()
                except (EOFError, OSError):
                    reply = ""
                if not reply:  # the parent is gone
                    os._exit(_PARENT_GONE)
                return reply.strip() == "stop"

        return callback

    def on_step(self, pack: bool, every: float) -> StepMessages:
        """The trainer's step callback: ``step`` messages at most every ``every`` seconds."""
        return StepMessages(self.send, pack=pack, every=every)

    def phase(self, name: str, member: int | None = None) -> None:
        """A phase without epoch messages begins: ``{"type": "phase", "phase": NAME}``, not answered."""
        self.send(_tagged({"type": "phase", "phase": name}, member))


def _tagged(msg: dict[str, Any], member: int | None) -> dict[str, Any]:
    return msg if member is None else {**msg, "member": member}


def main(argv: list[str] | None = None) -> int:
    """One job (``python -m sassha_tune.trial``), or with ``--serve`` jobs one after another."""
    argv = sys.argv[1:] if argv is None else argv
    parent = int(os.environ.get(PARENT_PID_ENV, os.getppid()))
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # stray prints of the trial go to stderr, never into the protocol
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if "--serve" in argv:
        code = _serve(proto)
        # Nothing is left to do, and the interpreter's teardown with torch loaded takes a second
        # or more, which the study waits for: flush and leave at once.
        for stream in (proto, sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    line = sys.stdin.readline()
    if not line:
        return _PARENT_GONE
    code, _ = _run_job(json.loads(line), proto)
    _end_soon(proto, code)
    return code


#: how long a fresh trial process that has sent its job's messages waits for threads the trial
#: left running (non-daemon threads hold the interpreter's exit) before it exits anyway
EXIT_SECONDS = 5.0


def _end_soon(proto: TextIO, code: int) -> None:
    """The job is done: close the protocol, so that the parent reads to its end and has the result,
    and make sure this process ends with ``code`` within :data:`EXIT_SECONDS` even when a thread
    the trial left running would keep it alive."""
    proto.close()

    def leave() -> None:
        time.sleep(EXIT_SECONDS)
        left = [t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
        print(f"trial process: exiting while threads the trial left are still running ({printable(', '.join(left))})",
              file=sys.stderr, flush=True)
        os._exit(code)

    threading.Thread(target=leave, daemon=True, name="trial-exit").start()


def _serve(proto: TextIO) -> int:
    """A warm trial worker: jobs one after another, each answered by its messages and then
    ``{"type": "done", "code": C, "replace": R}`` (C: the exit code a fresh process would have had).
    Every job starts from the state this process started in (:class:`_FreshState`). After a job
    that may have poisoned the process (an unexpected error, out of memory, Ctrl-C) it says
    ``replace: true`` and exits with that code; end of input: exit 0."""
    from ..training.data import cache_loaded_files

    cache_loaded_files()  # the next trials load the same files: read them once (training/data.py)
    fresh = _FreshState()
    _warm_up()
    while True:
        try:
            # Put back (and collect) right after a job rather than when the next one arrives: the
            # parent is storing the result meanwhile (10-40 ms), so the next job rarely waits for it.
            # The first time it runs while the study is still being set up.
            fresh.restore()
            line = sys.stdin.readline()
        except KeyboardInterrupt:  # Ctrl-C between two jobs: nothing to tell
            return 130
        if not line:
            return 0
        code, reason = _run_job(json.loads(line), proto)
        replace = code != 0 or reason == "out_of_memory"
        _Channel(proto, prune=False).send({"type": "done", "code": code, "replace": replace})
        if replace:
            return code


def _warm_up() -> None:
    """Import now, while the coordinator validates the config and creates the study, what every
    trial's first job would import on the way: the training and sharpness code, and what torch
    imports at the first Hessian-vector product (:func:`~sassha_tune.optim.hessian.warm_up`,
    which the trainer would otherwise do before the first trial's clock starts)."""
    from ..metrics import sharpness  # noqa: F401
    from ..optim import hessian
    from ..training import trainer  # noqa: F401

    hessian.warm_up()


class _FreshState:
    """The process-wide torch settings a fresh trial process starts with, captured once and put
    back before every job of a warm worker (the trainer seeds the generators itself)."""

    def __init__(self) -> None:
        import torch

        self.dtype = torch.get_default_dtype()
        self.deterministic = torch.are_deterministic_algorithms_enabled()
        self.warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        self.grad = torch.is_grad_enabled()
        self.threads = torch.get_num_threads()
        self.matmul_precision = torch.get_float32_matmul_precision()
        self.cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
                      torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        self.anomaly = torch.is_anomaly_enabled()
        # autocast left on by a trial that set it without a context manager (or died inside one)
        self.autocast = {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")}

    def restore(self) -> None:
        import torch

        gc.collect()  # what the previous trial left (its model, data, optimizer state) goes now
        # What is left is this process's own: its modules (torch's, the trainer's, a plug-in's) and
        # the caches it keeps on purpose. Frozen, the cyclic collector no longer walks them: the
        # collection above took 80-140 ms a job with torch loaded (before the next job could start),
        # and the collector's automatic runs during training walked them too. A later job's garbage
        # is collected as before; only cycles among these survivors would outlive them.
        gc.freeze()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        torch.set_default_dtype(self.dtype)
        if (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) != (
                self.deterministic, self.warn_only):
            # set only when a trial changed it: its first call in a process takes about a second
            # (torch imports more), which the first job waited for
            torch.use_deterministic_algorithms(self.deterministic, warn_only=self.warn_only)
        torch.set_grad_enabled(self.grad)
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        torch.set_float32_matmul_precision(self.matmul_precision)
        (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
         torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) = self.cudnn
        torch.autograd.set_detect_anomaly(self.anomaly)
        for device, (enabled, dtype) in self.autocast.items():
            torch.set_autocast_enabled(device, enabled)
            torch.set_autocast_dtype(device, dtype)


def _run_job(job: dict[str, Any], proto: TextIO) -> tuple[int, str | None]:
    """Run one job, sending its messages: (the exit code, the failure reason of a failed single trial)."""
    channel = _Channel(proto, prune=bool(job.get("prune")))
    from ..training import trainer  # noqa: F401  # torch and the training code: imported before the clock starts

    channel.send({"type": "started"})  # the trial's time (budget.trial_timeout) counts from here
    params = job["params"]
    members: list[int | None] = list(range(len(params))) if isinstance(params, list) else [None]
    every = job.get("steps")  # seconds between step messages, or None: none
    on_step = None if every is None else channel.on_step(isinstance(params, list), float(every))
    try:
        return _job_outcome(job, channel, params, members, on_step)
    finally:
        channel.close()  # the job's channel ends with it: a thread the trial left cannot write into the next


def _job_outcome(job: dict[str, Any], channel: _Channel, params: Any, members: list[int | None],
                 on_step: StepMessages | None) -> tuple[int, str | None]:
    """The job's trial or pack, its outcome messages sent: :func:`_run_job`'s answer. ``members``:
    how each trial's messages are tagged (None: a single trial's, untagged)."""
    pack = isinstance(params, list)
    outcomes: list[TrialOutcome] = []

    def told(i: int, outcome: TrialOutcome) -> None:
        outcomes.append(outcome)
        channel.send(_tagged(outcome.to_json(), members[i]))

    try:
        # The parent validated the config; rebuilding it is all that is left to do here.
        cfg = config_from_stored(job["config"], source=f"study {job.get('study', '?')} (stored config)")
        # no progress bar of its own: the study's live view shows the epochs, and several trial
        # processes on one terminal would draw over each other
        evaluate_trials(
            cfg, params if pack else [params], on_epoch=[channel.on_epoch(m) for m in members], on_outcome=told,
            on_split=lambda epoch, halves: channel.send({"type": "split", "epoch": epoch, "halves": halves}),
            device=job.get("device"), progress=False, on_phase=lambda i, name: channel.phase(name, members[i]),
            on_step=on_step, save_models=job.get("save_model") if pack else [job.get("save_model")],
        )
    except UserError as exc:
        channel.send({"type": "user_error", "message": str(exc)})
        return 2, None
    except KeyboardInterrupt:
        return 130, None
    except Exception as exc:  # a bug or a broken plug-in: the trial fails, the study goes on
        print(printable(traceback.format_exc(), newlines=True), end="", file=sys.stderr, flush=True)
        reason = "out_of_memory" if type(exc).__name__ == "OutOfMemoryError" else one_line(exc)
        for member in members:  # the parent ignores results for pack members already told
            channel.send(_tagged(TrialOutcome("fail", failure_reason=reason).to_json(), member))
        return 1, reason
    # a single trial's failure reason decides whether a warm worker is replaced (out of memory);
    # a pack's members are each told theirs, and the worker goes on
    return 0, None if pack else outcomes[0].failure_reason
