"""The chance guard (``study.chance_guard``): real trial processes, real SQLite, real training.

Two enqueued configurations of a tiny MNIST-1D task: lr 0.1 learns within an epoch, lr 1e-7 cannot
move the weights (validation accuracy stays near 1/10)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from conftest import untimed
from optuna.trial import TrialState

from sassha_tune.app.api import run_study
from sassha_tune.config import load_config
from sassha_tune.errors import ConfigError
from sassha_tune.metrics.chance import near_chance_threshold
from sassha_tune.report.health import near_chance_threshold as report_threshold


def _config(tmp_path: Path, study: dict | None = None, task: dict | None = None, **top) -> Path:
    cfg = {
        # no pruner: the guard alone decides (successive halving, the default, would stop lr 1e-7 first)
        "study": {"name": "guard", "storage": f"sqlite:///{tmp_path / 'guard.db'}", "pruner": "none", **(study or {})},
        "budget": {"n_trials": 2},
        "task": {"dataset": "mnist1d", "model": "mlp", "model_options": {"hidden": [64]}, "epochs": 4,
                 "batch_size": 64, "max_steps_per_epoch": 30, **(task or {})},
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
        **top,
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "guard.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _study(path: Path, pack: int = 1) -> optuna.Study:
    return run_study(path, log=lambda _line: None, pack=pack)


def test_the_guard_and_the_report_share_one_rule():
    assert report_threshold is near_chance_threshold


def test_a_trial_near_chance_is_pruned_at_the_guard_epoch_and_a_learning_trial_completes(tmp_path):
    on = sorted(_study(_config(tmp_path / "on", {"chance_guard": 2})).trials, key=lambda t: t.number)
    off = sorted(_study(_config(tmp_path / "off", {"chance_guard": 0})).trials, key=lambda t: t.number)
    learns, stuck = on
    assert learns.state == TrialState.COMPLETE and learns.params["lr"] == pytest.approx(0.1)
    assert "prune_reason" not in learns.user_attrs
    assert stuck.state == TrialState.PRUNED and stuck.params["lr"] == pytest.approx(1e-7)
    assert stuck.user_attrs["prune_reason"] == "near_chance"
    assert stuck.user_attrs["epochs_completed"] == 2
    assert [h["epoch"] for h in stuck.user_attrs["history"]] == [1, 2]
    assert stuck.user_attrs["history"][-1]["val_acc"] <= near_chance_threshold(10)
    assert "sharpness_seconds" not in stuck.user_attrs and "test_acc" not in stuck.user_attrs
    # Off: today's behaviour, both complete; the learning trial is the same either way.
    assert [t.state for t in off] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert off[1].user_attrs["epochs_completed"] == 4 and "prune_reason" not in off[1].user_attrs
    assert off[0].values == learns.values
    assert untimed(off[0].user_attrs) == untimed(learns.user_attrs)
    assert untimed(off[1].user_attrs["history"][:2]) == untimed(stuck.user_attrs["history"])


def test_the_guard_stops_a_pack_member_too(tmp_path):
    trials = sorted(_study(_config(tmp_path, {"chance_guard": 1}, {"epochs": 2}), pack=2).trials, key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert trials[1].user_attrs["prune_reason"] == "near_chance" and trials[1].user_attrs["epochs_completed"] == 1
    assert trials[0].user_attrs["pack_size"] == 2


@pytest.mark.parametrize(
    ("epochs", "guard", "after"),
    [(10, "auto", 2), (20, "auto", 4), (11, "auto", 3), (2, "auto", 2), (10, 0, None), (10, 5, 5)],
)
def test_the_epoch_the_guard_starts_at(tmp_path, epochs, guard, after):
    cfg = load_config(_config(tmp_path, {"chance_guard": guard}, {"epochs": epochs}))
    assert cfg.chance_guard_after == after


def test_the_default_never_judges_a_two_epoch_trial(tmp_path):
    """auto starts at epoch 2 at the earliest and the last epoch is never judged: the tiny two-epoch
    trials of the characterization test (and any study of 1 or 2 epochs) are never stopped."""
    from sassha_tune.study.chance_guard import ChanceGuard

    guard = ChanceGuard(load_config(_config(tmp_path, task={"epochs": 2})))
    assert not guard.active
    assert not guard.stops(2, {"val_acc": 0.0, "num_classes": 10})
    three = ChanceGuard(load_config(_config(tmp_path, task={"epochs": 3})))
    assert three.stops(2, {"val_acc": 0.1, "num_classes": 10})
    assert not three.stops(2, {"val_acc": 0.16, "num_classes": 10})
    assert not three.stops(1, {"val_acc": 0.1, "num_classes": 10}) and not three.stops(3, {"val_acc": 0.1, "num_classes": 10})
    assert not three.stops(2, {"val_acc": 0.1})  # no num_classes (language models, task.train): never judged


@pytest.mark.parametrize(
    ("value", "task", "message"),
    [
        ("sometimes", {}, "study.chance_guard: expected 'auto', 0 (off) or the epoch after which"),
        (-1, {}, "study.chance_guard: expected 'auto', 0 (off)"),
        (True, {}, "study.chance_guard: expected 'auto', 0 (off)"),
        (4, {}, "study.chance_guard: expected 'auto', 0 (off) or an epoch before the last (1..3; task.epochs is 4)"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(tmp_path, value, task, message):
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path, {"chance_guard": value}, task))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_chance_guard_with_task_train_is_refused(tmp_path):
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump({"study": {"chance_guard": 2}, "task": {"train": "plugins_example:own_quadratic", "epochs": 3},
                                    "optimizer": {"name": "sgd", "fixed": {"lr": 0.1}}, "device": "cpu"}))
    with pytest.raises(ConfigError, match="study.chance_guard: works with the built-in trainer only"):
        load_config(path)


def test_the_report_counts_the_trials_the_guard_stopped():
    from sassha_tune.report.health import budget_health
    from sassha_tune.study.records import TrialRecord

    rows = [TrialRecord(i, state, {}, None, attrs) for i, (state, attrs) in enumerate([
        ("PRUNED", {"prune_reason": "near_chance", "num_classes": 10}),
        ("PRUNED", {}),
        ("COMPLETE", {"val_acc": 0.9, "num_classes": 10}),
    ])]
    health = budget_health(rows)
    assert (health["pruned"], health["pruned_near_chance"], health["near_chance"]) == (2, 1, 0)
