"""Trained models kept (issue 27): ``study.keep_models`` stores trial weights in Optuna's artifact
store beside the database, ``export --model`` gets them back, ``train --save`` writes the same
file; loaded in plain PyTorch they give the stored test accuracy exactly (same machine, same run)."""

from __future__ import annotations

import optuna
import pytest
import torch
import yaml
from conftest import cli_ok, invoke_cli, one_line_exit_2, tiny_config

import sassha_tune
from sassha_tune.config import config_from_dict
from sassha_tune.errors import ConfigError
from sassha_tune.study.models import MODEL_ATTR, artifact_dir

pytestmark = pytest.mark.slow

CFG = tiny_config("kept", study={"keep_models": "best"}, budget={"n_trials": 4},
                  task={"model_options": {"hidden": [16]}, "epochs": 2, "max_steps_per_epoch": 4})
URL = "sqlite:///sassha-tune.db"


def plain_test_accuracy(path) -> tuple[float, dict]:
    """The model file evaluated on its test split in plain PyTorch: (accuracy, the file's dict)."""
    saved = torch.load(path, weights_only=True)
    m = saved["model"]
    model = sassha_tune.build_model(m["name"], m["input_shape"], m["num_classes"], **m["options"])
    model.load_state_dict(saved["state_dict"])
    model.eval()
    splits = sassha_tune.load_dataset(**saved["data"])
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum())
                      for x, y in zip(splits.x_test.split(256), splits.y_test.split(256), strict=True))
    return correct / len(splits.y_test), saved


def test_kept_models_come_back_and_give_the_stored_test_accuracy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kept.yaml").write_text(yaml.safe_dump(CFG))
    cli_ok("run", "kept.yaml")
    study = optuna.load_study(study_name="kept", storage=URL)
    trials = study.trials
    # best: each trial that no earlier complete trial beat when it finished
    best_so_far = [t.number for t in trials if all(t.value >= u.value for u in trials[: t.number])]
    assert [t.number for t in trials if MODEL_ATTR in t.user_attrs] == best_so_far
    assert len(list((tmp_path / "sassha-tune-artifacts").iterdir())) == len(best_so_far)
    best = study.best_trial

    cli_ok("export", "kept", "--model", "--out", "best.pt")
    accuracy, saved = plain_test_accuracy(tmp_path / "best.pt")
    assert accuracy == best.user_attrs["test_acc"]
    assert saved["metrics"]["val_acc"] == best.user_attrs["val_acc"] and saved["params"] == best.params
    assert saved["config"]["optimizer"]["fixed"]["lr"] == best.params["lr"]

    # train --save on the exported config: the same weights, bit for bit (same machine, same run)
    cli_ok("export", "kept", "--out", "best.yaml")
    cli_ok("train", "best.yaml", "--save", "again.pt")
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    assert again["state_dict"].keys() == saved["state_dict"].keys()
    assert all(torch.equal(again["state_dict"][k], v) for k, v in saved["state_dict"].items())

    # all: every complete trial from now on (the setting may change on a stored study)
    cli_ok("resume", "kept", "--set", "study.keep_models=all", "--set", "budget.n_trials=5")
    last = optuna.load_study(study_name="kept", storage=URL).trials[-1]
    assert MODEL_ATTR in last.user_attrs
    cli_ok("export", "kept", "--model", "--trial", str(last.number), "--out", "last.pt")
    assert plain_test_accuracy(tmp_path / "last.pt")[0] == last.user_attrs["test_acc"]

    # a trial without a kept model, and --model without --out: one line each
    without = next(t for t in optuna.load_study(study_name="kept", storage=URL).trials if MODEL_ATTR not in t.user_attrs)
    assert "has no kept model" in one_line_exit_2(invoke_cli("export", "kept", "--model", "--trial", str(without.number),
                                                        "--out", "x.pt"))
    assert "--model: give --out FILE" in one_line_exit_2(invoke_cli("export", "kept", "--model"))
    assert not (tmp_path / "x.pt").exists()


def test_pack_members_keep_their_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = yaml.safe_load(yaml.safe_dump(CFG))
    cfg["study"].update(name="packed", keep_models="all")
    cfg["budget"]["n_trials"] = 2
    (tmp_path / "packed.yaml").write_text(yaml.safe_dump(cfg))
    assert "pack" in cli_ok("run", "packed.yaml", "--pack", "2").output
    for t in optuna.load_study(study_name="packed", storage=URL).trials:
        assert t.user_attrs["pack_size"] == 2
        cli_ok("export", "packed", "--model", "--trial", str(t.number), "--out", f"m{t.number}.pt")
        assert plain_test_accuracy(tmp_path / f"m{t.number}.pt")[0] == t.user_attrs["test_acc"]


def test_bad_model_inputs_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kept.yaml").write_text(yaml.safe_dump(CFG))
    assert "study.keep_models: expected one of none, best, all" in one_line_exit_2(
        invoke_cli("run", "kept.yaml", "--set", "study.keep_models=some"))
    assert not (tmp_path / "sassha-tune.db").exists()
    for args, says in [
        (["--save", "missing/m.pt"], "--save missing/m.pt: directory missing does not exist"),
        (["--save", "link.pt"], "--save link.pt: is a symbolic link"),
    ]:
        (tmp_path / "link.pt").symlink_to(tmp_path / "elsewhere.pt") if "link" in args[1] else None
        assert says in one_line_exit_2(invoke_cli("train", "kept.yaml", *args))
    assert not (tmp_path / "elsewhere.pt").exists()
    own = {"study": {"name": "own", "keep_models": "all"}, "task": {"train": "plugins_example:user_train"},
           "optimizer": {"name": "sgd"}}
    with pytest.raises(ConfigError, match="study.keep_models: keeps the models of the built-in trainer"):
        config_from_dict(own)
    cfg = config_from_dict(CFG)
    with pytest.raises(ConfigError, match="study.artifact_dir: expected a folder"):
        artifact_dir("postgresql+psycopg://user@host:5432/db", cfg)
    assert artifact_dir("sqlite:///some/where/s.db", cfg).as_posix() == "some/where/s-artifacts"
