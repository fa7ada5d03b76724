"""``task.train``: a study driven by the user's own training function, through the real trial
processes and a real SQLite study (sassha_tune.run_study)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from optuna.trial import TrialState
from plugins_example import quadratic_x

import sassha_tune
from sassha_tune.config import config_from_dict
from sassha_tune.errors import UserError
from sassha_tune.study.create import create_or_continue

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytestmark = pytest.mark.slow


def _own(**over):
    cfg = {
        "study": {"name": "own", "objective": "val_acc",
                  "pruner": {"name": "median", "options": {"n_startup_trials": 1, "n_warmup_steps": 0}}},
        "budget": {"n_trials": 3},
        "task": {"train": "plugins_example:own_quadratic", "epochs": 3},
        "optimizer": {"name": "sassha", "fixed": {"lazy_hessian": 1, "rho": 0.01}, "search_space": {"params": {
            "lr": {"type": "float", "low": 0.001, "high": 0.5, "log": True},
            "weight_decay": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}}}},
        "metrics": {"subset_size": 1000, "budget": {"lambda_max_iters": 20, "lambda_tol": 1e-7, "trace_probes": 4,
                                                     "sam_steps": 2}},
        "device": "cpu",
    }
    for key, value in over.items():
        cfg[key] = {**cfg[key], **value} if isinstance(cfg.get(key), dict) else value
    return cfg


def test_a_study_of_your_own_training_function(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = config_from_dict(_own())
    # the first trial high, the second low: the median pruner (one startup trial) stops the second
    created = create_or_continue(cfg, url, allow_space_change=False, log=lambda _: None)
    created.enqueue_trial({"lr": 0.4, "weight_decay": 1e-4})
    created.enqueue_trial({"lr": 0.002, "weight_decay": 1e-4})
    created.enqueue_trial({"lr": 0.45, "weight_decay": 1e-3})  # above the median: goes on
    study = sassha_tune.run_study(cfg, storage=url, log=lambda _: None)
    t0, t1, t2 = study.get_trials()
    assert [t.state for t in (t0, t1, t2)] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    # the objective is what the function returned; every epoch it reported is an intermediate value
    assert t0.values == [0.4] and t0.intermediate_values == {1: 0.4, 2: 0.4, 3: 0.4}
    assert t1.intermediate_values == {1: 0.002} and t1.user_attrs["epochs_completed"] == 1
    assert [h["epoch"] for h in t0.user_attrs["history"]] == [1, 2, 3]
    # the function got the constructor's convention: sassha's decoupled weight decay is wd / lr
    assert t0.user_attrs["wd_given"] == pytest.approx(1e-4 / 0.4, rel=1e-12)
    assert t0.user_attrs["optimizer_is"] == 1.0
    # sharpness on the batch it gave: mean squared error of a linear map has Hessian 2/n X^T X
    x = quadratic_x().double()
    exact = torch.linalg.eigvalsh(2 / len(x) * x.T @ x)
    assert t0.user_attrs["lambda_max"] == pytest.approx(exact.max().item(), rel=1e-4)
    assert t0.user_attrs["hessian_trace"] == pytest.approx(exact.sum().item(), rel=0.5)  # 4 probes: an estimate
    assert t0.user_attrs["sharpness_protocol"]["subset_size"] == len(x)  # subset_size 1000 > 64: all of it


def test_accuracies_without_num_classes_get_one_warning(tmp_path):
    """own_quadratic returns val_acc (= lr) and no num_classes: nothing can tell whether a trial
    stayed at chance, and the user is told so once per run, not once per trial."""
    lines: list[str] = []
    sassha_tune.run_study(_own(), storage=f"sqlite:///{tmp_path / 's.db'}", n_trials=2, log=lines.append)
    warnings = [line for line in lines if line.startswith("warning:")]
    assert warnings == ["warning: task.train plugins_example:own_quadratic returns accuracies without num_classes "
                        "(trial 0): a trial that stayed at chance counts as trained, and the chance guard cannot "
                        "stop it; return num_classes with the metrics (and in reporter.report) to fix this"]


def test_a_failing_function_fails_only_its_trial(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = config_from_dict(_own(task={"train": "plugins_example:own_quadratic", "epochs": 2,
                                      "train_options": {"fail_above": 0.1}},
                                study={"name": "own", "objective": "val_acc"}))
    created = create_or_continue(cfg, url, allow_space_change=False, log=lambda _: None)
    created.enqueue_trial({"lr": 0.2, "weight_decay": 1e-4})
    created.enqueue_trial({"lr": 0.05, "weight_decay": 1e-4})
    study = sassha_tune.run_study(cfg, storage=url, n_trials=2, log=lambda _: None)
    failed, done = study.get_trials()
    assert failed.state == TrialState.FAIL and done.state == TrialState.COMPLETE
    assert failed.user_attrs["failure_reason"] == "error: ValueError: lr 0.2 too large for this test"
    assert failed.user_attrs["epochs_completed"] == 2  # what it reported before failing is kept


def test_the_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(EXAMPLES), os.environ["PYTHONPATH"]]))  # the trials' too
    raw = yaml.safe_load((EXAMPLES / "own_loop.yaml").read_text())
    lines: list[str] = []
    study = sassha_tune.run_study(raw, storage=f"sqlite:///{tmp_path / 'e.db'}", n_trials=2, log=lines.append)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert not [line for line in lines if "num_classes" in line]  # the example returns it
    assert all(0 <= t.values[0] <= 1 and t.user_attrs["lambda_max"] > 0 for t in trials)
    assert len(trials[0].intermediate_values) == raw["task"]["epochs"]


@pytest.mark.parametrize("change, key, expected", [
    ({"task": {"train": "plugins_example:own_quadratic", "dataset": "mnist1d"}}, "task.dataset",
     "is not used with task.train"),
    ({"task": {"train": "not a plug-in"}}, "task.train", "a package.module:function plug-in"),
    ({"schedule": {"name": "cosine"}}, "schedule", "is not used with task.train"),
    ({"device": {"name": "cpu", "processes": 2}}, "device.processes", "must be 1 with task.train"),
])
def test_config_mistakes_name_the_key(change, key, expected):
    with pytest.raises(UserError) as info:
        config_from_dict(_own(**change))
    assert f"{key}: " in str(info.value) and expected in str(info.value)


def test_a_missing_function_costs_no_study(tmp_path):
    db = tmp_path / "s.db"
    with pytest.raises(UserError, match=r"task.train: plug-in 'plugins_example:no_such_train': .* has no attribute"):
        sassha_tune.run_study(_own(task={"train": "plugins_example:no_such_train"}), storage=f"sqlite:///{db}")
    assert not db.exists()


def test_a_trial_past_its_timeout_is_stopped_and_its_worker_replaced(tmp_path):
    """budget.trial_timeout: a hung trial fails with ``timeout`` (counted, not retried), what it
    reported is kept, and the warm worker it hung is replaced for the next trial."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = config_from_dict(_own(task={"train": "plugins_example:own_quadratic", "epochs": 2,
                                      "train_options": {"hang_above": 0.1}},
                                budget={"n_trials": 3, "trial_timeout": 4},
                                study={"name": "own", "objective": "val_acc", "pruner": {"name": "none"}}))
    created = create_or_continue(cfg, url, allow_space_change=False, log=lambda _: None)
    created.enqueue_trial({"lr": 0.05, "weight_decay": 1e-4})  # warms the worker up
    created.enqueue_trial({"lr": 0.2, "weight_decay": 1e-4})  # hangs after its first epoch
    created.enqueue_trial({"lr": 0.06, "weight_decay": 1e-4})  # in a new worker
    lines: list[str] = []
    study = sassha_tune.run_study(cfg, storage=url, log=lines.append)
    before, hung, after = study.get_trials()
    assert hung.state == TrialState.FAIL and hung.user_attrs["failure_reason"] == "timeout"
    assert [h["epoch"] for h in hung.user_attrs["history"]] == [1] and hung.intermediate_values == {1: 0.2}
    assert [before.state, after.state] == [TrialState.COMPLETE] * 2 and after.values == [0.06], after.user_attrs
    assert len(study.get_trials()) == 3  # a timeout is not retried, and it counts toward the budget
    assert "trial 1 stopped: it ran past budget.trial_timeout (4 s)" in lines
    workers = [line for line in lines if line.startswith("warm trial worker")]
    assert len(workers) == 2 and workers[1].endswith("after the trial timeout)"), workers


def test_a_warm_worker_puts_back_what_a_trial_changed_in_the_process(tmp_path):
    """The first trial sets the default dtype to float64, autocast, anomaly detection, deterministic
    algorithms, the thread count and the matmul precision, and leaves them so; the next trial in
    the same warm worker sees what a fresh process shows."""
    # read in the trials, never here: this process's torch settings are the earlier tests'
    from plugins_example import PROCESS_STATE_KEYS

    url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = config_from_dict(_own(task={"train": "plugins_example:own_quadratic", "epochs": 1,
                                      "train_options": {"spoil_above": 0.1}},
                                budget={"n_trials": 2},
                                study={"name": "own", "objective": "val_acc", "pruner": {"name": "none"}}))
    created = create_or_continue(cfg, url, allow_space_change=False, log=lambda _: None)
    created.enqueue_trial({"lr": 0.2, "weight_decay": 1e-4})  # spoils the process after training
    created.enqueue_trial({"lr": 0.05, "weight_decay": 1e-4})
    lines: list[str] = []
    study = sassha_tune.run_study(cfg, storage=url, log=lines.append)
    spoiler, after = study.get_trials()
    assert [t.state for t in (spoiler, after)] == [TrialState.COMPLETE] * 2
    assert sum(line.startswith("warm trial worker") for line in lines) == 1  # both in one worker
    fresh = {k: spoiler.user_attrs[f"state_{k}"] for k in PROCESS_STATE_KEYS}
    assert fresh["default_dtype_bytes"] == 4.0 and fresh["autocast_cpu"] == 0.0 and fresh["anomaly"] == 0.0
    assert {k: after.user_attrs[f"state_{k}"] for k in PROCESS_STATE_KEYS} == fresh
