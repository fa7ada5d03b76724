"""Storage faults: a corrupt file, an immutable file, a full disk. Each command says one line
naming the storage and the cause, exits 2, prints no traceback, and loses nothing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import fill_disk
from typer.testing import CliRunner

from sassha_tune.app.cli import app

CONFIG = {
    "study": {"name": "faults"},
    "budget": {"n_trials": 1},
    "task": {"dataset": "mnist1d", "model": "mlp", "epochs": 1, "max_steps_per_epoch": 1,
             "dataset_options": {"max_train": 200, "max_test": 50}},
    "optimizer": {"name": "sgd", "search_space": {"params": {"lr": {"type": "float", "low": 0.01, "high": 0.1}}}},
    "metrics": {"sharpness": False},
    "device": "cpu",
}


@pytest.fixture(scope="module")
def study_db(tmp_path_factory) -> tuple[Path, Path]:
    """(a storage with one study of one complete trial, its config)."""
    folder = tmp_path_factory.mktemp("faults")
    cfg = folder / "faults.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    db = folder / "good.db"
    result = CliRunner().invoke(app, ["run", str(cfg), "--storage", f"sqlite:///{db}"])
    assert result.exit_code == 0, result.output
    return db, cfg


def _one_line(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: storage sqlite:///"), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def _commands(url: str, cfg: Path, out: Path) -> list[list[str]]:
    return [["status", "--storage", url], ["status", "faults", "--storage", url],
            ["report", "faults", "--storage", url, "--out", str(out)], ["export", "faults", "--storage", url],
            ["resume", "faults", "--storage", url, "--n-trials", "2"], ["run", str(cfg), "--storage", url]]


def test_a_corrupt_database_gets_one_line_from_every_command(tmp_path, study_db):
    good, cfg = study_db
    db = tmp_path / "s.db"
    data = bytearray(good.read_bytes())
    middle = len(data) // 3
    data[middle:middle + 8000] = b"\xde\xad" * 4000
    db.write_bytes(bytes(data))
    before = db.read_bytes()
    for args in _commands(f"sqlite:///{db}", cfg, tmp_path / "report"):
        _one_line(CliRunner().invoke(app, args), "corrupt")
    assert db.read_bytes() == before


def test_garbage_instead_of_a_database_gets_one_line(tmp_path, study_db):
    _, cfg = study_db
    db = tmp_path / "s.db"
    db.write_bytes(b"this is not a database\n" * 500)
    for args in _commands(f"sqlite:///{db}", cfg, tmp_path / "report")[:2]:
        _one_line(CliRunner().invoke(app, args), "corrupt")


def _chattr(flag: str, path: Path) -> bool:
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


def test_an_immutable_database_gets_one_line_and_stays_readable(tmp_path, study_db):
    good, cfg = study_db
    db = tmp_path / "s.db"
    shutil.copyfile(good, db)
    if not _chattr("+i", db):
        pytest.skip("chattr +i is not available here (needs root and a file system with attributes)")
    try:
        before = db.read_bytes()
        url = f"sqlite:///{db}"
        for args in (["resume", "faults", "--storage", url, "--n-trials", "2"],
                     ["run", str(cfg), "--storage", url, "--n-trials", "3"]):  # commands that must write
            _one_line(CliRunner().invoke(app, args), "read-only")
        assert CliRunner().invoke(app, ["status", "faults", "--storage", f"sqlite:///{db}"]).exit_code == 0
        assert db.read_bytes() == before
    finally:
        _chattr("-i", db)


def test_a_full_disk_gets_one_line_and_loses_nothing(study_db, small_tmpfs):
    good, cfg = study_db
    mnt = small_tmpfs("400k")
    db = mnt / "s.db"
    shutil.copyfile(good, db)
    fill = fill_disk(mnt)
    url = f"sqlite:///{db}"
    _one_line(CliRunner().invoke(app, ["resume", "faults", "--storage", url, "--n-trials", "3"]), "disk is full")
    fill.unlink()
    result = CliRunner().invoke(app, ["resume", "faults", "--storage", url, "--n-trials", "2"])
    assert result.exit_code == 0, result.output
    states = [t.state.name for t in optuna.load_study(study_name="faults", storage=url).trials]
    assert states[0] == "COMPLETE" and "RUNNING" not in states


def test_the_python_api_says_the_same_line(study_db, small_tmpfs):
    """resume_study on a full disk: a StorageError (a UserError) with the CLI's one line, not the
    driver's exception; nothing lost."""
    import sassha_tune
    from sassha_tune.errors import StorageError

    good, _ = study_db
    mnt = small_tmpfs("400k")
    db = mnt / "s.db"
    shutil.copyfile(good, db)
    fill = fill_disk(mnt)
    with pytest.raises(StorageError) as info:
        sassha_tune.resume_study("faults", storage=f"sqlite:///{db}", n_trials=3, log=lambda _: None)
    message = str(info.value)
    assert message.startswith("storage sqlite:///") and "disk is full" in message and "\n" not in message
    fill.unlink()
    states = [t.state.name for t in optuna.load_study(study_name="faults", storage=f"sqlite:///{db}").trials]
    assert states[0] == "COMPLETE"


def test_a_disk_that_fills_during_a_trial_loses_nothing_and_the_trial_is_retried_on_resume(small_tmpfs):
    """The disk fills while trial 1 trains: the run stops with the one line (the trial cannot even
    be marked failed, so it stays RUNNING), trial 0 is kept; once space is freed, resume finds
    trial 1's heartbeat stale, fails it ``lost`` and retries its parameters."""
    import sassha_tune
    from sassha_tune.config import config_from_dict
    from sassha_tune.errors import StorageError
    from sassha_tune.study.progress import StudyObserver

    mnt = small_tmpfs("3m")
    url = f"sqlite:///{mnt / 's.db'}"
    cfg = config_from_dict({
        "study": {"name": "fills", "objective": "val_acc", "pruner": {"name": "none"},
                  "heartbeat_interval": 0.5, "stale_after": 2},
        "budget": {"n_trials": 3},
        "task": {"train": "plugins_example:own_quadratic", "epochs": 2},
        "optimizer": {"name": "sgd", "search_space": {"params": {
            "lr": {"type": "float", "low": 0.01, "high": 0.1}, "weight_decay": {"type": "float", "low": 1e-5, "high": 1e-3}}}},
        "device": "cpu",
    }, source="test")

    class FillsTheDiskInTrial1(StudyObserver):
        fill: Path | None = None

        def epoch(self, number, epoch, metrics):
            if number == 1 and epoch == 1:
                self.fill = fill_disk(mnt)  # before the epoch is reported to the storage

    observer = FillsTheDiskInTrial1()
    with pytest.raises(StorageError) as info:
        sassha_tune.run_study(cfg, storage=url, observer=observer, log=lambda _: None)
    assert "disk is full" in str(info.value) and "\n" not in str(info.value)
    assert observer.fill is not None
    observer.fill.unlink()
    before = optuna.load_study(study_name="fills", storage=url).trials
    assert [t.state.name for t in before] == ["COMPLETE", "RUNNING"]
    lines: list[str] = []
    study = sassha_tune.resume_study("fills", storage=url, log=lines.append)
    trials = study.trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[0].values == before[0].values  # kept as it was
    assert trials[1].user_attrs["failure_reason"] == "lost"
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == 1]  # a new trial may run while 1 goes stale
    assert retry.params == before[1].params and retry.state.name == "COMPLETE"
    assert "trial 1 lost (heartbeat stale): marked FAIL, params enqueued for a retry" in lines
