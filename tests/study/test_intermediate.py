"""What a study shows Optuna's tools (optuna-dashboard, ``optuna.visualization``): every trial's
per-epoch objective as intermediate values, also without a pruner; the objectives' names; and a
one-choice categorical of the search space as a fixed value, not a searched parameter.

One real study through the CLI: two trials of a tiny MLP on MNIST-1D, two epochs each, CPU,
sharpness off (it is not what is tested here).
"""

from __future__ import annotations

import optuna
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from sassha_tune.app.cli import app
from sassha_tune.study.views import export_config

optuna.logging.set_verbosity(optuna.logging.WARNING)

CONFIG = {
    "study": {"name": "curves", "sampler": {"name": "random", "seed": 0}},
    "budget": {"n_trials": 2},
    "task": {"dataset": "mnist1d", "model": "mlp", "model_options": {"hidden": [32]}, "epochs": 2,
             "batch_size": 64},
    "optimizer": {
        "name": "sassha",
        "fixed": {"rho": 0.05, "weight_decay": 1.0e-4},
        "search_space": {"params": {
            "lr": {"type": "float", "low": 0.05, "high": 0.3, "log": True},
            "lazy_hessian": {"type": "categorical", "choices": [3]},
        }},
    },
    "metrics": {"sharpness": False},
    "device": "cpu",
    "seed": 0,
}


def _invoke(args: list) -> str:
    result = CliRunner(env={"OMP_NUM_THREADS": "1"}).invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_intermediate_values_without_pruner_metric_names_and_fixed_one_choice(tmp_path):
    cfg = tmp_path / "curves.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    url = f"sqlite:///{tmp_path / 'curves.db'}"
    _invoke(["run", cfg, "--storage", url, "--pack", "1"])
    study = optuna.load_study(study_name="curves", storage=url)

    assert study.metric_names == ["val_acc"]  # not "Objective 0"
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 2
    for t in trials:
        history = t.user_attrs["history"]
        assert [h["epoch"] for h in history] == [1, 2]
        # the learning curve Optuna shows is the per-epoch val_acc, exactly, with no pruner configured
        assert t.intermediate_values == {h["epoch"]: h["val_acc"] for h in history}
        assert t.intermediate_values[2] == t.value == t.user_attrs["val_acc"]
        # the one-choice categorical is no searched parameter, but the trial ran with it
        assert set(t.params) == {"lr"} and set(t.distributions) == {"lr"}
        assert t.user_attrs["optimizer_hparams"]["lazy_hessian"] == 3
    fig = optuna.visualization.plot_intermediate_values(study)
    assert len([d for d in fig.data if len(d.x)]) == 2
    # export keeps the fixed value, so `train` reruns the same configuration
    assert export_config(study)["optimizer"]["fixed"]["lazy_hessian"] == 3
