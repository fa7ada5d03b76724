"""A missing dataset is reported before anything is created: one line, exit code 2, no trial spent."""

from __future__ import annotations

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from sassha_tune.app.cli import app
from sassha_tune.errors import DataError
from sassha_tune.training.data import check_dataset_files


def _config(tmp_path, dataset: str):
    cfg = {
        "study": {"name": "missing-data", "storage": f"sqlite:///{tmp_path / 'studies.db'}"},
        "task": {"dataset": dataset, "data_dir": str(tmp_path / "nowhere"), "model": "cnn", "epochs": 1},
        "optimizer": {"name": "sgd"},
        "device": "cpu",
    }
    path = tmp_path / "missing.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ("fashion_mnist", "Fashion-MNIST not found: no train-images-idx3-ubyte.gz in"),
        ("cifar10", "CIFAR-10 not found: no cifar-10-batches-py/data_batch_1 under"),
        ("cifar100", "CIFAR-100 not found: no cifar-100-python/train under"),
    ],
)
def test_run_with_missing_dataset_fails_before_creating_the_study(tmp_path, dataset, expected):
    result = CliRunner().invoke(app, ["run", str(_config(tmp_path, dataset))])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0] and "nowhere" in lines[0]
    assert not (tmp_path / "studies.db").exists()


def test_resume_with_missing_dataset_asks_no_trial(tmp_path):
    cfg = _config(tmp_path, "fashion_mnist")
    assert CliRunner().invoke(app, ["run", str(cfg), "--create-only"]).exit_code == 2  # checked at run
    # A study created elsewhere (where the data exists) and resumed here, where it does not:
    (tmp_path / "nowhere").mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / "nowhere" / f"{name}.gz").write_bytes(b"")
    # empty files pass the file check but not the data check `run` makes before creating the study
    assert CliRunner().invoke(app, ["run", str(cfg), "--create-only"]).exit_code == 2
    assert not (tmp_path / "studies.db").exists()
    from sassha_tune.config import load_config
    from sassha_tune.study.create import create_or_continue

    loaded = load_config(cfg)
    create_or_continue(loaded, loaded.study.storage, log=lambda _: None)  # "elsewhere"
    for f in (tmp_path / "nowhere").iterdir():
        f.unlink()
    result = CliRunner().invoke(app, ["resume", "missing-data", "--storage", f"sqlite:///{tmp_path / 'studies.db'}"])
    assert result.exit_code == 2 and "Fashion-MNIST not found" in result.output
    study = optuna.load_study(study_name="missing-data", storage=f"sqlite:///{tmp_path / 'studies.db'}")
    assert {t.state for t in study.trials} <= {TrialState.WAITING}  # the enqueued prior waits; nothing was asked


def test_generated_datasets_need_no_files(tmp_path):
    for name in ("mnist1d", "digits", "synthetic"):
        check_dataset_files(name, str(tmp_path / "nowhere"))
    with pytest.raises(DataError):
        check_dataset_files("cifar10", str(tmp_path / "nowhere"))


def test_enqueue_published_list_enqueues_only_the_named_configurations(tmp_path):
    cfg = {
        "study": {"name": "enq", "storage": f"sqlite:///{tmp_path / 'studies.db'}"},
        "task": {"dataset": "mnist1d", "model": "cnn1d", "epochs": 1},
        "optimizer": {"name": "sassha", "search_space": "sassha", "enqueue_published": ["cifar10/resnet20/sassha.sh"]},
        "device": "cpu",
    }
    path = tmp_path / "enq.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert CliRunner().invoke(app, ["run", str(path), "--create-only"]).exit_code == 0
    study = optuna.load_study(study_name="enq", storage=f"sqlite:///{tmp_path / 'studies.db'}")
    assert [t.system_attrs["fixed_params"] for t in study.trials] == [
        {"lr": 0.15, "weight_decay": 5e-4, "rho": 0.2, "lazy_hessian": 10, "eps": 1e-6}
    ]


@pytest.mark.parametrize(
    ("model", "optimizer", "noted"),
    [
        ({"model": "cnn1d"}, {"name": "sassha"}, "chosen"),  # no space named: sassha_nonorm, said so
        ({"model": "cnn1d"}, {"name": "sassha", "fixed": {"dense_refresh_steps": 50}}, "chosen"),
        ({"model": "mlp"}, {"name": "sassha", "search_space": "sassha"}, True),  # named: searched, with a warning
        ({"model": "cnn1d"}, {"name": "sassha", "search_space": "sassha_nonorm"}, False),
        ({"model": "resnet8", "dataset": "digits"}, {"name": "sassha"}, False),
        ({"model": "cnn1d"}, {"name": "sgd"}, False),
        ({"model": "cnn1d"}, {"name": "adahessian"}, "adahessian"),
        ({"model": "cnn1d"}, {"name": "adahessian", "fixed": {"dense_refresh_steps": 50}}, False),
        ({"model": "resnet8", "dataset": "digits"}, {"name": "adahessian"}, False),
    ],
)
def test_run_notes_sassha_on_a_model_without_normalization(tmp_path, model, optimizer, noted):
    cfg = {
        "study": {"name": "note", "storage": f"sqlite:///{tmp_path / 'studies.db'}"},
        "task": {"dataset": "mnist1d", "epochs": 1, **model},
        "optimizer": optimizer,
        "device": "cpu",
    }
    path = tmp_path / "note.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["run", str(path), "--create-only"])
    assert result.exit_code == 0, result.output
    assert ("search_space: sassha_nonorm" in result.output) is (noted is True)
    assert ("has no normalization layers: searching the sassha_nonorm space" in result.output) is (noted == "chosen")
    if noted == "chosen":  # what the config fixes is not searched in the chosen space
        study = optuna.load_study(study_name="note", storage=f"sqlite:///{tmp_path / 'studies.db'}")
        assert ("dense_refresh_steps" in study.user_attrs["search_space"]["params"]) is not bool(optimizer.get("fixed"))
    assert ("optimizer.fixed: {dense_refresh_steps: 50}" in result.output) is (noted == "adahessian")
