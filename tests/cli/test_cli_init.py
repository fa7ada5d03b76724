"""``sassha-tune init`` (issue 27): a commented starter config that validates, relies on the
default search, runs as it is (here shrunk with --set), and is never written over; with
--own-loop also a train(reporter) module that a study runs."""

from __future__ import annotations

import os

import optuna
import pytest
from conftest import invoke_cli, one_line_exit_2

from sassha_tune.config import load_config

SHORT = ["--set", "budget.n_trials=1", "--set", "task.epochs=1", "--set", "task.max_steps_per_epoch=3",
         "--set", "metrics.subset_size=64", "--set", "metrics.budget={lambda_max_iters: 3, trace_probes: 2, sam_steps: 1}"]


def test_init_writes_a_commented_config_on_the_default_search_that_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke_cli("init", "--out", "mine.yaml", "--dataset", "digits", "--optimizer", "adamw")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["wrote mine.yaml", "next: sassha-tune run mine.yaml"]
    text = (tmp_path / "mine.yaml").read_text()
    assert text.startswith("# adamw on ") and "  model: mlp " in text and text.count("#") > 15
    cfg = load_config(tmp_path / "mine.yaml")
    assert (cfg.study.name, cfg.task.dataset, cfg.task.model, cfg.optimizer.name) == ("mine", "digits", "mlp", "adamw")
    # the search is left to its defaults: sampler, pruner, space and prior are not written
    assert {"study.sampler", "study.pruner", "optimizer.search_space", "optimizer.enqueue_published"} <= cfg.implicit
    assert (cfg.study.sampler.name, cfg.study.pruner.name, cfg.optimizer.enqueue_published) == ("auto", "auto", "auto")

    ran = invoke_cli("run", "mine.yaml", "--set", "device=cpu", *SHORT)
    assert ran.exit_code == 0, ran.output
    trials = optuna.load_study(study_name="mine", storage="sqlite:///sassha-tune.db").trials
    assert [t.state.name for t in trials if t.state.is_finished()] == ["COMPLETE"]  # the prior waits for more
    assert "lambda_max" in trials[0].user_attrs

    # never written over: one line, exit 2, the file as it was
    assert "mine.yaml exists; init never overwrites" in one_line_exit_2(invoke_cli("init", "--out", "mine.yaml"))
    assert (tmp_path / "mine.yaml").read_text() == text


def test_init_own_loop_writes_a_train_module_that_a_study_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # PYTHONPATH=. for this process (the plug-in's import)
    result = invoke_cli("init", "--out", "loop-study.yaml", "--own-loop")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "next: PYTHONPATH=. sassha-tune run loop-study.yaml"
    assert (tmp_path / "loop_study_train.py").is_file()
    cfg = load_config(tmp_path / "loop-study.yaml")
    assert cfg.task.train == "loop_study_train:train" and "optimizer.search_space" in cfg.implicit
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    ran = invoke_cli("run", "loop-study.yaml", "--set", "device=cpu", "--set", "budget.n_trials=1", "--set", "task.epochs=2",
               "--set", "metrics.subset_size=64", env=env)
    assert ran.exit_code == 0, ran.output
    trials = optuna.load_study(study_name="loop-study", storage="sqlite:///sassha-tune.db").trials
    (trial,) = [t for t in trials if t.state.is_finished()]  # the prior's second configuration waits
    assert trial.state.name == "COMPLETE" and trial.user_attrs["epochs_completed"] == 2
    assert 0 <= trial.user_attrs["test_acc"] <= 1 and trial.user_attrs["lambda_max"] is not None
    # the module is not written over either, and nothing is written when one of the two exists
    (tmp_path / "other.yaml").unlink(missing_ok=True)
    (tmp_path / "other_train.py").write_text("# mine\n")
    assert "other_train.py exists" in one_line_exit_2(invoke_cli("init", "--out", "other.yaml", "--own-loop"))
    assert not (tmp_path / "other.yaml").exists() and (tmp_path / "other_train.py").read_text() == "# mine\n"


@pytest.mark.parametrize("args, says", [
    (["--own-loop", "--model", "mlp"], "--own-loop: your training function brings its own data and model"),
    (["--dataset", "cifar10"], "--dataset cifar10: reads files (nothing is downloaded): give --data-dir DIR"),
    (["--dataset", "cifar11", "--data-dir", "."], "task.dataset: expected one of"),
    (["--model", "resnet21"], "task.model: 'resnet21': ResNet depth must be 6n+2"),
    (["--optimizer", "sashaa"], "optimizer.name: expected one of"),
    (["--own-loop", "--optimizer", "sashaa"], "optimizer.name: expected one of"),
    (["--model", "gpt"], "gpt"),
    (["--out", "study.txt"], "--out study.txt: expected a .yaml file name"),
    (["--out", "missing/study.yaml"], "directory missing does not exist"),
    (["--out", "two words.yaml"], "study.name: expected a study name"),
])
def test_bad_init_inputs_give_one_line_exit_2_and_write_nothing(tmp_path, monkeypatch, args, says):
    monkeypatch.chdir(tmp_path)
    assert says in one_line_exit_2(invoke_cli("init", *args))
    assert list(tmp_path.iterdir()) == []
