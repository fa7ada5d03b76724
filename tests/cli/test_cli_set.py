"""``--set key.path=value`` on run, resume, worker and train (issue 27): read as the config file's
YAML, validated like the file, stored as the study's config (so export and resume reproduce it); on
a stored study only what may change there; every bad input one line, exit 2, nothing stored."""

from __future__ import annotations

import optuna
import pytest
import yaml
from conftest import invoke_cli, one_line_exit_2, tiny_config

import sassha_tune
from sassha_tune.config import load_config
from sassha_tune.config.overrides import apply_overrides, parse_overrides
from sassha_tune.errors import ConfigError, UserError

CFG = tiny_config("setter")


def _file(tmp_path, **changes) -> str:
    d = yaml.safe_load(yaml.safe_dump(CFG))
    d.update(changes)
    p = tmp_path / "setter.yaml"
    p.write_text(yaml.safe_dump(d))
    return str(p)


def _one_line_exit_2(result) -> str:
    line = one_line_exit_2(result)
    assert line.startswith("error: "), line
    return line


def test_values_are_the_config_files_yaml_and_short_forms_expand():
    changes = parse_overrides(["task.epochs=3", "optimizer.fixed.lr=1e-3", "task.model_options.hidden=[32, 16]",
                               "budget.timeout=null", "device.amp=bf16", "study.sampler.options.n_startup_trials=2"])
    assert [c.value for c in changes] == [3, 1e-3, [32, 16], None, "bf16", 2]
    assert isinstance(changes[1].value, float)  # 1e-3 is a number, as in a config file
    raw = {"task": {"epochs": 1}, "device": "cpu", "study": {"sampler": "tpe"}}
    out = apply_overrides(raw, changes)
    assert out["device"] == {"name": "cpu", "amp": "bf16"}  # `device: cpu` is `device: {name: cpu}`
    assert out["study"]["sampler"] == {"name": "tpe", "options": {"n_startup_trials": 2}}
    assert out["task"] == {"epochs": 3, "model_options": {"hidden": [32, 16]}}
    assert raw["task"] == {"epochs": 1}  # the input is left alone


@pytest.mark.parametrize("bad, says", [
    ("task.epochs", "expected key.path=value"),
    ("=3", "expected a key path"),
    ("task..epochs=3", "expected a key path"),
    ("task.epochs=", "expected a value after '='"),
    ("task.epochs=[1", "not valid YAML"),
])
def test_malformed_overrides_are_one_line_config_errors(bad, says):
    with pytest.raises(ConfigError, match=says):
        parse_overrides([bad])
    with pytest.raises(ConfigError, match="already set by"):
        parse_overrides(["task.epochs=2", "task.epochs=3"])
    with pytest.raises(ConfigError, match="not a mapping"):
        apply_overrides({"task": {"model_options": {"hidden": [8]}}}, parse_overrides(["task.model_options.hidden.x=1"]))


def test_load_config_validates_an_override_like_the_file_and_keeps_the_files_study_name(tmp_path):
    path = _file(tmp_path, study={"pruner": "none"})  # no name: the file's name is the default
    cfg = load_config(path, ["task.epochs=4", "seed=7"])
    assert (cfg.task.epochs, cfg.seed, cfg.study.name) == (4, 7, "setter")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["task.epochs=ten"])
    assert str(info.value) == f"{path} with --set: task.epochs: expected an integer >= 1, got 'ten' (str)"
    # the same value written in the file gets the same message, bar the source
    with pytest.raises(ConfigError) as written:
        load_config(_file(tmp_path, task={**CFG["task"], "epochs": "ten"}))
    assert str(written.value).split(": ", 1)[1] == str(info.value).split(": ", 1)[1]


def test_run_stores_the_effective_config_export_and_resume_reproduce_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _file(tmp_path)
    result = invoke_cli("run", path, "--set", "task.epochs=2", "--set", "task.model_options.hidden=[12]")
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="setter", storage="sqlite:///sassha-tune.db")
    stored = study.user_attrs["config"]
    assert stored["task"]["epochs"] == 2 and stored["task"]["model_options"] == {"hidden": [12]}
    assert study.trials[0].user_attrs["epochs_completed"] == 2
    exported = yaml.safe_load(invoke_cli("export", "setter").output)
    assert exported["task"]["epochs"] == 2 and exported["task"]["model_options"] == {"hidden": [12]}
    # the same file again without --set is another study's settings: refused, as for an edited file
    again = _one_line_exit_2(invoke_cli("run", path))
    assert "different settings (task.epochs, task.model_options.hidden)" in again

    # resume: the budget, sampler, pruner, heartbeats and device may change; the rest is refused
    resumed = invoke_cli("resume", "setter", "--set", "budget.n_trials=2", "--set", "study.pruner=median")
    assert resumed.exit_code == 0, resumed.output
    assert "stored config changed by --set budget.n_trials=2 study.pruner=median" in resumed.output
    study = optuna.load_study(study_name="setter", storage="sqlite:///sassha-tune.db")
    assert len(study.trials) == 2 and study.trials[1].user_attrs["epochs_completed"] == 2
    assert study.user_attrs["config"]["study"]["pruner"]["name"] == "median"
    assert study.user_attrs["config"]["task"] == stored["task"]


def test_bad_set_values_give_one_line_exit_2_and_store_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _file(tmp_path)
    for args, says in [
        (["run", path, "--set", "task.epochs=ten"], "setter.yaml with --set: task.epochs: expected an integer >= 1"),
        (["run", path, "--set", "task.epochz=2"], "task.epochz: unknown key (did you mean 'epochs'?)"),
        (["run", path, "--set", "task.epochs"], "--set 'task.epochs': expected key.path=value"),
        (["run", path, "--set", "budget.n_trials=3", "--n-trials", "4"], "give one"),
        (["train", path, "--set", "optimizer.fixed.lr=-1"], "optimizer.fixed.lr"),
        (["train", path, "--set", "device.amp=bf17"], "device.amp: expected one of none, bf16"),
    ]:
        assert says in _one_line_exit_2(invoke_cli(*args)), args
    assert not (tmp_path / "sassha-tune.db").exists()  # nothing created

    assert invoke_cli("run", path).exit_code == 0
    url = "sqlite:///sassha-tune.db"
    before = optuna.load_study(study_name="setter", storage=url).user_attrs["config"]
    for args, says in [
        (["resume", "setter", "--set", "task.epochs=3"], "--set task.epochs=3: task.epochs cannot change on stored study"),
        (["resume", "setter", "--set", "seed=3"], "seed cannot change"),
        (["worker", "setter", "--set", "optimizer.fixed.lr=0.1"], "optimizer.fixed.lr cannot change"),
        (["resume", "setter", "--set", "study.sampler=rnd"], "study.sampler.name: expected one of"),
        (["worker", "setter", "--set", "budget.n_trials=0"], "budget.n_trials: expected an integer >= 1"),
        (["resume", "setter", "--set", "budget.n_trials=1", "--set", "study.pruner=median"], None),
        (["resume", "setter", "--set", "budget.n_trials=3", "--n-trials", "3"], "give one"),
        (["resume", "setter", "--set", "task"], "expected key.path=value"),
    ]:
        result = invoke_cli(*args)
        if says is None:  # the budget is what it was: nothing to run, the pruner stored
            assert result.exit_code == 0, result.output
            continue
        assert says in _one_line_exit_2(result), args
        assert optuna.load_study(study_name="setter", storage=url).user_attrs["config"]["task"] == before["task"]
    after = optuna.load_study(study_name="setter", storage=url).user_attrs["config"]
    assert after["study"]["pruner"]["name"] == "median" and after["budget"] == before["budget"]


def test_run_study_takes_overrides_and_refuses_them_with_a_config_object(tmp_path):
    url = f"sqlite:///{tmp_path}/o.db"
    study = sassha_tune.run_study(_file(tmp_path), storage=url, overrides=["task.epochs=2", "budget.n_trials=2"],
                                  log=lambda _: None)
    assert study.user_attrs["config"]["task"]["epochs"] == 2 and len(study.trials) == 2
    with pytest.raises(UserError, match=r"--set budget.n_trials 1: below the 2 trials"):  # the budget rule
        sassha_tune.resume_study("setter", storage=url, overrides=["budget.n_trials=1"])
    with pytest.raises(UserError, match="not to a Config"):
        sassha_tune.run_study(load_config(_file(tmp_path)), storage=url, overrides=["task.epochs=2"])
    with pytest.raises(UserError, match="list of key.path=value"):
        sassha_tune.run_study(_file(tmp_path), storage=url, overrides="task.epochs=2")
    with pytest.raises(UserError, match="cannot change on stored study"):
        sassha_tune.resume_study("setter", storage=url, overrides=["task.epochs=3"])
