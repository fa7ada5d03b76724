"""`sassha-tune train --seed`: re-running one configuration over seeds."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from sassha_tune.app.cli import app


def _train(tmp_path, *extra: str) -> dict:
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
