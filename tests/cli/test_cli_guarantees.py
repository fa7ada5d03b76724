"""What the CLI guarantees, through the real CLI (fast, CPU): no password in any message, read-only
commands never create a database file, flags checked before a study exists, one-line usage errors,
--metrics-out checked before training, the eval batch size's one default."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from sassha_tune import report
from sassha_tune.app.cli import app
from sassha_tune.config import config_from_dict
from sassha_tune.errors import StorageError, UserError
from sassha_tune.study import loop, storage, workers
from sassha_tune.trial.objective import build_spec
from sassha_tune.trial.outcome import TrialOutcome

PASSWORD = "hunter2"
BAD_URL = f"postgresql+psycopg://bob:{PASSWORD}@dbhost:port/studies"  # port is not a number

TINY = {
    "study": {"name": "tiny"},
    "budget": {"n_trials": 2},
    "task": {"dataset": "mnist1d", "model": "mlp", "model_options": {"hidden": [8]}, "epochs": 1,
             "batch_size": 64, "max_steps_per_epoch": 2},
    "optimizer": {"name": "sgd"},
    "metrics": {"sharpness": False},
    "device": "cpu",
    "seed": 0,
}

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def _config(tmp_path: Path, name: str = "tiny", **top) -> Path:
    d = yaml.safe_load(yaml.safe_dump(TINY))
    d["study"]["name"] = name
    d.update(top)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _invoke(args: list[str]):
    return CliRunner(env={"OMP_NUM_THREADS": "1"}).invoke(app, [str(a) for a in args])


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def _read_only_commands(tmp_path: Path) -> list[list[str]]:
    return [
        ["status"],
        ["status", "S"],
        ["export", "S"],
        ["report", "S", "--out", tmp_path / "r"],
        ["compare", "A", "B", "--out", tmp_path / "c"],
        ["resume", "S"],
        ["worker", "S"],
    ]


# Password leak


@pytest.mark.parametrize(
    "url, shown",
    [
        (BAD_URL, "postgresql+psycopg://bob:***@dbhost:port/studies"),
        ("postgresql://bob:hun@ter2@h:5432/x", "postgresql://bob:***@h:5432/x"),
        ("bob:hunter2@host/db", "bob:***@host/db"),
        ("sqlite:///a.db", "sqlite:///a.db"),
        ("postgresql+psycopg://bob:hunter2@db:5432/x", "postgresql+psycopg://bob:***@db:5432/x"),
    ],
)
def test_mask_url_handles_unparsable_urls(url, shown):
    assert storage.mask_url(url) == shown


@pytest.mark.parametrize("cmd", range(7))
def test_unparsable_url_never_echoes_the_password(tmp_path, cmd):
    args = _read_only_commands(tmp_path)[cmd]
    result = _invoke([*args, "--storage", BAD_URL])
    _one_line_error(result, "bob:***@dbhost")
    assert PASSWORD not in result.output
    # the library calls behind report / compare say the same
    with pytest.raises(StorageError) as info:
        report.run_report("S", BAD_URL, tmp_path / "r")
    assert PASSWORD not in str(info.value)


def test_run_with_unparsable_url_never_echoes_the_password(tmp_path):
    result = _invoke(["run", _config(tmp_path), "--storage", BAD_URL])
    _one_line_error(result, "not a database URL")
    assert PASSWORD not in result.output


# Read-only commands do not create a database


@pytest.mark.parametrize("cmd", range(7))
def test_read_only_commands_do_not_create_a_sqlite_file(tmp_path, cmd):
    missing = tmp_path / "missing.db"
    args = _read_only_commands(tmp_path)[cmd]
    result = _invoke([*args, "--storage", f"sqlite:///{missing}"])
    _one_line_error(result, f"storage sqlite:///{missing}: no such database file")
    assert not missing.exists()


def test_missing_study_names_the_others(tmp_path):
    db = tmp_path / "s.db"
    assert _invoke(["run", _config(tmp_path, "alpha"), "--create-only", "--storage", f"sqlite:///{db}"]).exit_code == 0
    result = _invoke(["status", "alpah", "--storage", f"sqlite:///{db}"])
    _one_line_error(result, "study 'alpah' not found", "available studies: alpha", "did you mean 'alpha'")


# Flags checked before the study exists


def test_bad_pack_fails_before_the_study_exists(tmp_path):
    db = tmp_path / "s.db"
    result = _invoke(["run", _config(tmp_path), "--pack", "foo", "--storage", f"sqlite:///{db}"])
    _one_line_error(result, "--pack")
    assert not db.exists()


@no_cuda
@pytest.mark.parametrize("where", ["cli", "cli-index", "config"])
def test_cuda_without_cuda_fails_before_the_study_exists(tmp_path, where):
    db = tmp_path / "s.db"
    if where == "config":
        args = ["run", _config(tmp_path, device="cuda")]
    else:
        args = ["run", _config(tmp_path), "--device", "cuda" if where == "cli" else "cuda:1"]
    result = _invoke([*args, "--storage", f"sqlite:///{db}"])
    _one_line_error(result, "CUDA is not available")
    assert not db.exists()


@no_cuda
def test_cuda_without_cuda_fails_before_a_trial_is_asked(tmp_path):
    import optuna

    db = tmp_path / "s.db"
    url = f"sqlite:///{db}"
    assert _invoke(["run", _config(tmp_path), "--create-only", "--storage", url]).exit_code == 0
    _one_line_error(_invoke(["resume", "tiny", "--device", "cuda", "--n-trials", "5", "--storage", url]),
                    "--device cuda: CUDA is not available")
    _one_line_error(_invoke(["worker", "tiny", "--device", "cuda", "--storage", url]), "CUDA is not available")
    _one_line_error(_invoke(["train", _config(tmp_path), "--device", "cuda"]), "CUDA is not available")
    _one_line_error(_invoke(["train", _config(tmp_path, "c", device="cuda")]), "device cuda: CUDA is not available")
    s = optuna.load_study(study_name="tiny", storage=url)
    assert {t.state for t in s.trials} <= {optuna.trial.TrialState.WAITING}  # the enqueued prior; none asked
    assert s.user_attrs["config"]["budget"]["n_trials"] == 2  # resume changed nothing


def test_run_trials_checks_the_stored_device(tmp_path, monkeypatch):
    db = tmp_path / "s.db"
    url = f"sqlite:///{db}"
    assert _invoke(["run", _config(tmp_path), "--create-only", "--storage", url]).exit_code == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device cuda:0: CUDA is not available"):
        loop.run_trials("tiny", url, device="cuda:0", log=lambda m: None)


# --gpus keeps --pack, refuses --device


def test_gpus_with_device_is_rejected(tmp_path):
    db = tmp_path / "s.db"
    for cmd in (["run", _config(tmp_path)], ["resume", "tiny"]):
        result = _invoke([*cmd, "--gpus", "0", "--device", "cpu", "--storage", f"sqlite:///{db}"])
        _one_line_error(result, "--device cannot be combined with --gpus")
    assert not db.exists()


def test_gpu_workers_get_the_pack(monkeypatch):
    started = []

    class FakeProc:
        pid = 1

        def __init__(self, cmd, env):
            started.append((cmd, env))

        def wait(self):
            return 0

    monkeypatch.setattr(workers.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(workers.time, "sleep", lambda s: None)
    assert workers.run_gpu_workers("s", "sqlite:///x.db", ["0", "1"], log=lambda m: None, pack=3) == 0
    for i, (cmd, env) in enumerate(started):
        assert cmd[cmd.index("--pack") + 1] == "3"
        assert cmd[cmd.index("--device") + 1] == "cuda"
        assert env["CUDA_VISIBLE_DEVICES"] == str(i)
        assert "sqlite:///x.db" not in cmd  # the storage travels in the environment


# Train --metrics-out


def test_metrics_out_directory_checked_before_training(tmp_path, monkeypatch):
    import sassha_tune.trial.objective as objective

    def never(*a, **k):
        raise AssertionError("trained although --metrics-out cannot be written")

    monkeypatch.setattr(objective, "evaluate_params", never)
    result = _invoke(["train", _config(tmp_path), "--metrics-out", tmp_path / "nonexistent" / "m.json"])
    _one_line_error(result, "--metrics-out", "does not exist")


def test_metrics_out_write_error_is_one_line(tmp_path, monkeypatch):
    import shutil

    import sassha_tune.trial.objective as objective

    sub = tmp_path / "sub"
    sub.mkdir()

    def fake(cfg, params, **kwargs):
        shutil.rmtree(sub)  # the directory goes away while "training"
        return TrialOutcome("complete", {"val_acc": 0.5}, values=[0.5])

    monkeypatch.setattr(objective, "evaluate_params", fake)
    result = _invoke(["train", _config(tmp_path), "--metrics-out", sub / "m.json"])
    _one_line_error(result, "--metrics-out", "cannot write")


# Usage errors are one line


def test_usage_errors_are_one_line(tmp_path):
    cfg = _config(tmp_path)
    _one_line_error(_invoke(["run", cfg, "--n-trials", "0"]), "--n-trials")
    _one_line_error(_invoke(["run", cfg, "--bogus"]), "--bogus")
    _one_line_error(_invoke(["run"]), "Missing argument")
    existing = tmp_path / "file"
    existing.write_text("")
    _one_line_error(_invoke(["report", "S", "--out", existing]), "--out")
    help_ = _invoke(["run", "--help"])
    assert help_.exit_code == 0 and "Usage" in help_.output and "--n-trials" in help_.output


# Eval_batch_size default has one home: the config


def test_eval_batch_size_default_comes_from_the_config():
    cfg = config_from_dict(yaml.safe_load(yaml.safe_dump(TINY)), source="test")
    assert cfg.task.eval_batch_size == 256
    assert build_spec(cfg, {}).eval_batch_size == 256
