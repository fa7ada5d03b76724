"""A trial cannot hurt the study: a ``task.train`` function's leftover threads and malformed
results stay within its own trial (real trial processes, real SQLite studies; the plug-ins are
tests/plugins_misbehaving.py)."""

from __future__ import annotations

import subprocess
import sys

import optuna
import pytest
import yaml
from optuna.trial import TrialState

import sassha_tune
from sassha_tune.config import config_from_dict
from sassha_tune.study.create import create_or_continue

pytestmark = pytest.mark.slow


def _config(train: str, epochs: int, options: dict, **study) -> dict:
    return {
        "study": {"name": "misbehaving", "objective": "val_acc", "pruner": {"name": "none"}, **study},
        "budget": {"n_trials": 3},
        "task": {"train": train, "epochs": epochs, "train_options": options},
        "optimizer": {"name": "sgd", "search_space": {"params": {
            "lr": {"type": "float", "low": 0.001, "high": 0.5, "log": True}}}},
        "device": "cpu",
    }


def _enqueued(raw: dict, url: str, lrs: list[float]) -> None:
    created = create_or_continue(config_from_dict(raw), url, allow_space_change=False, log=lambda _: None)
    for lr in lrs:
        created.enqueue_trial({"lr": lr})


def test_a_thread_left_reporting_reaches_neither_the_next_trial_nor_its_pruner(tmp_path):
    """Trial 0 returns and leaves a thread calling ``reporter.report`` every 0.05 s; trial 1 runs
    next in the same warm worker and prunes (a pruning job reads a go/stop line per epoch). The
    late calls raise in their thread; trial 1 stores only its own epochs."""
    record = tmp_path / "late.txt"
    raw = _config("plugins_misbehaving:late_reporter", 40,
                  {"leave_thread_above": 0.1, "record": str(record), "epoch_seconds": 0.05},
                  pruner={"name": "median", "options": {"n_startup_trials": 5}})
    raw["budget"]["n_trials"] = 2
    url = f"sqlite:///{tmp_path / 's.db'}"
    _enqueued(raw, url, [0.3, 0.02])
    lines: list[str] = []
    study = sassha_tune.run_study(raw, storage=url, log=lines.append)
    leaver, honest = study.get_trials()
    assert [leaver.state, honest.state] == [TrialState.COMPLETE] * 2, [honest.user_attrs]
    assert sum(line.startswith("warm trial worker") for line in lines) == 1  # one worker ran both
    assert honest.values == [0.02]
    assert set(honest.intermediate_values.values()) == {0.02}  # never the thread's 0.999
    assert [h["epoch"] for h in honest.user_attrs["history"]] == list(range(1, 41))
    # what the thread reported while its own trial ran is that trial's; after it, nothing
    assert set(leaver.intermediate_values.values()) <= {0.999}
    assert record.read_text().startswith("RuntimeError: reporter.report called after its trial ended")


def test_a_fresh_trial_process_held_alive_by_a_thread_ends_and_its_result_counts(tmp_path):
    """With fresh processes, a non-daemon thread left by the function would keep the trial process
    (and the study waiting for it) alive after it sent its result: it is ended, the result kept."""
    raw = _config("plugins_misbehaving:leaves_a_thread", 1, {}, fresh_process=True)
    raw["budget"]["n_trials"] = 2
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    url = f"sqlite:///{tmp_path / 's.db'}"
    _enqueued(raw, url, [0.01, 0.02])
    done = subprocess.run([sys.executable, "-m", "sassha_tune", "run", str(config), "--storage", url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "exiting while threads the trial left are still running (forgotten)" in done.stderr
    trials = optuna.load_study(study_name="misbehaving", storage=url).get_trials()
    assert [(t.state, t.values) for t in trials] == [(TrialState.COMPLETE, [0.01]), (TrialState.COMPLETE, [0.02])]


def test_a_result_that_is_not_metrics_fails_its_own_trial(tmp_path):
    """A string metric or None returned fails that trial with the reason, as an exception does;
    the study goes on to the next trial."""
    raw = _config("plugins_misbehaving:malformed_result", 2,
                  {"returns": {"0.01": "string", "0.02": "none", "0.03": "good"}})
    url = f"sqlite:///{tmp_path / 's.db'}"
    _enqueued(raw, url, [0.01, 0.02, 0.03])
    study = sassha_tune.run_study(raw, storage=url, log=lambda _: None)
    string, none, good = study.get_trials()
    assert [string.state, none.state, good.state] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert string.user_attrs["failure_reason"] == "error: TypeError: task.train: metric 'val_acc' must be a number, got str"
    assert none.user_attrs["failure_reason"] == (
        "error: TypeError: task.train: plugins_misbehaving:malformed_result must return a mapping of metrics, "
        "got NoneType")
    assert string.user_attrs["epochs_completed"] == 1  # what it reported is kept
    assert good.values == [0.03]
