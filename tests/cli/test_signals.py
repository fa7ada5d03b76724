"""Signals that end a run, through the real CLI in a real process: SIGHUP (the terminal closed) is
handled as SIGTERM and Ctrl-C are (the running trial marked ``interrupted`` at once, a line, exit
code 130), sent to the whole process group as a terminal's hangup is; under ``nohup`` (SIGHUP
ignored) the run goes on; a trial whose result had arrived when the signal came is stored with
that result, not as ``interrupted``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import read_until, tiny_config
from optuna.trial import TrialState

from sassha_tune.config import config_from_dict
from sassha_tune.study.create import create_or_continue

pytestmark = pytest.mark.slow

SLOW_TRIALS = tiny_config(  # trials of a few seconds, so that a signal finds one running (their training
    # alone: the warm worker is ready when the first trial starts, its imports no longer pad it)
    "signals", study={"heartbeat_interval": 0.5, "stale_after": 60}, budget={"n_trials": 3},
    task={"model_options": {"hidden": [64]}, "epochs": 16, "batch_size": 32, "max_steps_per_epoch": 400})


def _config(tmp_path: Path, n_trials: int) -> Path:
    d = yaml.safe_load(yaml.safe_dump(SLOW_TRIALS))
    d["budget"]["n_trials"] = n_trials
    p = tmp_path / "signals.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _start(cfg: Path, url: str, cwd: Path, *, hup_ignored: bool = False) -> subprocess.Popen:
    """``run`` in a session of its own (its process group gets the signal, as a terminal's job
    does), with Ctrl-C and SIGHUP at their defaults, or SIGHUP ignored as ``nohup`` leaves it."""

    def dispositions() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN if hup_ignored else signal.SIG_DFL)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "sassha_tune.app.cli", "run", str(cfg), "--storage", url],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=dispositions)


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="signals", storage=url).get_trials(deepcopy=False)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM], ids=["SIGHUP", "SIGTERM"])
def test_a_hangup_or_sigterm_marks_the_running_trial_interrupted_with_a_line(tmp_path, sig):
    url = f"sqlite:///{tmp_path}/s.db"
    proc = _start(_config(tmp_path, 3), url, tmp_path)
    try:
        read_until(proc, "trial 0 started")
        time.sleep(1.0)  # the trial process is training
        os.killpg(proc.pid, sig)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, rest
    assert "trial 0 interrupted: marked FAIL" in rest
    assert rest.rstrip().splitlines()[-1] == f"interrupted ({sig.name})"
    trials = _trials(url)
    assert len(trials) == 1  # marked at once, not left RUNNING until study.stale_after (60 s here)
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["failure_reason"] == "interrupted"


def test_under_nohup_a_hangup_changes_nothing(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    proc = _start(_config(tmp_path, 1), url, tmp_path, hup_ignored=True)
    try:
        read_until(proc, "trial 0 started")
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGHUP)
        rest, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, rest
    assert [t.state for t in _trials(url)] == [TrialState.COMPLETE]


def test_a_sigterm_after_the_result_arrived_stores_the_result(tmp_path):
    """A fresh trial process sends its result and is kept alive a few seconds more by a thread its
    ``task.train`` left (then ended): a SIGTERM to the run in between stores the result that had
    arrived (it was marked ``interrupted``, the result lost)."""
    raw = {"study": {"name": "signals", "objective": "val_acc", "pruner": "none", "fresh_process": True},
           "budget": {"n_trials": 2},
           "task": {"train": "plugins_misbehaving:leaves_a_thread_and_says_so", "epochs": 1},
           "optimizer": {"name": "sgd", "search_space": {"params": {
               "lr": {"type": "float", "low": 0.001, "high": 0.5, "log": True}}}},
           "device": "cpu"}
    cfg = tmp_path / "after.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    url = f"sqlite:///{tmp_path}/s.db"
    create_or_continue(config_from_dict(raw), url, log=lambda _: None).enqueue_trial({"lr": 0.01})
    proc = _start(cfg, url, tmp_path)
    try:
        read_until(proc, "task.train returns its metrics")
        time.sleep(1.0)  # the result has arrived; the process lives on (up to 5 s) for the thread
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, rest
    assert "trial 0 COMPLETE val_acc=0.01 (its outcome came before the interrupt: stored)" in rest
    assert "interrupted: marked FAIL" not in rest
    assert rest.rstrip().splitlines()[-1] == "interrupted (SIGTERM)"
    trials = _trials(url)
    assert [(t.state, t.values) for t in trials] == [(TrialState.COMPLETE, [0.01])]
    assert trials[0].user_attrs["history"] == [] and "failure_reason" not in trials[0].user_attrs
