"""Liveness on real storages: heartbeats in the storage's own table, judged by the database's clock.

No models are trained: trials are asked on a plain Optuna study in a real SQLite file (and on the
test PostgreSQL server), beaten by :class:`Heartbeat` and judged by :func:`reconcile`. The
clock-skew test runs a second worker as a real subprocess whose Python clocks are shifted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid
import warnings
from pathlib import Path

import optuna
import pytest
from conftest import postgres_url
from optuna.trial import TrialState

from sassha_tune.study.liveness import HEARTBEAT_KEY, RETRIED_KEY, Heartbeat, reconcile
from sassha_tune.study.storage import open_storage, storage_heartbeats, study_id, study_storage, trial_id

STALE_AFTER = 1.0  # SQLite stamps heartbeats in whole seconds: a dead trial is stale 1-2 s after its last beat
INTERVAL = 0.2


def _silent(_: str) -> None:
    pass


def _study(url: str, name: str = "live") -> optuna.Study:
    return optuna.create_study(study_name=name, storage=open_storage(url))


def _ask(study: optuna.Study) -> optuna.Trial:
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    return trial


def _reconcile_until(study: optuna.Study, want: set[int] | None, timeout: float = 6.0) -> list[int]:
    """Reconcile every heartbeat interval until the trials ``want`` are lost (``None``: until
    ``timeout``, which ends it anyway); the numbers lost."""
    lost: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (want is None or not want <= set(lost)):
        lost += reconcile(study, STALE_AFTER, log=_silent)
        time.sleep(INTERVAL)
    return lost


def _assert_lost_and_retried_once(study: optuna.Study, numbers: set[int], *, one_worker: bool = True) -> None:
    trials = study.get_trials(deepcopy=False)
    for n in numbers:
        assert trials[n].state == TrialState.FAIL and trials[n].user_attrs["failure_reason"] == "lost"
    retries = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.user_attrs["retry_of"] for t in retries) == sorted(numbers)
    for t in retries:
        assert t.system_attrs["fixed_params"] == trials[t.user_attrs["retry_of"]].params
    if one_worker:  # two workers retrying at the same moment may each rewrite the list
        retried = study_storage(study).get_study_system_attrs(study_id(study))[RETRIED_KEY]
        assert sorted(retried) == sorted(numbers)


def test_storage_heartbeat_keeps_a_trial_alive_and_a_silent_one_goes_lost(tmp_path):
    study = _study(f"sqlite:///{tmp_path}/s.db")
    live, dead, orphan = _ask(study), _ask(study), _ask(study)  # orphan: its owner died before beating
    with Heartbeat(study, dead, INTERVAL):
        pass  # one beat, then silence
    with Heartbeat(study, live, INTERVAL):
        beats = storage_heartbeats(study, STALE_AFTER)
        assert beats.beating == {trial_id(live), trial_id(dead)} and beats.stale == set()
        assert reconcile(study, STALE_AFTER, log=_silent) == []  # the orphan gets its first beat here
        assert trial_id(orphan) in storage_heartbeats(study, STALE_AFTER).beating
        lost = _reconcile_until(study, {dead.number, orphan.number})
        assert study.get_trials(deepcopy=False)[live.number].state == TrialState.RUNNING
    assert sorted(lost) == sorted([dead.number, orphan.number])  # each once
    _assert_lost_and_retried_once(study, {dead.number, orphan.number})
    assert not any(HEARTBEAT_KEY in t.system_attrs for t in study.get_trials())  # nothing old written


def test_a_study_of_the_previous_version_is_judged_by_its_old_heartbeats(tmp_path):
    """The previous version wrote ``time.time()`` into the trial system attribute
    ``sassha_tune:heartbeat`` and nothing into the storage's heartbeat table."""
    url = f"sqlite:///{tmp_path}/old.db"
    study = _study(url, "old")
    stale, fresh, recent = _ask(study), _ask(study), _ask(study)
    storage = study_storage(study)
    storage.set_trial_system_attr(trial_id(stale), HEARTBEAT_KEY, time.time() - 100)
    storage.set_trial_system_attr(trial_id(fresh), HEARTBEAT_KEY, time.time() + 30)  # beating until the end
    # its worker just died: its last beat is recent enough to survive the first reconciliation
    # even on a loaded machine (it was 0.5 s old, and CI once took over 0.5 s to get there)
    storage.set_trial_system_attr(trial_id(recent), HEARTBEAT_KEY, time.time() + 2.0)
    study = optuna.load_study(study_name="old", storage=open_storage(url, create=False))  # a new process opens it

    assert reconcile(study, STALE_AFTER, log=_silent) == [stale.number]
    assert storage_heartbeats(study, STALE_AFTER).beating == set()  # old-style trials get no storage beat
    assert _reconcile_until(study, {recent.number}, timeout=8.0) == [recent.number]  # old rule: 1 s by this clock
    assert study.get_trials(deepcopy=False)[fresh.number].state == TrialState.RUNNING
    _assert_lost_and_retried_once(study, {stale.number, recent.number})


def test_optunas_fail_stale_trials_sees_our_heartbeats(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    study = _study(url, "tool")
    live, dead = _ask(study), _ask(study)
    with Heartbeat(study, dead, INTERVAL):
        pass
    with Heartbeat(study, live, INTERVAL):
        time.sleep(2.1)  # > 1 s grace period in whole seconds
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            tool = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=1)
            optuna.storages.fail_stale_trials(optuna.load_study(study_name="tool", storage=tool))
        states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states == {live.number: TrialState.RUNNING, dead.number: TrialState.FAIL}


# A second worker on the same study whose Python clocks (time.time, time.time_ns, datetime.now /
# utcnow / today) run OFFSET seconds ahead, shifted before optuna and sassha_tune are imported.
# The database's clock is not shifted: PostgreSQL's is the server's; SQLite computes
# CURRENT_TIMESTAMP in its C library from the OS clock, which a Python-level shift does not reach.
WORKER = textwrap.dedent('''
    import datetime, json, sys, time

    OFFSET = float(sys.argv[3])
    _time, _time_ns = time.time, time.time_ns
    time.time = lambda: _time() + OFFSET
    time.time_ns = lambda: _time_ns() + int(OFFSET * 1e9)

    class _Shifted(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return super().now(tz) + datetime.timedelta(seconds=OFFSET)

        @classmethod
        def utcnow(cls):
            return super().utcnow() + datetime.timedelta(seconds=OFFSET)

        @classmethod
        def today(cls):
            return cls.now()

    datetime.datetime = _Shifted

    import optuna
    from sassha_tune.study.liveness import Heartbeat, reconcile
    from sassha_tune.study.storage import open_storage

    url, name, stale_after, interval, duration = sys.argv[1], sys.argv[2], *map(float, sys.argv[4:7])
    study = optuna.load_study(study_name=name, storage=open_storage(url, create=False))
    live, dead = study.ask(), study.ask()
    for t in (live, dead):
        t.suggest_float("x", 0.0, 1.0)
    with Heartbeat(study, dead, interval):
        pass
    with Heartbeat(study, live, interval):
        print(json.dumps({"clock": time.time(), "live": live.number, "dead": dead.number}), flush=True)
        lost, end = [], time.monotonic() + duration
        while time.monotonic() < end:
            lost += reconcile(study, stale_after, log=lambda _: None)
            time.sleep(interval)
        print(json.dumps({"lost": lost}), flush=True)
        sys.stdin.readline()  # keep beating until the test has looked
''')


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_workers_whose_clocks_differ_by_minutes_keep_each_others_trials(tmp_path: Path, backend):
    offset, duration = 600.0, 3.0
    url = f"sqlite:///{tmp_path}/skew.db" if backend == "sqlite" else postgres_url()
    name = f"skew-{uuid.uuid4().hex[:10]}"
    study = _study(url, name)
    script = tmp_path / "skewed_worker.py"
    script.write_text(WORKER)
    other = None
    try:
        live, dead = _ask(study), _ask(study)
        with Heartbeat(study, dead, INTERVAL):
            pass
        with Heartbeat(study, live, INTERVAL):
            other = subprocess.Popen(
                [sys.executable, str(script), url, name, str(offset), str(STALE_AFTER), str(INTERVAL), str(duration)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            first = json.loads(other.stdout.readline() or "{}")
            assert first, "the skewed worker did not start"
            assert abs(first["clock"] - time.time() - offset) < 30  # its clock really is ahead
            lost = _reconcile_until(study, None, timeout=duration)  # runs the whole time
            lost_there = json.loads(other.stdout.readline())["lost"]
            trials = study.get_trials(deepcopy=False)
            assert trials[live.number].state == TrialState.RUNNING  # the skewed worker kept it
            assert trials[first["live"]].state == TrialState.RUNNING  # and this one kept the skewed worker's
            other.stdin.write("\n")
            other.stdin.flush()
            assert other.wait(timeout=30) == 0
        dead_ones = {dead.number, first["dead"]}
        assert sorted(lost + lost_there) == sorted(dead_ones)  # both dead trials lost, each once
        _assert_lost_and_retried_once(study, dead_ones, one_worker=False)
    finally:
        if other is not None and other.poll() is None:
            other.kill()
            other.wait()
        if backend == "postgres":
            optuna.delete_study(study_name=name, storage=url)
