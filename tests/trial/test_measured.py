"""What every trained trial ends with, and what it measures on the way (trial/measured.py):
sharpness during training (``metrics.track_every``) in the stored history of single trials and
pack members, without changing the training (bitwise), skipped where it runs out of memory."""

from __future__ import annotations

import math

import pytest
from optuna.trial import TrialState

import sassha_tune
from sassha_tune.config import config_from_dict
from sassha_tune.errors import ConfigError
from sassha_tune.metrics.names import TRACKED_EPOCH_KEYS
from sassha_tune.study.create import create_or_continue


def _config(name: str, track_every: int, **task) -> dict:
    return {
        "study": {"name": name, "pruner": "none", "chance_guard": 0,},
        "budget": {"n_trials": 2},
        "task": {"dataset": "mnist1d", "model": "mlp", "model_options": {"hidden": [16]}, "epochs": 4,
                 "batch_size": 64, "max_steps_per_epoch": 3, **task},
        "optimizer": {"name": "sgd", "enqueue_published": False},  # the tests enqueue their own trials
        "metrics": {"subset_size": 64, "track_every": track_every,
                    "budget": {"lambda_max_iters": 3, "trace_probes": 2, "sam_steps": 1}},
        "device": "cpu",
        "seed": 0,
    }


def _untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in ("seconds", *TRACKED_EPOCH_KEYS)} for h in history]


def test_sharpness_during_training_is_stored_every_n_epochs_and_drawn_by_the_report(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"

    def run(name: str, track_every: int):
        cfg = config_from_dict(_config(name, track_every))
        created = create_or_continue(cfg, url, allow_space_change=False, log=lambda _: None)
        for lr in (0.05, 0.2):  # two trials that learn (the report draws trained trials only)
            created.enqueue_trial({"lr": lr, "weight_decay": 1e-4})
        return sassha_tune.run_study(cfg, storage=url, pack=1, log=lambda _: None)

    tracked, plain = run("tracked", 2), run("plain", 0)
    for trial in tracked.trials:
        assert trial.state == TrialState.COMPLETE
        history = trial.user_attrs["history"]
        assert [h["epoch"] for h in history if "track_lambda_max" in h] == [2, 4]  # every 2nd of 4 epochs
        for h in history:
            if h["epoch"] in (2, 4):
                assert h["track_lambda_max"] > 0 and math.isfinite(h["track_hessian_trace"]) and h["track_seconds"] > 0
    assert not any(key in h for t in plain.trials for h in t.user_attrs["history"] for key in TRACKED_EPOCH_KEYS)
    from sassha_tune.report.figures import build_figures
    from sassha_tune.report.html import html_figures

    lines = build_figures(tracked)["sharpness_during_training"].axes[0].get_lines()
    assert sorted(list(line.get_xdata()) for line in lines) == [[2, 4], [2, 4]]
    assert "sharpness_during_training" not in build_figures(plain)
    traces = html_figures(tracked)["Sharpness during training"].data
    assert sorted(list(trace.x) for trace in traces) == [[2, 4], [2, 4]]
    assert "Sharpness during training" not in html_figures(plain)


@pytest.mark.parametrize(("change", "expected"), [
    ({"metrics": {"track_every": 5}}, "metrics.track_every: expected 0 (off) or a number of epochs 1..4 (task.epochs is 4), got 5"),
    ({"metrics": {"track_every": -1}}, "metrics.track_every: expected an integer >= 0, got -1"),
])
def test_track_every_mistakes_name_the_key(change, expected):
    with pytest.raises(ConfigError) as info:
        config_from_dict({**_config("bad", 0), **change}, source="c.yaml")
    assert expected in str(info.value)


def test_track_every_needs_the_built_in_trainer():
    data = _config("own", 1)
    data["task"] = {"train": "plugins_example:own_quadratic", "epochs": 2}
    data["optimizer"] = {"name": "sgd", "search_space": {"params": {"lr": {"type": "float", "low": 0.01, "high": 0.1}}}}
    with pytest.raises(ConfigError, match="metrics.track_every: works with the built-in trainer only"):
        config_from_dict(data, source="c.yaml")


def test_the_live_view_is_told_each_measurement_during_training(tmp_path):
    from sassha_tune.study.progress import StudyObserver

    class Seen(StudyObserver):
        def __init__(self) -> None:
            self.events: list[tuple] = []

        def epoch(self, number, epoch, metrics):
            self.events.append(("epoch", epoch, "track_lambda_max" in metrics))

        def phase(self, number, name):
            self.events.append(("phase", name))

    data = _config("seen", 2)
    data["budget"]["n_trials"] = 1
    seen = Seen()
    sassha_tune.run_study(config_from_dict(data), storage=f"sqlite:///{tmp_path / 's.db'}", pack=1,
                          observer=seen, log=lambda _: None)
    # epochs 2 and 4 measure before they report; then the final measurement
    assert seen.events == [("epoch", 1, False), ("phase", "sharpness"), ("epoch", 2, True), ("epoch", 3, False),
                           ("phase", "sharpness"), ("epoch", 4, True), ("phase", "sharpness")]


def test_a_measurement_that_runs_out_of_memory_is_skipped_and_the_trial_trains_on(tmp_path):
    data = _config("oom", 2, model="plugins_example:oom_when_measured", model_options={})
    data["budget"]["n_trials"] = 1
    data["metrics"]["sharpness"] = False  # the final measurement would run out of memory too
    study = sassha_tune.run_study(config_from_dict(data), storage=f"sqlite:///{tmp_path / 's.db'}", pack=1,
                                  log=lambda _: None)
    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["epochs_completed"] == 4
    history = trial.user_attrs["history"]
    assert [h.get("track_error") for h in history] == [None, "out_of_memory", None, "out_of_memory"]
    assert not any("track_lambda_max" in h for h in history)


def test_sharpness_during_training_changes_no_training_with_dropout_batchnorm_augmentation_and_sassha(tmp_path):
    """What the measurement must put back for dropout and BatchNorm to train on as before: the
    modules' training flags (it measures in eval mode; without their restore this test fails), the
    parameters and buffers. It draws from private generators only, so the global one (dropout),
    SASSHA's probes and the augmentation's stay untouched. Single trials and a pack (SASSHA packs
    run exact kernels: bitwise a lone run on the CPU)."""
    url = f"sqlite:///{tmp_path / 's.db'}"

    def run(name: str, track_every: int, pack: int):
        data = _config(name, track_every, dataset="digits", model="wrn10_1", model_options={"dropout": 0.3},
                       augment=True, batch_size=32, epochs=2)
        data["optimizer"] = {"name": "sassha", "enqueue_published": False}
        cfg = config_from_dict(data)
        created = create_or_continue(cfg, url, allow_space_change=False, log=lambda _: None)
        for lr in (0.05, 0.1):
            created.enqueue_trial({"lr": lr, "rho": 0.05, "lazy_hessian": 2, "weight_decay": 1e-4, "eps": 1e-4})
        return sassha_tune.run_study(cfg, storage=url, pack=pack, log=lambda _: None)

    for pack in (1, 2):
        tracked, plain = run(f"tracked{pack}", 1, pack), run(f"plain{pack}", 0, pack)
        for t, p in zip(tracked.trials, plain.trials, strict=True):
            assert t.state == p.state == TrialState.COMPLETE and t.params == p.params
            assert [h["epoch"] for h in t.user_attrs["history"] if "track_lambda_max" in h] == [1, 2]
            assert _untimed(t.user_attrs["history"]) == _untimed(p.user_attrs["history"])
            assert t.values == p.values and t.user_attrs["lambda_max"] == p.user_attrs["lambda_max"]
