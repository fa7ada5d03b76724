"""What every trained trial ends with, and what it measures on the way (trial/measured.py):
sharpness during training (``metrics.track_every``) in the stored history of single trials and
pack members, without changing the training."""

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
        "optimizer": {"name": "sgd"},
        "metrics": {"subset_size": 64, "track_every": track_every,
                    "budget": {"lambda_max_iters": 3, "trace_probes": 2, "sam_steps": 1}},
        "device": "cpu",
        "seed": 0,
    }


def _untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in ("seconds", *TRACKED_EPOCH_KEYS)} for h in history]


def test_sharpness_during_training_is_stored_every_n_epochs_and_changes_no_training(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"

    def run(name: str, track_every: int, pack: int):
        cfg = config_from_dict(_config(name, track_every))
        created = create_or_continue(cfg, url, allow_space_change=False, log=lambda _: None)
        for lr in (0.05, 0.2):  # the same two trials in every study
            created.enqueue_trial({"lr": lr, "weight_decay": 1e-4})
        return sassha_tune.run_study(cfg, storage=url, pack=pack, log=lambda _: None)

    tracked, plain, packed = run("tracked", 2, 1), run("plain", 0, 1), run("packed", 2, 2)
    for study in (tracked, plain, packed):
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert packed.trials[0].user_attrs["pack_size"] == 2
    for t, p, k in zip(tracked.trials, plain.trials, packed.trials, strict=True):
        assert t.params == p.params == k.params
        for trial in (t, k):
            history = trial.user_attrs["history"]
            measured = [h["epoch"] for h in history if "track_lambda_max" in h]
            assert measured == [2, 4]  # every 2nd of 4 epochs, nothing on the others
            for h in history:
                if h["epoch"] in measured:
                    assert h["track_lambda_max"] > 0 and math.isfinite(h["track_hessian_trace"]) and h["track_seconds"] > 0
        # the measurement puts the model and the generators back exactly: the same training,
        # bitwise, and the same final values as without it
        assert _untimed(t.user_attrs["history"]) == _untimed(p.user_attrs["history"])
        assert t.values == p.values and t.user_attrs["lambda_max"] == p.user_attrs["lambda_max"]
        assert not any(key in h for h in p.user_attrs["history"] for key in TRACKED_EPOCH_KEYS)
    # the report draws it where trials measured it
    from sassha_tune.report.figures import build_figures

    figures = build_figures(tracked)
    lines = figures["sharpness_during_training"].axes[0].get_lines()
    assert sorted(list(line.get_xdata()) for line in lines) == [[2, 4], [2, 4]]
    assert "sharpness_during_training" not in build_figures(plain)
    from sassha_tune.report.html import html_figures

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
