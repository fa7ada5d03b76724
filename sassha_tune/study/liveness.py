"""Liveness: the heartbeat of a running trial and the reconciliation of lost ones.

A RUNNING trial whose heartbeat (trial system attribute ``sassha_tune:heartbeat``, refreshed every
``study.heartbeat_interval`` seconds by the process that owns the trial, :class:`Heartbeat`) is
older than ``study.stale_after`` is *lost*: :func:`reconcile` makes it FAIL with
``failure_reason: lost`` and enqueues its params once (the retried numbers are kept in the study
system attribute ``sassha_tune:retried``; the retry carries ``retry_of``). A trial whose process
was killed by SIGKILL while its coordinator lives is lost too: the loop fails it as ``lost`` at
once and retries it the same way (:func:`retry_lost`). Optuna's own heartbeat
works only inside ``study.optimize``, so the loop keeps its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .storage import study_id, study_storage, trial_id, with_retry

__all__ = ["HEARTBEAT_KEY", "RETRIED_KEY", "MAX_RETRY_DEPTH", "Heartbeat", "reconcile", "retry_lost"]

HEARTBEAT_KEY = "sassha_tune:heartbeat"
RETRIED_KEY = "sassha_tune:retried"
MAX_RETRY_DEPTH = 2  # a lost retry of a lost retry is not retried again


def _last_beat(t: FrozenTrial) -> float:
    hb = t.system_attrs.get(HEARTBEAT_KEY)
    if isinstance(hb, (int, float)):
        return float(hb)
    return t.datetime_start.timestamp() if t.datetime_start else 0.0


def reconcile(study: optuna.Study, stale_after: float, *, log: Callable[[str], None] = print) -> list[int]:
    """Fail RUNNING trials with a stale heartbeat ("lost") and enqueue their params once."""
    storage = study_storage(study)
    now = time.time()
    lost: list[int] = []
    for t in with_retry(study.get_trials, deepcopy=False, states=(TrialState.RUNNING,)):
        if now - _last_beat(t) <= stale_after:
            continue
        try:
            with_retry(storage.set_trial_user_attr, trial_id(t), "failure_reason", "lost")
            with_retry(storage.set_trial_state_values, trial_id(t), TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            continue  # finished meanwhile, or another worker got there first
        lost.append(t.number)
        retry_lost(study, t, "heartbeat stale", log=log)
    return lost


def retry_lost(study: optuna.Study, t: FrozenTrial, why: str, *, log: Callable[[str], None] = print) -> bool:
    """Enqueue the params of ``t``, a trial just failed as ``lost``, once (the retry carries
    ``retry_of`` and ``retry_history``); False when it was retried before or is a retry of a retry
    (:data:`MAX_RETRY_DEPTH`). ``why`` goes into the log line. Used by :func:`reconcile` and by
    the study loop for a trial process killed by SIGKILL."""
    storage = study_storage(study)
    retried = list(with_retry(storage.get_study_system_attrs, study_id(study)).get(RETRIED_KEY, []))
    depth = len(t.user_attrs.get("retry_history", []))
    if t.number in retried or depth >= MAX_RETRY_DEPTH:
        log(f"trial {t.number} lost ({why}); not retried again")
        return False
    retried.append(t.number)
    with_retry(storage.set_study_system_attr, study_id(study), RETRIED_KEY, sorted(retried))
    attrs = {"retry_of": t.number, "retry_history": [*t.user_attrs.get("retry_history", []), t.number]}
    for key in ("published",):
        if key in t.user_attrs:
            attrs[key] = t.user_attrs[key]
    with_retry(study.enqueue_trial, dict(t.params), user_attrs=attrs)
    log(f"trial {t.number} lost ({why}): marked FAIL, params enqueued for a retry")
    return True


class Heartbeat:
    """Refreshes an asked trial's heartbeat from a thread while its process trains (a context
    manager: the first beat on entry, the thread stops on exit)."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, interval: float) -> None:
        self.storage, self.trial_id, self.interval = study_storage(study), trial_id(trial), interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def beat(self) -> None:
        with_retry(self.storage.set_trial_system_attr, self.trial_id, HEARTBEAT_KEY, time.time())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception:  # finished trial or storage hiccup: the next beat tries again
                if self._stop.is_set():
                    return

    def __enter__(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
