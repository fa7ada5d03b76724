"""Labels are class indices: a dataset plug-in whose labels are floats that are not whole numbers
(0.5, 1.5) is refused with one line naming the dataset (casting them would silently train on other
classes); whole floats (0.0, 1.0) are the same classes as integers. Through load_dataset and
through the real CLI, before any study exists."""

from __future__ import annotations

import pytest
import torch
import yaml
from typer.testing import CliRunner

from sassha_tune.app.cli import app
from sassha_tune.errors import DataError
from sassha_tune.training.data import load_dataset


def _custom(factory: str, **options) -> dict:
    return {"factory": f"plugins_misbehaving:{factory}", **options}


def test_labels_that_are_not_whole_numbers_are_refused_naming_the_dataset():
    with pytest.raises(DataError) as info:
        load_dataset("custom", options=_custom("float_labels"))
    message = str(info.value)
    assert message == ("dataset 'custom' (factory plugins_misbehaving:float_labels): y_train holds 1.5, not a class "
                       "index: labels must be integers 0..num_classes-1 for classification"), message


def test_whole_float_labels_are_the_classes_they_name():
    floats = load_dataset("custom", options=_custom("float_labels", whole=True))
    assert floats.num_classes == 2 and floats.y_train.dtype == torch.long
    assert set(floats.y_train.tolist() + floats.y_val.tolist() + floats.y_test.tolist()) == {0, 1}


def test_a_plugins_own_splits_with_float_labels_are_refused():
    with pytest.raises(DataError, match=r"factory plugins_misbehaving:float_label_splits\): y_train holds 0.5"):
        load_dataset("custom", options=_custom("float_label_splits"))


def test_run_refuses_float_labels_in_one_line_before_a_study_exists(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "study": {"name": "floats"}, "budget": {"n_trials": 1},
        "task": {"dataset": "custom", "dataset_options": _custom("float_labels"), "model": "mlp", "epochs": 1},
        "optimizer": {"name": "sgd"}, "metrics": {"sharpness": False}, "device": "cpu"}))
    db = tmp_path / "s.db"
    result = CliRunner().invoke(app, ["run", str(config), "--storage", f"sqlite:///{db}"])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "labels must be integers" in result.stderr, result.stderr
    assert "task.dataset_options.factory" in result.stderr and "plugins_misbehaving:float_labels" in result.stderr
    assert not db.exists()
