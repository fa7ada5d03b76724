"""``study.callbacks`` and ``run_study(callbacks=...)``: told of every finished trial, through a real
study on SQLite; one real tracker (MLflow on a local SQLite store) when its extra is installed."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from optuna.trial import TrialState

import sassha_tune
from sassha_tune.errors import UserError

pytestmark = pytest.mark.slow


def _cfg(callbacks, name="cb"):
    return {
        "study": {"name": name, "objective": "val_acc", "callbacks": callbacks},
        "budget": {"n_trials": 2},
        "task": {"dataset": "synthetic", "dataset_options": {"n": 200, "n_test": 50, "dim": 8},
                 "model": "mlp", "model_options": {"hidden": [8]}, "epochs": 1, "batch_size": 50},
        "optimizer": {"name": "sgd", "search_space": {"params": {
            "lr": {"type": "float", "low": 0.01, "high": 0.5, "log": True}}}},
        "metrics": {"sharpness": False},
        "device": "cpu",
    }


def test_config_callbacks_and_python_callbacks_see_every_trial(tmp_path):
    """A recording plug-in, a failing one (a warning line each time; the study goes on) and a
    Python callable, on one study."""
    lines = tmp_path / "told.jsonl"
    seen, logged = [], []
    study = sassha_tune.run_study(
        _cfg([{"name": "plugins_example:record_trials", "options": {"path": str(lines)}},
              "plugins_example:failing_callback"]),
        storage=f"sqlite:///{tmp_path / 's.db'}", log=logged.append,
        callbacks=[lambda s, t: seen.append((t.number, t.state))],
    )
    stored = study.get_trials()
    assert [t.state for t in stored] == [TrialState.COMPLETE] * 2
    told = [json.loads(line) for line in lines.read_text().splitlines()]
    assert [(t["number"], t["state"], t["values"], t["lr"]) for t in told] == [
        (t.number, "COMPLETE", t.values, t.params["lr"]) for t in stored]
    assert seen == [(t.number, TrialState.COMPLETE) for t in stored]
    warnings = [line for line in logged if line.startswith("warning:")]
    assert warnings == [f"warning: callback plugins_example:failing_callback failed after trial {i}: "
                        f"error: RuntimeError: tracker unreachable for trial {i}" for i in (0, 1)]


@pytest.mark.parametrize("callbacks, message", [
    ("mlflow", "study.callbacks: expected a list of callbacks"),
    (["neptune"], "study.callbacks[0].name: expected one of mlflow, wandb, tensorboard or a package.module:factory"),
    ([{"name": "mlflow", "options": ["x"]}], "study.callbacks[0].options: expected a mapping of keyword arguments"),
    ([{"name": "mlflow", "tracking": "x"}], "study.callbacks[0]: expected a name, or a mapping with name and options"),
    (["plugins_example:no_such_factory"], "study.callbacks[0].name: plug-in 'plugins_example:no_such_factory': 'plugins_example' has no attribute"),
])
def test_bad_callbacks_are_refused_before_a_study_exists(tmp_path, callbacks, message):
    db = tmp_path / "s.db"
    with pytest.raises(UserError) as info:
        sassha_tune.run_study(_cfg(callbacks), storage=f"sqlite:///{db}")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not db.exists()


def test_python_callbacks_must_be_callables():
    with pytest.raises(UserError, match="callbacks: expected a list of callables"):
        sassha_tune.run_study(_cfg([]), callbacks=["print"])


def test_mlflow_tracks_every_trial_in_a_local_store(tmp_path, monkeypatch):
    pytest.importorskip("optuna_integration", reason="the mlflow extra is not installed (pip install 'sassha-tune[mlflow]')")
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install 'sassha-tune[mlflow]')")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _cfg([{"name": "mlflow", "options": {"tracking_uri": tracking}}], name="tracked")
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    study = sassha_tune.run_study(cfg_path, storage=f"sqlite:///{tmp_path / 's.db'}", log=lambda _: None)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id])
    by_trial = {int(r.data.tags["number"]): r for r in runs}
    assert sorted(by_trial) == [t.number for t in study.get_trials()]
    for t in study.get_trials():
        run = by_trial[t.number]
        assert run.data.metrics["val_acc"] == pytest.approx(t.values[0], rel=1e-12)
        assert float(run.data.params["lr"]) == pytest.approx(t.params["lr"], rel=1e-12)
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
