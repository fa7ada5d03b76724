"""The app layer's seams under the CLI (sassha_tune/app): the flags checked as typed, in one
order, before anything else; the output files checked before any work; ``train_once`` the same
run as ``sassha-tune train``."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from sassha_tune.app.cli import app
from sassha_tune.app.flags import check_flags
from sassha_tune.app.outputs import check_output, write_output
from sassha_tune.app.train import train_once, write_metrics
from sassha_tune.errors import UserError


def test_flags_are_read_as_typed():
    flags = check_flags(n_trials="+3", device="cpu", pack="2", overrides=["task.epochs=2"])
    assert (flags.budget.n, flags.budget.more, flags.budget.option) == (3, True, "--n-trials")
    assert flags.gpus == [] and flags.pack == 2
    plain = check_flags()
    assert plain.budget is None and plain.gpus == [] and plain.pack == "auto"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        # each bad flag named as typed; with several bad ones, the first in the order
        # --seeds, --n-trials, --gpus, --device, --pack, --set is the one refused
        ({"seeds": "1,x", "n_trials": "0"}, "--seeds"),
        ({"n_trials": "0", "gpus": "x"}, "--n-trials: expected a total number of trials >= 1"),
        ({"gpus": "0,0", "device": "gpu"}, "--gpus: GPU listed twice in '0,0'"),
        ({"device": "gpu", "pack": "two"}, "--device: expected"),
        ({"pack": "two", "overrides": ["nokey"]}, "--pack: expected auto or an integer >= 1, got 'two'"),
        ({"overrides": ["task.epochs=1", "task.epochs=2"]}, "task.epochs"),
        ({"gpus": "0", "device": "cpu"}, "--device cannot be combined with --gpus"),
    ],
)
def test_the_first_bad_flag_is_one_line_naming_it(flags, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("+", r"\+")):
        check_flags(**flags)


def test_an_output_file_is_checked_before_any_work(tmp_path):
    target = tmp_path / "out.json"
    (tmp_path / "link.json").symlink_to(target)
    with pytest.raises(UserError, match="--out .*link.json: is a symbolic link"):
        check_output(tmp_path / "link.json", "--out")
    with pytest.raises(UserError, match=f"--save {tmp_path}/no/m.pt: directory {tmp_path}/no does not exist"):
        check_output(tmp_path / "no" / "m.pt", "--save")
    check_output(tmp_path / "no" / "m.pt", "--save", directory=False)  # the writer names a missing folder
    write_output(target, "{}\n", "--out")
    assert target.read_text() == "{}\n"
    with pytest.raises(UserError, match="--out .*: cannot write"):
        write_output(tmp_path / "no" / "m.json", "{}", "--out")


def _config(tmp_path):
    cfg = {
        "task": {"dataset": "mnist1d", "model": "mlp", "model_options": {"hidden": [16]}, "epochs": 1,
                 "batch_size": 64, "max_steps_per_epoch": 3},
        "optimizer": {"name": "sgd", "fixed": {"lr": 0.1}},
        "metrics": {"sharpness": False},
        "device": "cpu",
        "seed": 0,
    }
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_once_is_the_run_of_the_train_command(tmp_path):
    path = _config(tmp_path)
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
    path = _config(tmp_path)
    with pytest.raises(UserError, match="--params .*nothing.yaml: no such file"):
        train_once(path, params=tmp_path / "nothing.yaml", log=print)
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(UserError, match="list.yaml: expected a mapping of hyperparameter names to values"):
        train_once(path, params=tmp_path / "list.yaml", log=print)
    with pytest.raises(UserError, match="--metrics-out .*: directory .* does not exist"):
        train_once(path, metrics_out=tmp_path / "no" / "m.json", log=print)
