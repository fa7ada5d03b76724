"""A worker paused (SIGSTOP) for longer than ``study.stale_after`` finds, when it goes on
(SIGCONT), that another process failed its trial as lost and retried it: it says so in one line and
goes on with the study (it exited with "trial#0 has already finished and can not be updated").

A real ``sassha-tune run`` process with short heartbeat settings; this test process is the
other one: it reconciles the study while the worker is stopped."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import read_until, tiny_config
from optuna.trial import TrialState

from sassha_tune.study.budget import budget_used
from sassha_tune.study.liveness import reconcile
from sassha_tune.study.storage import open_storage

pytestmark = pytest.mark.slow

STALE_AFTER = 1.5
CONFIG = tiny_config(  # trials of a few seconds, so that the pause finds one running
    "paused", study={"heartbeat_interval": 0.2, "stale_after": STALE_AFTER},
    task={"model_options": {"hidden": [64]}, "epochs": 4, "batch_size": 32, "max_steps_per_epoch": 400})
TWO_OBJECTIVES = ["val_acc", {"metric": "train_loss", "direction": "minimize"}]  # nothing reported per epoch


def _config(tmp_path: Path, objectives: list | None = None, n_trials: int = 1) -> Path:
    d = yaml.safe_load(yaml.safe_dump(CONFIG))
    d["budget"]["n_trials"] = n_trials
    if objectives is not None:
        d["study"]["objectives"] = objectives
    p = tmp_path / "paused.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _stop_outside_a_write(stop, db: Path) -> None:
    """SIGSTOP the run where it holds no lock on the SQLite file. A process paused inside a read
    or a write keeps its lock, and every other process's write waits on it, this test's takeover
    included (it hung until the job was killed): on SQLite that is what a paused worker does to a
    study, and why shared studies belong on PostgreSQL. The test is about what the paused worker
    does when it wakes, so it pauses it between storage calls: pause, check that an exclusive
    transaction can start, else let it run a moment and try again."""
    for _ in range(100):
        stop(signal.SIGSTOP)
        check = sqlite3.connect(db, timeout=0)
        try:
            check.execute("BEGIN EXCLUSIVE")
            check.rollback()
            return
        except sqlite3.OperationalError:  # locked by the paused run
            stop(signal.SIGCONT)
            time.sleep(0.02)
        finally:
            check.close()
    raise AssertionError("the run held a lock on its SQLite file at each of 100 pauses")


def _paused_and_taken_over(tmp_path: Path, cfg: Path, *, group: bool, started: str, lost: list[int],
                           extra: tuple[str, ...] = ()) -> tuple[str, list[optuna.trial.FrozenTrial]]:
    """Run ``cfg``; once ``started`` is printed, stop the worker (its process group, or the worker
    alone), take trials ``lost`` over from this process (reconcile, as another worker would), let
    it go on; (its whole output, the study's trials at the end). It must exit 0."""
    url = f"sqlite:///{tmp_path}/p.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sassha_tune.app.cli", "run", str(cfg), "--storage", url, *extra],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    stop = (lambda sig: os.killpg(proc.pid, sig)) if group else proc.send_signal
    try:
        before = read_until(proc, started)
        time.sleep(0.5)
        _stop_outside_a_write(stop, tmp_path / "p.db")
        study = optuna.load_study(study_name="paused", storage=open_storage(url))
        deadline, failed = time.monotonic() + 60, []
        while sorted(failed) != lost:  # this process takes them over
            assert time.monotonic() < deadline, (
                f"trials {lost} never went stale ({failed}): {[(t.number, t.state.name) for t in study.get_trials()]}")
            failed += reconcile(study, STALE_AFTER, log=lambda _: None)
            time.sleep(0.2)
        stop(signal.SIGCONT)
        rest, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = "\n".join(before) + "\n" + rest
    assert proc.returncode == 0, output
    assert "already finished" not in output and "Traceback" not in output
    return output, optuna.load_study(study_name="paused", storage=url).get_trials()


def _taken_over_line(number: int) -> str:
    return (f"trial {number} was taken over by another process: this process went without a heartbeat for more "
            f"than study.stale_after ({STALE_AFTER:g} s; paused, asleep or cut off from the storage), so it was "
            "failed as lost and its parameters retried; this process drops its run of it and goes on")


def _assert_lost_and_retried(trials: list[optuna.trial.FrozenTrial], number: int) -> None:
    lost = trials[number]
    assert lost.state == TrialState.FAIL and lost.user_attrs["failure_reason"] == "lost"
    assert "val_acc" not in lost.user_attrs  # the paused worker wrote nothing onto the trial taken over
    retry = [t for t in trials if t.user_attrs.get("retry_of") == number]
    assert len(retry) == 1 and retry[0].params == lost.params and retry[0].state == TrialState.COMPLETE


@pytest.mark.parametrize(("group", "objectives"), [(True, None), (False, TWO_OBJECTIVES)],
                         ids=["group-reported-epochs", "coordinator-result-told"])
def test_a_worker_paused_past_stale_after_says_its_trial_was_taken_over_and_goes_on(tmp_path, group, objectives):
    """``group``: the worker and its trial process stopped (Ctrl-Z stops a job so); the first
    write it tries is an epoch's report. Else only the worker stopped, its trial process trains
    on; with two objectives nothing is reported per epoch, so the first write it tries is telling
    the result."""
    output, trials = _paused_and_taken_over(tmp_path, _config(tmp_path, objectives), group=group,
                                            started="trial 0 started", lost=[0])
    assert [line for line in output.splitlines() if line.startswith("trial 0 was taken over")] == [
        _taken_over_line(0)], output
    assert "trial 0 FAIL" not in output  # the one line says it
    assert "replacing worker" in output and "after its trial was taken over" in output  # its job was cut short
    _assert_lost_and_retried(trials, 0)
    assert len(trials) == 2 and budget_used(trials) == 1  # the worker went on and ran the retry
    assert "budget reached (1/1 trials)" in output


def test_a_paused_pack_says_each_member_was_taken_over_and_goes_on(tmp_path):
    output, trials = _paused_and_taken_over(tmp_path, _config(tmp_path, n_trials=2), group=True,
                                            started="(pack member 1)", lost=[0, 1], extra=("--pack", "2"))
    assert [line for line in output.splitlines() if " was taken over" in line] == [
        _taken_over_line(0), _taken_over_line(1)], output
    for number in (0, 1):
        _assert_lost_and_retried(trials, number)
    assert len(trials) == 4 and budget_used(trials) == 2
