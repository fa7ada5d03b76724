"""Liveness: the heartbeat of a running trial and the reconciliation of lost ones.

The process that owns a running trial records a heartbeat every ``study.heartbeat_interval``
seconds (:class:`Heartbeat`, a thread) in the storage's own heartbeat table (RDBStorage's
``record_heartbeat``, the ``trial_heartbeats`` table that optuna-dashboard and
:func:`optuna.storages.fail_stale_trials` read). The time of a beat and the age of the last one
both come from the database's clock (``now()`` / ``CURRENT_TIMESTAMP`` in the query), so workers
whose own clocks disagree do not fail each other's trials: on PostgreSQL that is the server's clock;
on SQLite it is the OS clock of the process running the query (SQLite computes
``CURRENT_TIMESTAMP`` in the client library), which is one clock for the processes of one machine.

A RUNNING trial whose last storage heartbeat is older than ``study.stale_after`` is *lost*:
:func:`reconcile` makes it FAIL with ``failure_reason: lost`` and enqueues its params once (the
retried numbers are kept in the study system attribute ``sassha_tune:retried``; the retry carries
``retry_of``). Optuna's ``fail_stale_trials`` is not used for this: it sets FAIL before its callback
runs, and a finished trial's user attributes can no longer be set, so the reason could not be
stored; :func:`reconcile` asks :func:`~.storage.storage_heartbeats` for the stale ids (Optuna's own
query, our grace period) and fails them itself, the state and the reason in one transaction that
only one worker can win (:func:`~.storage.fail_running_trial`), so a trial is lost and retried once
even when two workers judge it stale at the same moment.

Studies of earlier versions: a RUNNING trial with the old heartbeat (trial system attribute
``sassha_tune:heartbeat``, ``time.time()`` of the owner's clock) is judged by the old rule too (its
age by this process's clock); it is alive while either heartbeat is fresh. Nothing old is written
any more. A RUNNING trial with no heartbeat of either kind (its owner died between ``ask`` and the
first beat, or it was just asked) gets a storage heartbeat from the first :func:`reconcile` that
sees it, which starts its grace period on the database's clock; an owner that lives beats on.

A trial whose process was killed by SIGKILL while its coordinator lives is lost too: the loop
fails it as ``lost`` at once and retries it the same way (:func:`retry_lost`). Optuna's own
heartbeat thread works only inside ``study.optimize``, so the loop runs :class:`Heartbeat`.

A coordinator that was paused (SIGSTOP, Ctrl-Z, a machine asleep) or cut off from the storage for
longer than ``stale_after`` finds, when it goes on, that its trial was *taken over*: another
process failed it as lost and retried it, and the storage refuses every further write to it. The
loop drops its own run of that trial with one line (:func:`taken_over`) and goes on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..trial.attributes import RERUN_OF_STUDY, SEED_ATTR, SEED_RERUN_ATTR
from .storage import (
    fail_running_trial,
    record_heartbeat,
    storage_heartbeats,
    study_id,
    study_storage,
    trial_id,
    with_retry,
)

__all__ = ["HEARTBEAT_KEY", "RETRIED_KEY", "MAX_RETRY_DEPTH", "Heartbeat", "reconcile", "retry_lost", "taken_over"]

HEARTBEAT_KEY = "sassha_tune:heartbeat"  # the old heartbeat (read, never written)
RETRIED_KEY = "sassha_tune:retried"
MAX_RETRY_DEPTH = 2  # a lost retry of a lost retry is not retried again


def _old_beat(t: FrozenTrial) -> float | None:
    hb = t.system_attrs.get(HEARTBEAT_KEY)
    return float(hb) if isinstance(hb, (int, float)) and not isinstance(hb, bool) else None


def reconcile(study: optuna.Study, stale_after: float, *, log: Callable[[str], None] = print) -> list[int]:
    """Fail RUNNING trials with a stale heartbeat ("lost") and enqueue their params once; the
    numbers of the trials failed. Storage heartbeats are judged by the database's clock, old-style
    ones (studies of earlier versions) by this process's clock."""
    storage = study_storage(study)
    running = with_retry(study.get_trials, deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []
    beats = storage_heartbeats(study, stale_after)
    now = time.time()
    lost: list[int] = []
    for t in running:
        tid, old = trial_id(t), _old_beat(t)
        if tid not in beats.beating and old is None:
            # No heartbeat yet: start its grace period on the database's clock. Its owner, if
            # alive, beats on; if it died before its first beat, the trial goes stale from here.
            record_heartbeat(storage, tid)
            continue
        fresh_storage = tid in beats.beating and tid not in beats.stale
        fresh_old = old is not None and now - old <= stale_after
        if fresh_storage or fresh_old:
            continue
        if not fail_running_trial(study, tid, {"failure_reason": "lost"}):
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
    for key in ("published", "prior", "warm_start", SEED_ATTR, SEED_RERUN_ATTR, RERUN_OF_STUDY):  # a re-run keeps its seed
        if key in t.user_attrs:
            attrs[key] = t.user_attrs[key]
    with_retry(study.enqueue_trial, dict(t.params), user_attrs=attrs)
    log(f"trial {t.number} lost ({why}): marked FAIL, params enqueued for a retry")
    return True


def taken_over(study: optuna.Study, trial: optuna.Trial | FrozenTrial, stale_after: float
               ) -> tuple[FrozenTrial, str | None]:
    """The trial as stored now, and the line saying that another process took it over while this
    one ran it (None while it is still RUNNING: nobody did). A trial failed as ``lost`` was judged
    stale (:func:`reconcile`) and retried, or not, by :func:`retry_lost`'s rule."""
    storage = study_storage(study)
    frozen = with_retry(storage.get_trial, trial_id(trial))
    if frozen.state == TrialState.RUNNING:
        return frozen, None
    head = f"trial {frozen.number} was taken over by another process"
    if frozen.state == TrialState.FAIL and frozen.user_attrs.get("failure_reason") == "lost":
        retried = frozen.number in with_retry(storage.get_study_system_attrs, study_id(study)).get(RETRIED_KEY, [])
        return frozen, (f"{head}: this process went without a heartbeat for more than study.stale_after "
                        f"({stale_after:g} s; paused, asleep or cut off from the storage), so it was failed as lost"
                        f"{' and its parameters retried' if retried else ' (not retried again)'}; "
                        "this process drops its run of it and goes on")
    return frozen, (f"{head}: it was told {frozen.state.name} while this process ran it; "
                    "this process drops its run of it and goes on")


class Heartbeat:
    """Records an asked trial's heartbeat in the storage from a thread while its process trains
    (a context manager: the first beat on entry, the thread stops on exit). The storage stamps
    each beat with the database's time."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, interval: float) -> None:
        self.storage, self.trial_id, self.interval = study_storage(study), trial_id(trial), interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def beat(self) -> None:
        record_heartbeat(self.storage, self.trial_id)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception:  # storage hiccup: the next beat tries again
                if self._stop.is_set():
                    return

    def __enter__(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
