"""`sassha-tune train`: re-running one configuration over seeds (`--seed`); `train_once`, its run in the app layer."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from sassha_tune.app.cli import app
from sassha_tune.app.train import train_once, write_metrics
from sassha_tune.errors import UserError


def _config_file(tmp_path):
    cfg = {
        "task": {"dataset": "mnist1d", "model": "mlp", "model_options": {"hidden": [16]}, "epochs": 1,
                 "batch_size": 64, "max_steps_per_epoch": 5},
        "optimizer": {"name": "sgd", "fixed": {"lr": 0.1}},
        "metrics": {"sharpness": False},
        "device": "cpu",
        "seed": 0,
    }
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(tmp_path, *extra: str) -> dict:
    path = _config_file(tmp_path)
    out = tmp_path / f"m{len(list(tmp_path.glob('m*.json')))}.json"
    result = CliRunner(env={"OMP_NUM_THREADS": "1"}).invoke(app, ["train", str(path), "--metrics-out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def test_seed_override_changes_the_run_and_seed_of_the_config_is_the_default(tmp_path):
    default = _train(tmp_path)
    zero = _train(tmp_path, "--seed", "0")
    one = _train(tmp_path, "--seed", "1")
    assert zero["val_acc"] == default["val_acc"] and zero["train_loss"] == default["train_loss"]
    assert one["train_loss"] != default["train_loss"]


def test_negative_seed_is_a_usage_error(tmp_path):
    (tmp_path / "t.yaml").write_text("task: {dataset: mnist1d, model: mlp}\noptimizer: {name: sgd}\n")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "t.yaml"), "--seed", "-1"])
    assert result.exit_code == 2
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


def test_train_once_is_the_run_of_the_train_command(tmp_path):
    path = _config_file(tmp_path)
    params = tmp_path / "p.yaml"
    params.write_text("lr: 0.05\n")
    lines: list[str] = []
    ran = train_once(path, params=params, seed=1, overrides=["task.batch_size=32"], log=lines.append)
    assert (ran.optimizer, ran.task, ran.outcome.state) == ("sgd", "mnist1d/mlp", "complete")
    write_metrics(tmp_path / "api.json", ran.outcome)
    result = CliRunner(env={"OMP_NUM_THREADS": "1"}).invoke(
        app, ["train", str(path), "--params", str(params), "--seed", "1", "--set", "task.batch_size=32",
              "--metrics-out", str(tmp_path / "cli.json")])
    assert result.exit_code == 0, result.output
    by_api, by_cli = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("api", "cli"))
    assert by_api["state"] == "complete" and by_api["train_loss"] == by_cli["train_loss"]
    assert by_api["val_acc"] == by_cli["val_acc"]


def test_train_once_refuses_before_training(tmp_path):
    path = _config_file(tmp_path)
    with pytest.raises(UserError, match="--params .*nothing.yaml: no such file"):
        train_once(path, params=tmp_path / "nothing.yaml", log=print)
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(UserError, match="list.yaml: expected a mapping of hyperparameter names to values"):
        train_once(path, params=tmp_path / "list.yaml", log=print)
    with pytest.raises(UserError, match="--metrics-out .*: directory .* does not exist"):
        train_once(path, metrics_out=tmp_path / "no" / "m.json", log=print)
