"""The public Python API: the names importable from ``sassha_tune``, and ``run_study`` /
``resume_study`` running a real study on MNIST-1D and SQLite without touching the process's logging."""

from __future__ import annotations

import logging
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

import sassha_tune
from sassha_tune import UserError, resume_study, run_study
from sassha_tune.study.budget import budget_used

TINY = {
    "study": {"name": "api"},
    "budget": {"n_trials": 2},
    "task": {
        "dataset": "mnist1d", "model": "mlp", "model_options": {"hidden": [16]},
        "epochs": 1, "batch_size": 64, "max_steps_per_epoch": 3,
    },
    "optimizer": {"name": "sgd", "search_space": {"params": {
        "lr": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
    }}},
    "metrics": {"subset_size": 64, "budget": {"lambda_max_iters": 3, "trace_probes": 2, "sam_steps": 1}},
    "device": "cpu",
    "seed": 0,
}


def test_public_names_are_the_defining_modules_objects():
    from sassha_tune import optim
    from sassha_tune.config import load_config

    for name in ("Sassha", "SasshaLM", "MSassha", "SGD", "AdamW", "SAMSGD", "SAMAdamW", "AdaHessian", "SophiaH",
                 "build_optimizer", "frozen_running_stats", "linear_weight_groups"):
        assert getattr(sassha_tune, name) is getattr(optim, name)
    assert sassha_tune.load_config is load_config
    from sassha_tune.trial.user_train import TrialReporter

    assert sassha_tune.TrialReporter is TrialReporter and sassha_tune.TrialPruned is optuna.TrialPruned
    assert set(sassha_tune.__all__) <= set(dir(sassha_tune)) | {"__version__"}
    with pytest.raises(AttributeError, match="no attribute 'Sasha'"):
        sassha_tune.Sasha  # noqa: B018


def test_importing_the_package_imports_neither_torch_nor_optuna_and_keeps_logging():
    code = (
        "import logging, sys, sassha_tune\n"
        "assert 'torch' not in sys.modules and 'optuna' not in sys.modules, sorted(sys.modules)\n"
        "import sassha_tune.study, optuna\n"
        "print(optuna.logging.get_verbosity(), logging.getLogger('optuna').handlers == [] or 'handlers')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == str(optuna.logging.INFO)  # Optuna's default, untouched by importing the study package


def test_a_trial_process_imports_no_optuna():
    """The trial child (every fresh trial process, pack and rank) imports the config package, whose
    validation builds Optuna's samplers: Optuna is imported where they are built, not at start-up."""
    code = "import sys, sassha_tune.trial.child\nassert 'optuna' not in sys.modules, 'optuna imported'\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_version_has_one_source():
    from importlib.metadata import version

    assert sassha_tune.__version__ == version("sassha-tune")


def test_python_m_sassha_tune_is_the_cli():
    run = subprocess.run([sys.executable, "-m", "sassha_tune", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "Usage: sassha-tune" in run.stdout


def test_the_console_script_is_the_cli_app():
    import re
    from importlib import import_module
    from pathlib import Path

    from sassha_tune.app.cli import app

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    scripts = pyproject.split("[project.scripts]")[1].split("\n[")[0]  # no tomllib on Python 3.10
    module, _, name = re.search(r'^sassha-tune = "(.+)"$', scripts, re.M).group(1).partition(":")
    assert getattr(import_module(module), name) is app


def test_run_study_from_a_dict_then_resume_it(tmp_path, caplog):
    url = f"sqlite:///{tmp_path / 'api.db'}"
    optuna_level = optuna.logging.get_verbosity()
    lines: list[str] = []
    study = run_study(TINY, storage=url, log=lines.append)
    assert isinstance(study, optuna.Study) and study.study_name == "api"
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert lines[-1].startswith("done: 2 trials this run (COMPLETE 2)")
    assert optuna.logging.get_verbosity() == optuna_level  # the caller's logging is theirs

    # resume with a larger budget: only the missing trial runs; the default log is the "sassha_tune" logger
    with caplog.at_level(logging.INFO, logger="sassha_tune"):
        again = resume_study("api", storage=url, n_trials=3)
    assert budget_used(again.trials) == 3 and len(again.trials) == 3
    assert any(r.name == "sassha_tune" and r.getMessage().startswith("done: 1 trials") for r in caplog.records)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_trials": 0}, "n_trials: expected a total number of trials >= 1, or "),
        ({"pack": "two"}, "pack: expected auto or an integer >= 1, got 'two'"),
        ({"device": "gpu"}, "device: expected"),
        ({"gpus": ["0", "x"]}, "gpus: expected GPU indices"),
    ],
)
def test_bad_arguments_raise_one_line_before_a_storage_exists(tmp_path, kwargs, message):
    db = tmp_path / "never.db"
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_study(TINY, storage=f"sqlite:///{db}", **kwargs)
    assert not db.exists()


def test_a_bad_config_dict_names_the_key(tmp_path):
    bad = {**TINY, "task": {**TINY["task"], "epochs": 0}}
    db = tmp_path / "never.db"
    with pytest.raises(UserError, match=r"task\.epochs"):
        run_study(bad, storage=f"sqlite:///{db}")
    with pytest.raises(UserError, match="config: expected a YAML path, a dict or a Config, got int"):
        run_study(3, storage=f"sqlite:///{db}")  # type: ignore[arg-type]
    assert not db.exists()


def test_run_worker_joins_a_created_study_and_status_shows_it(tmp_path):
    from sassha_tune.app.api import run_worker
    from sassha_tune.app.status import list_studies, study_status

    url = f"sqlite:///{tmp_path / 'api.db'}"
    run_study(TINY, storage=url, create_only=True, log=lambda _: None)
    assert list_studies(url).rows[0]["counts"] == {}
    lines: list[str] = []
    summary = run_worker("api", storage=url, worker_id=3, log=lines.append)
    assert summary.ran == 2 and lines[-1].startswith("worker done: 2 trials in ")
    listing = list_studies(url)
    assert listing.storage == url and [r["name"] for r in listing.rows] == ["api"]
    status = study_status("api", url)
    assert status.detail["counts"] == {"COMPLETE": 2} and status.detail["budget"] == "2/2"
    best = status.detail["best"]
    assert status.best_rows[0] == ("param lr", best.params["lr"])
    assert ("val_acc", best.user_attrs["val_acc"]) in status.best_rows
    assert status.spent.startswith("training spent: 2.0 run-equivalents (")  # two trials of the whole 1 epoch
    with pytest.raises(UserError, match="pack: expected auto or an integer >= 1, got 'two'"):
        run_worker("api", storage=url, pack="two")
