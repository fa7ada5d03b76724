"""Optuna's private internals (sassha_tune/study/optuna_internals.py), one test per function, on a
real SQLite storage. Each fails with a line naming what changed when an Optuna release changes
what the package relies on; pyproject.toml bounds optuna to the versions these tests passed on."""

from __future__ import annotations

import re
import sqlite3
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.study import StudyDirection
from optuna.trial import TrialState
from packaging.requirements import Requirement
from packaging.version import Version
from sqlalchemy.exc import IntegrityError, OperationalError

from sassha_tune.study import optuna_internals as internals

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def changed(what: str, function: str) -> str:
    return (f"Optuna {optuna.__version__} changed {what}: adapt sassha_tune/study/optuna_internals.py "
            f"({function}) before raising the bound on optuna in pyproject.toml")


@contextmanager
def relied_on(what: str, function: str) -> Iterator[None]:
    """A private name that is gone or called differently fails the test with :func:`changed`'s line."""
    try:
        yield
    except (AttributeError, TypeError, ImportError) as exc:
        pytest.fail(f"{changed(what, function)} ({type(exc).__name__}: {exc})")


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "internals.db"


@pytest.fixture
def storage(db) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(f"sqlite:///{db}")


def two_studies(storage) -> tuple[optuna.Study, optuna.Study]:
    """Two studies with trials, so that the second's ids are neither 0 nor its trials' numbers."""
    first = optuna.create_study(storage=storage, study_name="first")
    first.ask(), first.ask()
    return first, optuna.create_study(storage=storage, study_name="second")


def test_study_storage_is_the_storage_the_study_reads_and_writes(storage):
    _, study = two_studies(storage)
    with relied_on("Study._storage", "study_storage"):
        where = internals.study_storage(study)
    assert isinstance(where, optuna.storages.BaseStorage), changed("Study._storage", "study_storage")
    where.set_study_user_attr(storage.get_study_id_from_name("second"), "written", 1)
    assert study.user_attrs == {"written": 1}, changed("Study._storage", "study_storage")


def test_study_id_is_the_storage_id_of_the_study(storage):
    first, second = two_studies(storage)
    with relied_on("Study._study_id", "study_id"):
        ids = [internals.study_id(first), internals.study_id(second)]
    assert ids == [storage.get_study_id_from_name("first"), storage.get_study_id_from_name("second")], \
        changed("Study._study_id", "study_id")


def test_trial_id_is_the_storage_id_of_an_asked_and_a_frozen_trial(storage):
    _, study = two_studies(storage)
    asked = [study.ask(), study.ask()]
    sid = storage.get_study_id_from_name("second")
    expected = [storage.get_trial_id_from_study_id_trial_number(sid, t.number) for t in asked]
    assert expected != [0, 1]  # the first study's trials came first
    with relied_on("Trial._trial_id / FrozenTrial._trial_id", "trial_id"):
        ids_asked = [internals.trial_id(t) for t in asked]
        ids_frozen = [internals.trial_id(t) for t in study.get_trials()]
    assert ids_asked == expected, changed("Trial._trial_id", "trial_id")
    assert ids_frozen == expected, changed("FrozenTrial._trial_id", "trial_id")


def test_rdb_storage_unwraps_a_loaded_studys_cache(storage):
    study = optuna.load_study(study_name=two_studies(storage)[1].study_name, storage=storage)
    assert internals.study_storage(study) is not storage  # load_study wraps it
    with relied_on("_CachedStorage._backend", "rdb_storage"):
        unwrapped = internals.rdb_storage(internals.study_storage(study))
    assert unwrapped is storage, changed("_CachedStorage._backend", "rdb_storage")
    assert internals.rdb_storage(storage) is storage
    assert internals.rdb_storage(optuna.storages.InMemoryStorage()) is None


def test_rdb_session_commits_rolls_back_and_raises_driver_errors_as_they_are(storage):
    optuna.create_study(storage=storage, study_name="before")
    rename = sqlalchemy.text("UPDATE studies SET study_name = :name")
    with relied_on("RDBStorage.scoped_session", "rdb_session"):
        with internals.rdb_session(storage) as session:
            session.execute(rename, {"name": "after"})
    assert optuna.get_all_study_names(storage) == ["after"], changed("RDBStorage.scoped_session", "rdb_session")
    with pytest.raises(ZeroDivisionError), internals.rdb_session(storage) as session:
        session.execute(rename, {"name": "never"})
        raise ZeroDivisionError
    assert optuna.get_all_study_names(storage) == ["after"]  # rolled back
    with pytest.raises(OperationalError, match="no such table"), internals.rdb_session(storage) as session:
        session.execute(sqlalchemy.text("SELECT * FROM no_such_table"))


def test_add_study_writes_the_study_its_directions_and_attributes_in_one_transaction(storage):
    user = {"config": {"budget": {"n_trials": 3}}, "objectives": ["val_acc maximize", "val_loss minimize"]}
    with relied_on("optuna.storages._rdb.models (StudyModel, StudyDirectionModel, ...)", "add_study"):
        with internals.rdb_session(storage) as session:
            internals.add_study(session, "made", ["maximize", "minimize"], user, {"enqueued": False})
    study = optuna.load_study(study_name="made", storage=storage)
    what = changed("the study tables (optuna.storages._rdb.models)", "add_study")
    assert study.directions == [StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE], what
    system = storage.get_study_system_attrs(storage.get_study_id_from_name("made"))
    assert study.user_attrs == user and system == {"enqueued": False}, what
    with pytest.raises(IntegrityError), internals.rdb_session(storage) as session:  # the name is taken: nothing written
        internals.add_study(session, "made", ["minimize"], {"other": 1}, {})
    assert optuna.get_all_study_names(storage) == ["made"] and study.user_attrs == user


def test_write_trial_user_attrs_sets_every_key_with_one_commit(storage):
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    trial.set_user_attr("val_acc", 0.25)
    commits: list[int] = []
    sqlalchemy.event.listen(storage.engine, "commit", lambda conn: commits.append(1))
    attrs = {"val_acc": 0.5, "history": [{"epoch": 1}], "device": "cpu"}
    what = "RDBStorage._set_trial_attr_without_commit or _rdb.storage._create_scoped_session"
    with relied_on(what, "write_trial_user_attrs"):
        internals.write_trial_user_attrs(storage, internals.trial_id(trial), attrs)
    assert len(commits) == 1, changed(what + " (one commit for all keys)", "write_trial_user_attrs")
    assert study.get_trials()[0].user_attrs == attrs, changed(what, "write_trial_user_attrs")
    study.tell(trial, 1.0)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):  # Optuna's own check still runs
        internals.write_trial_user_attrs(storage, internals.trial_id(trial), {"late": 1})
    assert study.get_trials()[0].user_attrs == attrs


def beating_study(storage, db: Path) -> tuple[optuna.Study, dict[str, int]]:
    """A study whose trials are: RUNNING with an hour-old heartbeat (``old``), RUNNING with a fresh
    one (``fresh``), RUNNING with none (``silent``), COMPLETE with an hour-old one (``done``); and
    another study with a RUNNING trial whose heartbeat is an hour old. Storage ids by role."""
    other = optuna.create_study(storage=storage, study_name="other")
    study = optuna.create_study(storage=storage, study_name="beating")
    ids = {role: internals.trial_id(study.ask()) for role in ("old", "fresh", "silent", "done")}
    ids["other"] = internals.trial_id(other.ask())
    for role in ("old", "fresh", "done", "other"):
        storage.record_heartbeat(ids[role])
    storage.set_trial_state_values(ids["done"], TrialState.COMPLETE, [1.0])
    with sqlite3.connect(db) as con:  # an hour ago by SQLite's clock, the one the query reads
        con.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 hour') WHERE trial_id IN (?, ?, ?)",
                    (ids["old"], ids["done"], ids["other"]))
    return study, ids


def test_stale_trial_ids_is_optunas_query_with_our_grace_period(storage, db):
    study, ids = beating_study(storage, db)
    what = "RDBStorage._get_stale_trial_ids (or the heartbeat_interval / grace_period it reads)"
    with relied_on(what, "stale_trial_ids"):
        stale = [internals.stale_trial_ids(storage, internals.study_id(study), grace) for grace in (60.0, 7200.0)]
    assert stale == [{ids["old"]}, set()], changed(what, "stale_trial_ids")
    # the study's own storage is untouched: Optuna's heartbeat stays off, so ``ask`` does not warn
    assert storage.heartbeat_interval is None and storage.grace_period is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        study.ask()


def test_running_trials_with_heartbeat_are_the_running_ones_with_a_row(storage, db):
    study, ids = beating_study(storage, db)
    what = "the heartbeat tables (optuna.storages._rdb.models.TrialHeartbeatModel, TrialModel)"
    with relied_on(what, "running_trials_with_heartbeat"), internals.rdb_session(storage) as session:
        beating = internals.running_trials_with_heartbeat(session, internals.study_id(study))
    assert beating == {ids["old"], ids["fresh"]}, changed(what, "running_trials_with_heartbeat")


def test_fail_if_running_claims_a_running_trial_once_with_its_attributes(storage):
    study = optuna.create_study(storage=storage)
    running, done = study.ask(), study.ask()
    running.set_user_attr("val_acc", 0.25)
    study.tell(done, 1.0)
    what = "the trial tables (optuna.storages._rdb.models.TrialModel, TrialUserAttributeModel)"
    reason = {"failure_reason": "lost", "val_acc": 0.5}  # one key new, one already set
    with relied_on(what, "fail_if_running"), internals.rdb_session(storage) as session:
        claimed = internals.fail_if_running(session, internals.trial_id(running), reason)
    assert claimed, changed(what, "fail_if_running")
    lost = study.get_trials()[running.number]
    assert lost.state == TrialState.FAIL and lost.datetime_complete is not None, changed(what, "fail_if_running")
    assert lost.user_attrs == reason, changed(what, "fail_if_running")
    for trial in (running, done):  # no longer RUNNING: nothing written
        with internals.rdb_session(storage) as session:
            assert not internals.fail_if_running(session, internals.trial_id(trial), {"failure_reason": "again"})
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.COMPLETE]
    assert study.get_trials()[running.number].user_attrs == lost.user_attrs
    assert study.get_trials()[done.number].user_attrs == {}


def test_the_installed_optuna_is_inside_the_bound_these_tests_cover():
    # the first quoted "optuna<specifier>" is the dependency (tomllib is Python 3.11+; 3.10 is supported)
    requirement = Requirement(re.search(r'"(optuna\s*[<>=!~][^"]*)"', PYPROJECT.read_text(encoding="utf-8"))[1])
    assert any(s.operator in ("<", "<=") for s in requirement.specifier), "pyproject.toml: optuna needs an upper bound"
    assert requirement.specifier.contains(Version(optuna.__version__)), (
        f"Optuna {optuna.__version__} is outside pyproject.toml's {requirement}: these tests have passed only "
        "inside it; run them on this version, then move the bound"
    )
