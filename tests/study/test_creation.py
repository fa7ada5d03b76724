"""Study creation is atomic: a kill at any point leaves no study or a complete one; a study left
half-created by an older version is adopted; concurrent first runs on a fresh SQLite file succeed;
a double Ctrl-C still marks the running trial interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from sassha_tune.app.cli import app
from sassha_tune.study.storage import CRASH_ENV

CONFIG = {
    "study": {"name": "atomic"},
    "budget": {"n_trials": 1},
    "task": {"dataset": "mnist1d", "model": "mlp", "epochs": 1, "max_steps_per_epoch": 1,
             "dataset_options": {"max_train": 200, "max_test": 50}},
    "optimizer": {"name": "sassha", "search_space": "sassha", "enqueue_published": True},
    "metrics": {"sharpness": False},
    "device": "cpu",
}


def _cli(*args: str, env: dict | None = None, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sassha_tune", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def _in_process(*args: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """The CLI in this process (no crash point set): what a user's next run does, without paying
    a Python start; a killed run needs a process of its own (:func:`_cli`)."""
    monkeypatch.chdir(cwd)
    monkeypatch.delenv(CRASH_ENV, raising=False)
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def _config(tmp_path: Path, **study) -> Path:
    path = tmp_path / "atomic.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "study": {**CONFIG["study"], **study}}))
    return path


@pytest.mark.parametrize("point", ["create:before-create", "create:before-commit", "create:after-commit",
                                   "create:before-enqueued-mark"])
def test_a_kill_during_creation_leaves_no_study_or_a_complete_one(tmp_path, monkeypatch, point):
    url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = _config(tmp_path)
    killed = _cli("run", str(cfg), "--storage", url, "--create-only", env={CRASH_ENV: point}, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    names = optuna.get_all_study_names(url) if (tmp_path / "s.db").exists() else []
    if names:  # complete: every attribute a sassha-tune study has
        study = optuna.load_study(study_name="atomic", storage=url)
        assert {"config", "search_space", "optimizer", "objectives"} <= set(study.user_attrs)
    code, _, errs = _in_process("run", str(cfg), "--storage", url, "--create-only", cwd=tmp_path, monkeypatch=monkeypatch)
    assert code == 0, errs
    study = optuna.load_study(study_name="atomic", storage=url)
    published = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    assert published, "the published configurations are enqueued, whatever the kill interrupted"
    fixed = [tuple(sorted(t.system_attrs["fixed_params"].items())) for t in published]
    assert len(set(fixed)) == len(fixed)  # none twice


def test_a_half_created_study_of_an_older_version_is_adopted(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 's.db'}"
    optuna.create_study(study_name="atomic", storage=url, direction="maximize")  # attributes never written
    code, out, errs = _in_process("run", str(_config(tmp_path)), "--storage", url, "--create-only", cwd=tmp_path,
                                  monkeypatch=monkeypatch)
    assert code == 0, errs
    assert "adopted study 'atomic'" in out
    study = optuna.load_study(study_name="atomic", storage=url)
    assert study.user_attrs["optimizer"] == "sassha" and "config" in study.user_attrs


def test_a_half_created_study_with_other_objectives_is_removed_and_created_again(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 's.db'}"
    optuna.create_study(study_name="atomic", storage=url, directions=["minimize", "minimize"])
    code, out, errs = _in_process("run", str(_config(tmp_path)), "--storage", url, "--create-only", cwd=tmp_path,
                                  monkeypatch=monkeypatch)
    assert code == 0, errs
    assert "removed study 'atomic'" in out
    assert len(optuna.load_study(study_name="atomic", storage=url).directions) == 1


def test_concurrent_first_runs_on_a_fresh_sqlite_file_all_succeed(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = _config(tmp_path)
    for _attempt in range(2):
        db = tmp_path / "s.db"
        if db.exists():
            db.unlink()
        procs = [subprocess.Popen([sys.executable, "-m", "sassha_tune", "run", str(cfg), "--storage", url,
                                   "--create-only"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(3)]
        outs = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], [o[1] for o in outs]
        assert optuna.get_all_study_names(url) == ["atomic"]
        created = sum("created study" in o[0] for o in outs)
        assert created == 1, [o[0] for o in outs]


def test_a_double_ctrl_c_still_marks_the_running_trial_interrupted(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    data = {**CONFIG, "task": {**CONFIG["task"], "epochs": 400, "max_steps_per_epoch": 20},
            "optimizer": {"name": "sgd", "search_space": {"params": {"lr": {"type": "float", "low": 0.01, "high": 0.1}}}}}
    cfg = tmp_path / "ctrlc.yaml"
    cfg.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen([sys.executable, "-m", "sassha_tune", "run", str(cfg), "--storage", url],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # Ctrl-C as on a terminal, even when this session runs in the background
                            # (which hands SIGINT on as ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        if "trial 0 started" in line or time.monotonic() > deadline:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, errs = proc.communicate(timeout=120)
    assert proc.returncode == 130, errs
    assert "Traceback" not in errs
    trials = optuna.load_study(study_name="atomic", storage=url).trials
    assert [t.state.name for t in trials] == ["FAIL"]
    assert trials[0].user_attrs["failure_reason"] == "interrupted"
