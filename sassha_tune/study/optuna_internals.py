"""Optuna's private internals: the one module of the package that reads them.

Optuna offers no public call for any of the things below; each function says why it needs the
private one. A private name may change in any Optuna release, so pyproject.toml bounds optuna to
the versions whose internals tests/study/test_optuna_internals.py has passed on (one test per
function here, against a real SQLite storage): raise the bound only after those tests pass on the
new version. Optuna's table models are imported where they are used: they load SQLAlchemy, which
a process that opens no storage does without.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import TrialState

__all__ = [
    "study_storage",
    "study_id",
    "trial_id",
    "rdb_storage",
    "rdb_session",
    "add_study",
    "write_trial_user_attrs",
    "stale_trial_ids",
    "running_trials_with_heartbeat",
    "fail_if_running",
]


def study_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study lives in."""
    # Study has no public accessor for its storage; the package writes study and trial system
    # attributes, heartbeats and artifacts through it.
    return study._storage


def study_id(study: optuna.Study) -> int:
    """The storage's id of a study (for its system attributes)."""
    # The public route (storage.get_study_id_from_name) is a database read for an id the study holds.
    return study._study_id


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """The storage's id of a trial (an asked :class:`optuna.Trial` or a :class:`FrozenTrial`)."""
    # The public route (storage.get_trial_id_from_study_id_trial_number) is a database read for an
    # id the trial holds.
    return trial._trial_id


def rdb_storage(storage: optuna.storages.BaseStorage) -> RDBStorage | None:
    """The RDBStorage behind ``storage`` (itself, or the one a loaded study's cache wraps); None
    for any other kind of storage."""
    # optuna.load_study wraps an RDBStorage in a private cache (_CachedStorage) that keeps it in
    # ``_backend`` and offers no accessor; the one-transaction writes below need the RDBStorage.
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, RDBStorage) else None


@contextmanager
def rdb_session(storage: RDBStorage) -> Iterator[Any]:
    """One session of the storage's engine: committed at the end, rolled back on any error, closed.

    Driver errors are raised as they are, for :func:`~.storage.with_retry` and
    :func:`~.storage.storage_fault` to read."""
    # RDBStorage's attributes (scoped_session here) are documented as not for users; Optuna's own
    # session helper would turn driver errors into StorageInternalError.
    session = storage.scoped_session()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def add_study(session: Any, name: str, directions: list[str], user_attrs: dict[str, Any],
              system_attrs: dict[str, Any]) -> None:
    """Add study ``name``, its directions (``maximize`` / ``minimize``) and attributes to ``session``
    (flushed, not committed); an existing name is the driver's IntegrityError."""
    from optuna.storages._rdb import models

    # Optuna's create_study commits the bare study first and each attribute in a transaction of its
    # own; only its table models write them all in one.
    study = models.StudyModel(
        study_name=name,
        directions=[
            models.StudyDirectionModel(
                objective=i,
                direction=optuna.study.StudyDirection.MAXIMIZE if d == "maximize"
                else optuna.study.StudyDirection.MINIMIZE,
            )
            for i, d in enumerate(directions)
        ],
    )
    session.add(study)
    session.flush()  # the study's id, still inside the transaction
    for key, value in user_attrs.items():
        session.add(models.StudyUserAttributeModel(study_id=study.study_id, key=key, value_json=json.dumps(value)))
    for key, value in system_attrs.items():
        session.add(models.StudySystemAttributeModel(study_id=study.study_id, key=key, value_json=json.dumps(value)))
    session.flush()


def write_trial_user_attrs(storage: RDBStorage, trial_id: int, attrs: dict[str, Any]) -> None:
    """Every key of ``attrs`` as a user attribute of a running trial, in one transaction."""
    from optuna.storages._rdb import models

    # Optuna's public set_trial_user_attr commits each key; it has no call for several. This drives
    # RDBStorage's own per-key writer (_set_trial_attr_without_commit: the same checks and upserts)
    # inside its own session helper (_create_scoped_session: the same errors), with one commit.
    with _create_scoped_session(storage.scoped_session, True) as session:
        for key, value in attrs.items():
            storage._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial_id, key, value)


def stale_trial_ids(storage: RDBStorage, study_id: int, grace_period: float) -> set[int]:
    """The RUNNING trials of a study whose last storage heartbeat is more than ``grace_period``
    seconds old by the database's clock (trials without a heartbeat are not among them)."""
    # Optuna's own query (RDBStorage._get_stale_trial_ids, the one behind fail_stale_trials, so the
    # verdict is the one Optuna's tools reach with the same grace period) has no public form. It
    # reads heartbeat_interval and grace_period from the storage; setting them on the study's
    # storage would switch on Optuna's heartbeat for ``ask`` (a warning per trial), so a shallow
    # twin of the storage (same engine and sessions) carries them.
    twin = object.__new__(type(storage))
    twin.__dict__.update(storage.__dict__)
    twin.heartbeat_interval = grace_period  # only asserted to be set by the query
    twin.grace_period = grace_period
    return set(twin._get_stale_trial_ids(study_id))


def running_trials_with_heartbeat(session: Any, study_id: int) -> set[int]:
    """The storage ids of a study's RUNNING trials that have a storage heartbeat."""
    from optuna.storages._rdb import models

    # No public call says whether a trial has a heartbeat (fail_stale_trials skips those without
    # one; the liveness rules need to know): Optuna's table models answer it.
    rows = (
        session.query(models.TrialHeartbeatModel.trial_id)
        .join(models.TrialModel, models.TrialModel.trial_id == models.TrialHeartbeatModel.trial_id)
        .filter(models.TrialModel.study_id == study_id, models.TrialModel.state == TrialState.RUNNING)
        .all()
    )
    return {r[0] for r in rows}


def fail_if_running(session: Any, trial_id: int, user_attrs: dict[str, Any]) -> bool:
    """In ``session``: make the trial FAIL and set ``user_attrs`` on it if it is RUNNING (one
    conditional ``UPDATE ... WHERE state = RUNNING``); False, nothing written, if it is not."""
    from optuna.storages._rdb import models

    # Optuna's set_trial_state_values reads the state and then writes it (two workers could both
    # fail the same trial), and a finished trial's attributes cannot be set afterwards; only its
    # table models make the claim and the attributes one atomic write.
    claimed = (
        session.query(models.TrialModel)
        .filter(models.TrialModel.trial_id == trial_id, models.TrialModel.state == TrialState.RUNNING)
        .update({models.TrialModel.state: TrialState.FAIL}, synchronize_session=False)
    )
    if claimed != 1:
        return False
    trial = session.get(models.TrialModel, trial_id)
    trial.datetime_complete = datetime.datetime.now()  # as Optuna stamps a finished trial
    for key, value in user_attrs.items():
        attr = models.TrialUserAttributeModel.find_by_trial_and_key(trial, key, session)
        if attr is None:
            session.add(models.TrialUserAttributeModel(trial_id=trial_id, key=key, value_json=json.dumps(value)))
        else:
            attr.value_json = json.dumps(value)
    return True
