"""Pruning on the per-epoch validation metric and budget.timeout, through the real CLI and SQLite."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from sassha_tune.app.cli import app

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, **overrides) -> Path:
    cfg = {
        "study": {
            "name": "prune",
            "storage": f"sqlite:///{tmp_path / 'prune.db'}",
            "pruner": {"name": "median", "options": {"n_startup_trials": 1, "n_warmup_steps": 0}},
        },
        "budget": {"n_trials": 2},
        "task": {
            "dataset": "mnist1d",
            "model": "mlp",
            "model_options": {"hidden": [64]},
            "epochs": 3,
            "batch_size": 64,
            "max_steps_per_epoch": 30,
        },
        # Two enqueued configurations with a known order: lr 0.1 learns, lr 1e-7 cannot move
        # the weights in 30 steps, so after epoch 1 it is below the first trial's curve.
        "optimizer": {
            "name": "sgd",
            "enqueue_published": True,
            "search_space": {
                "params": {"lr": {"type": "float", "low": 1e-7, "high": 0.5, "log": True}},
                "published": [{"lr": 0.1}, {"lr": 1e-7}],
            },
        },
        "metrics": {"sharpness": False},
        "device": "cpu",
        "seed": 0,
    }
    for key, value in overrides.items():
        cfg[key] = {**cfg[key], **value}
    path = tmp_path / "prune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(args: list[str]):
    result = CliRunner(env={"OMP_NUM_THREADS": "1"}).invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def test_median_pruner_stops_the_trial_below_the_median_after_its_first_epoch(tmp_path):
    _run(["run", str(_config(tmp_path))])
    study = optuna.load_study(study_name="prune", storage=f"sqlite:///{tmp_path / 'prune.db'}")
    first, second = sorted(study.trials, key=lambda t: t.number)
    assert first.state == TrialState.COMPLETE and first.params["lr"] == pytest.approx(0.1)
    assert first.user_attrs["epochs_completed"] == 3
    assert second.state == TrialState.PRUNED and second.params["lr"] == pytest.approx(1e-7)
    assert second.user_attrs["epochs_completed"] == 1
    # The pruner saw one intermediate value per epoch of the first trial.
    assert sorted(first.intermediate_values) == [1, 2, 3]
    assert second.intermediate_values[1] < first.intermediate_values[1]


def test_budget_timeout_starts_no_new_trial_after_it_expires(tmp_path):
    cfg = _config(tmp_path, budget={"n_trials": 5, "timeout": 0.5}, study={"pruner": "none"})
    _run(["run", str(cfg)])
    study = optuna.load_study(study_name="prune", storage=f"sqlite:///{tmp_path / 'prune.db'}")
    started = [t for t in study.trials if t.state != TrialState.WAITING]  # the 2nd published config waits
    assert [t.state for t in started] == [TrialState.COMPLETE]
