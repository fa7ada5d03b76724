"""Ctrl-C that lands inside a storage write (study/loop.py's unwinding).

A Ctrl-C is raised wherever the main thread is; about once in twenty it was inside an SQLite
write, whose connection (kept alive by the exception's traceback) held the database's write lock
while the unwinding tried to mark the trial: the run hung for the lock's whole timeout. The
situation is built here exactly, without a signal's timing: a frame that holds an open write
transaction raises KeyboardInterrupt, and the trial must be marked at once. The private context
manager is the unit under test because no public call can put a Ctrl-C inside a write on purpose.
"""

from __future__ import annotations

import sqlite3
import time

import optuna
import pytest
from optuna.trial import TrialState

from sassha_tune.study.loop import _failed_when_unwinding


def _interrupted_inside_a_write(path: str) -> None:
    connection = sqlite3.connect(path, timeout=30)
    connection.execute("BEGIN IMMEDIATE")  # holds the write lock, as the write a Ctrl-C lands in
    raise KeyboardInterrupt


def test_a_ctrl_c_inside_a_write_marks_the_trial_without_waiting_for_its_own_lock(tmp_path):
    path = tmp_path / "w.db"
    study = optuna.create_study(study_name="w", storage=optuna.storages.RDBStorage(
        f"sqlite:///{path}", engine_kwargs={"connect_args": {"timeout": 30}}))
    trial = study.ask()
    lines: list[str] = []
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with _failed_when_unwinding(study, lambda: [trial], [], lines.append, lambda ts: f"{len(ts)} interrupted"):
            _interrupted_inside_a_write(str(path))
    took = time.monotonic() - started
    # without releasing the interrupted frame's connection, marking waits out the 30 s lock timeout
    assert took < 10, f"marking the trial waited {took:.1f} s on the interrupted write's lock"
    (stored,) = study.trials
    assert stored.state == TrialState.FAIL and stored.user_attrs["failure_reason"] == "interrupted"
    assert lines == ["1 interrupted"]
