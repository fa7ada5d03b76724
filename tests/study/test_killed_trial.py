"""A trial process killed by SIGKILL while its coordinator lives: the trial is ``lost`` and its
params are retried once, as the README promises (real CLI, real trial processes, real SQLite)."""

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
from optuna.trial import TrialState

from sassha_tune.study.budget import budget_used

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, n_trials: int = 3) -> Path:
    cfg = {
        # no pruner: every trial that is not killed completes (what the assertions count)
        "study": {"name": "killed", "heartbeat_interval": 0.5, "stale_after": 5.0, "pruner": "none"},
        "budget": {"n_trials": n_trials},
        "task": {"dataset": "mnist1d", "model": "mlp", "model_options": {"hidden": [512, 512]},
                 "epochs": 2, "batch_size": 64},  # long enough (a few seconds) to be killed while it trains
        "optimizer": {"name": "sgd", "search_space": {
            "params": {"lr": {"type": "float", "low": 0.01, "high": 0.5, "log": True}}}},
        "metrics": {"sharpness": False},
        "device": "cpu",
        "seed": 0,
    }
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _trial_child(parent: int, timeout: float = 60) -> int:
    """The pid of ``parent``'s ``python -m sassha_tune.trial`` child, once it runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == parent and b"sassha_tune.trial" in cmd:
                return int(entry.name)
        time.sleep(0.05)
    raise AssertionError("no trial process in time")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the trial process through /proc")
@pytest.mark.parametrize("mode", ["--fresh-process", ""])
def test_a_trial_process_killed_by_sigkill_is_lost_and_retried_once(tmp_path, mode):
    url = f"sqlite:///{tmp_path}/k.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sassha_tune.app.cli", "run", str(_config(tmp_path)), "--storage", url,
                             "--pack", "1", *([mode] if mode else [])],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "trial 1 started" in line:
            break
    child = _trial_child(proc.pid)  # a warm worker may not have read the job yet: lost all the same
    os.kill(child, signal.SIGKILL)
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) == 0, out
    assert "trial 1 lost (trial process killed by SIGKILL): marked FAIL, params enqueued for a retry" in out
    trials = sorted(optuna.load_study(study_name="killed", storage=url).trials, key=lambda t: t.number)
    lost = trials[1]
    assert lost.state == TrialState.FAIL and lost.user_attrs["failure_reason"] == "lost"
    retries = [t for t in trials if t.user_attrs.get("retry_of") == 1]
    assert len(retries) == 1 and retries[0].params == lost.params and retries[0].state == TrialState.COMPLETE
    assert retries[0].user_attrs["retry_history"] == [1]
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert budget_used(trials) == 3  # the lost trial does not count
    if mode == "":  # the killed (warm) worker is replaced by a new one, which runs the rest
        assert f"(replacing worker {child} after killed by signal 9)" in out


def test_a_lost_retry_of_a_retry_is_not_retried_again(tmp_path):
    """The retry rule is the reconciliation's: at most MAX_RETRY_DEPTH retries deep."""
    from sassha_tune.study.liveness import MAX_RETRY_DEPTH, retry_lost

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/r.db", study_name="r")
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    trial.set_user_attr("retry_history", list(range(MAX_RETRY_DEPTH)))
    frozen = study.tell(trial, state=TrialState.FAIL)
    lines: list[str] = []
    assert retry_lost(study, frozen, "trial process killed by SIGKILL", log=lines.append) is False
    assert lines == [f"trial {frozen.number} lost (trial process killed by SIGKILL); not retried again"]
    assert [t.state for t in study.trials] == [TrialState.FAIL]


def test_ctrl_c_with_a_warm_worker_marks_the_trial_interrupted_and_leaves_no_process(tmp_path):
    url = f"sqlite:///{tmp_path}/i.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sassha_tune.app.cli", "run", str(_config(tmp_path, n_trials=5)),
                             "--storage", url, "--pack", "1"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            # Ctrl-C as on a terminal, even when this session runs in the background
                            # (which hands SIGINT on as ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout is not None
    for line in proc.stdout:
        if "trial 1 started" in line:
            break
    worker = _trial_child(proc.pid)
    proc.send_signal(signal.SIGINT)
    out = proc.stdout.read()
    assert proc.wait(timeout=60) == 130, out
    trials = sorted(optuna.load_study(study_name="killed", storage=url).trials, key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert trials[1].user_attrs["failure_reason"] == "interrupted"
    assert budget_used(trials) == 1
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:  # reaped by the coordinator
        time.sleep(0.05)
    assert not Path(f"/proc/{worker}").exists()
