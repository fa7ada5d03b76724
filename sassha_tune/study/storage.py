"""Storages: the URL of a study database, masking its password, opening it, loading a study.

Every storage call of the package goes through :func:`with_retry` (SQLite says ``database is
locked`` under concurrent workers; the call is retried with backoff). SQLite gets a 60 s lock
timeout. No message ever shows a password: :func:`mask_url` for URLs, the same scrubbing for the
driver's error texts. Optuna has no public accessor for a study's storage and ids, which the
heartbeats, retries and worker records need: :func:`study_storage`, :func:`study_id` and
:func:`trial_id` are the one place that reads Optuna's private attributes.

Trial heartbeats are the storage's own (RDBStorage's ``trial_heartbeats`` table, the one
optuna-dashboard and :func:`optuna.storages.fail_stale_trials` read): :func:`record_heartbeat`
writes one, :func:`storage_heartbeats` says which RUNNING trials have one and which of those are
stale. Both the beat and the staleness check take the time from the database (``now()`` /
``CURRENT_TIMESTAMP``), never from this process's clock; on SQLite that is the C library's clock of
the process running the query (see :mod:`.liveness` and docs/config.md).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import optuna

from ..errors import StorageError
from ..redact import mask_url, scrub

if TYPE_CHECKING:
    from ..config import Config

__all__ = [
    "DEFAULT_STORAGE",
    "STORAGE_ENV",
    "mask_url",
    "resolve_storage",
    "with_retry",
    "open_storage",
    "load_study",
    "study_storage",
    "study_id",
    "trial_id",
    "set_user_attrs",
    "record_heartbeat",
    "StorageHeartbeats",
    "storage_heartbeats",
    "fail_running_trial",
    "create_study_atomically",
    "storage_fault",
    "crash_point",
    "CRASH_ENV",
]

#: test hook: ``SASSHA_TUNE_TEST_CRASH_AT=<point>`` makes this process SIGKILL itself at that point
#: (see :func:`crash_point`); the kill-during-creation tests use it, nothing else sets it
CRASH_ENV = "SASSHA_TUNE_TEST_CRASH_AT"

DEFAULT_STORAGE = "sqlite:///sassha-tune.db"
STORAGE_ENV = "SASSHA_TUNE_STORAGE"

T = TypeVar("T")

def resolve_storage(cli_storage: str | None, cfg: Config | None = None) -> str:
    """``--storage`` wins, then ``study.storage`` in the config, then ``sqlite:///sassha-tune.db``."""
    if cli_storage:
        return cli_storage
    if cfg is not None and cfg.study.storage:
        return cfg.study.storage
    return DEFAULT_STORAGE


def _is_locked(exc: BaseException) -> bool:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if "database is locked" in str(e) or "database table is locked" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def with_retry(fn: Callable[..., T], *args: Any, tries: int = 10, **kwargs: Any) -> T:
    """Call ``fn``, retrying with jittered exponential backoff while SQLite says it is locked."""
    delay = 0.05
    for attempt in range(tries):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt == tries - 1 or not _is_locked(exc):
                raise
            time.sleep(delay * (1.0 + random.random()))
            delay = min(delay * 2.0, 5.0)
    raise AssertionError("unreachable")


def _scrub(text: str, url: str) -> str:
    return scrub(text, url)


def _missing_sqlite_file(url: str) -> str | None:
    """The database file of an SQLite URL when it does not exist (``None`` otherwise)."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        return None
    db = parsed.database
    if parsed.get_backend_name() != "sqlite" or not db or db == ":memory:" or db.startswith("file:"):
        return None
    return None if Path(db).is_file() else db


def open_storage(url: str, *, create: bool = True, study_name: str | None = None) -> optuna.storages.RDBStorage:
    """An RDBStorage for any SQLAlchemy URL; SQLite gets a long lock timeout.

    ``create=False`` (every command but ``run``): a missing SQLite file is a :class:`StorageError`,
    never an empty new file, and no table is created. ``study_name`` only words that error."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    shown = mask_url(url)
    _opened.append(shown)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise StorageError(
            f"storage {shown}: not a database URL (e.g. sqlite:///sassha-tune.db or "
            "postgresql+psycopg://user@host:5432/db)"
        ) from None
    engine_kwargs: dict[str, Any]
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        missing = _missing_sqlite_file(url)
        if not create and missing is not None:
            so = f", so there is no study {study_name!r}" if study_name else ""
            raise StorageError(
                f"storage {shown}: no such database file ({missing} does not exist{so}; "
                "only `sassha-tune run CONFIG` creates one)"
            )
        if db and db != ":memory:" and not Path(db).expanduser().resolve().parent.is_dir():
            raise StorageError(f"storage {shown}: directory {Path(db).parent} does not exist")
        if missing is None and db and db != ":memory:" and not db.startswith("file:"):
            _check_sqlite_file(Path(db).expanduser(), shown)
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    try:
        return _first_open(lambda: with_retry(optuna.storages.RDBStorage, url, engine_kwargs=engine_kwargs,
                                              skip_table_creation=not create))
    except ModuleNotFoundError as exc:
        raise StorageError(
            f"storage {shown}: the database driver is not installed ({exc.name}); for PostgreSQL: "
            "pip install 'psycopg[binary]' and use postgresql+psycopg://"
        ) from None
    except Exception as exc:
        cause = exc.__cause__ or exc
        if (fault := storage_fault(exc)) is not None and "refused an operation" not in fault:
            raise StorageError(fault) from None
        raise StorageError(f"storage {shown}: cannot open it: {_scrub(str(cause).splitlines()[0] if str(cause) else type(cause).__name__, url)}") from None


# The storages this process opened (masked), for naming the storage in a fault's one line.
_opened: list[str] = []

# (text in the driver's error, what it means for the user), first match wins
_FAULTS = (
    ("file is not a database", "the database file is corrupt (not an SQLite database); restore it from a backup"),
    ("malformed", "the database file is corrupt (database disk image is malformed); restore it from a backup"),
    ("readonly database", "it is read-only (attempt to write a readonly database); check the file's permissions and mount"),
    ("read-only file system", "it is on a read-only file system"),
    ("database or disk is full", "the disk is full (database or disk is full); free space and resume"),
    ("no space left", "the disk is full (no space left on device); free space and resume"),
    ("disk i/o error", "the disk failed to read or write (disk I/O error)"),
    ("database is locked", "it stayed locked by another process through every retry"),
    ("unable to open database file", "the database file cannot be opened"),
)


def storage_fault(exc: BaseException) -> str | None:
    """One line naming the storage and the cause when ``exc`` is a storage fault (a corrupt file, a
    read-only or full disk, a lock that never cleared), else None. Passwords masked."""
    seen: set[int] = set()
    e: BaseException | None = exc
    texts: list[str] = []
    is_db_error = False
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        texts.append(str(e).lower())
        module = type(e).__module__
        is_db_error = is_db_error or module.startswith(("sqlalchemy", "sqlite3", "psycopg", "pymysql", "optuna.exceptions"))
        e = e.__cause__ or e.__context__
    if not is_db_error and not isinstance(exc, OSError):
        return None
    where = f"storage {_opened[-1]}" if _opened else "storage"
    for text in texts:
        for needle, meaning in _FAULTS:
            if needle in text:
                return f"{where}: {meaning}"
    if is_db_error:
        return f"{where}: the database refused an operation: {scrub(texts[-1], _opened[-1] if _opened else '', 200)}"
    return None


def _check_sqlite_file(path: Path, shown: str) -> None:
    """Refuse a corrupt SQLite file before anything reads or writes it: a write to an intact page
    of a damaged file would succeed and change it further (``PRAGMA quick_check``, read-only)."""
    import sqlite3

    if path.stat().st_size == 0:
        return  # an empty file: a new database
    try:
        con = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, timeout=60)
        try:
            rows = con.execute("PRAGMA quick_check").fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        if "locked" in str(exc):
            return  # busy, not broken: the storage's own retries wait for it
        raise StorageError(f"storage {shown}: {_fault_meaning(str(exc).lower()) or 'cannot read it: ' + scrub(str(exc), '')}") from None
    if rows != [("ok",)]:
        raise StorageError(f"storage {shown}: the database file is corrupt ({scrub(str(rows[0][0]), '', 80)}); "
                           "restore it from a backup")


def _fault_meaning(text: str) -> str | None:
    for needle, meaning in _FAULTS:
        if needle in text:
            return meaning
    return None


def _creation_race(exc: BaseException) -> bool:
    """Whether ``exc`` is another process creating the same fresh database's tables at the same
    time (SQLite: ``table studies already exists``, ``UNIQUE constraint failed: alembic_version``)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if "already exists" in text or "alembic_version" in text or "duplicate key value" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def _first_open(open_: Callable[[], T], tries: int = 5) -> T:
    """Open a storage; when several processes create a fresh database's tables at once, the
    losers' ``CREATE TABLE`` or version row fails: open again, the tables are there now (creating
    them is idempotent, so a retry is what one process alone would have done)."""
    for attempt in range(tries):
        try:
            return open_()
        except Exception as exc:
            if attempt == tries - 1 or not _creation_race(exc):
                raise
            time.sleep(0.05 * (attempt + 1) * (1.0 + random.random()))
    raise AssertionError("unreachable")


def crash_point(point: str) -> None:
    """Test hook: SIGKILL this process here when ``$SASSHA_TUNE_TEST_CRASH_AT`` names ``point``
    (a kill at the worst moment, for the crash-safety tests; a no-op otherwise)."""
    import os

    if os.environ.get(CRASH_ENV) == point:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def create_study_atomically(
    storage: optuna.storages.BaseStorage,
    name: str,
    directions: list[str],
    user_attrs: dict[str, Any],
    system_attrs: dict[str, Any],
) -> bool:
    """Create study ``name`` with its directions and attributes in **one transaction**: a kill at
    any moment leaves no study or a complete one (SQLite and PostgreSQL commit a transaction
    atomically; Optuna's own ``create_study`` commits the bare study first and every attribute in
    a transaction of its own, so a kill in between left a study without its config). Returns
    False when a study of that name exists (another process created it first): nothing written.

    Optuna has no public call for this; its table models are used here, the one module that
    reads Optuna's storage internals."""
    import json

    from optuna.storages._rdb import models
    from sqlalchemy.exc import IntegrityError

    if not isinstance(storage, optuna.storages.RDBStorage):
        raise TypeError("create_study_atomically needs an RDBStorage")
    session = storage.scoped_session()
    try:
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
        crash_point("create:before-commit")
        session.commit()
    except IntegrityError:
        session.rollback()
        return False
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
    return True


def load_study(
    name: str, storage_url: str | None, *, storage: optuna.storages.BaseStorage | None = None
) -> optuna.Study:
    """Load a study for reading (nothing is created); a missing one names the studies there.

    ``storage`` (already open) wins over ``storage_url``, which then only words messages."""
    if storage is None:
        if storage_url is None:
            raise ValueError("load_study needs storage_url or storage")
        storage = open_storage(storage_url, create=False, study_name=name)
    where = mask_url(storage_url) if storage_url is not None else type(storage).__name__
    try:
        return with_retry(optuna.load_study, study_name=name, storage=storage)
    except KeyError:
        pass
    except Exception as exc:  # e.g. a database without Optuna's tables
        cause = exc.__cause__ or exc
        text = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise StorageError(f"storage {where}: cannot read it: {_scrub(text, storage_url or '')}") from None
    import difflib

    names = sorted(with_retry(optuna.get_all_study_names, storage))
    close = difflib.get_close_matches(name, names, n=1)
    available = ", ".join(names) if names else "(none)"
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise StorageError(f"study {name!r} not found in {where}; available studies: {available}{hint}")


# Optuna keeps these private and offers no public equivalent for what the package does with them
# (system attributes of studies and trials, state changes of trials this process did not ask).


def study_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a study lives in."""
    return study._storage


def study_id(study: optuna.Study) -> int:
    """The storage's id of a study (for its system attributes)."""
    return study._study_id


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """The storage's id of a trial (an asked :class:`optuna.Trial` or a :class:`FrozenTrial`)."""
    return trial._trial_id


def set_user_attrs(study: optuna.Study, trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    """Every key of ``attrs`` as a user attribute of a running trial, in one transaction.

    A finished trial stores 30-40 attributes; Optuna's public ``set_user_attr`` commits each one
    (an fsync on SQLite, several milliseconds), which cost a study about 0.2 s per trial. Optuna
    has no public call for several keys, so this drives RDBStorage's own per-key writer inside one
    session (same checks, same upserts, one commit); any other storage gets the keys one by one."""
    storage = study_storage(study)
    backend = _unwrapped(storage)
    write = getattr(backend, "_set_trial_attr_without_commit", None)
    if not isinstance(backend, optuna.storages.RDBStorage) or write is None:
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial_id(trial), key, value)
        return
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(backend.scoped_session, True) as session:
        for key, value in attrs.items():
            write(session, models.TrialUserAttributeModel, trial_id(trial), key, value)


def record_heartbeat(storage: optuna.storages.BaseStorage, trial_id: int) -> None:
    """One heartbeat of a trial in the storage's own heartbeat table, stamped by the database's
    clock (RDBStorage's public ``record_heartbeat``; a row another process inserted at the same
    moment is fine, Optuna ignores that race)."""
    with_retry(storage.record_heartbeat, trial_id)  # type: ignore[attr-defined]


class StorageHeartbeats:
    """What the storage's heartbeat table says about a study's RUNNING trials (storage ids)."""

    def __init__(self, beating: set[int], stale: set[int]) -> None:
        self.beating = beating  # RUNNING trials with at least one storage heartbeat
        self.stale = stale  # of those, the ones whose last heartbeat is older than the grace period


def _unwrapped(storage: optuna.storages.BaseStorage) -> optuna.storages.BaseStorage:
    # optuna.load_study wraps an RDBStorage in a private cache (_CachedStorage, backend in _backend)
    return getattr(storage, "_backend", storage)


def _rdb_backend(storage: optuna.storages.BaseStorage) -> optuna.storages.RDBStorage:
    backend = _unwrapped(storage)
    if not isinstance(backend, optuna.storages.RDBStorage):
        raise TypeError(f"storage heartbeats need an RDBStorage, not {type(backend).__name__}")
    return backend


@contextmanager
def _session(backend: optuna.storages.RDBStorage) -> Iterator[Any]:
    """One session of the storage's engine: committed at the end, rolled back on any error, closed.
    (Optuna's own helper would turn driver errors into StorageInternalError; these are raised as
    they are, for with_retry and storage_fault to read.)"""
    session = backend.scoped_session()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def storage_heartbeats(study: optuna.Study, grace_period: float) -> StorageHeartbeats:
    """Which RUNNING trials of ``study`` have a storage heartbeat, and which of those have had none
    for more than ``grace_period`` seconds, judged by the database's clock.

    Optuna has no public query for either. The staleness verdict is Optuna's own
    ``RDBStorage._get_stale_trial_ids`` (the query behind ``fail_stale_trials``, so our verdict is
    the one Optuna's tools reach with the same grace period): it reads ``heartbeat_interval`` and
    ``grace_period`` from the storage, and setting them on the study's storage would switch on
    Optuna's heartbeat for ``ask`` (a warning per trial), so a shallow twin of the storage (same
    engine and sessions) carries them. Which trials have a heartbeat at all comes from Optuna's
    table models (``fail_stale_trials`` skips trials without one; our rules need to know)."""
    from optuna.storages._rdb import models
    from optuna.trial import TrialState

    backend = _rdb_backend(study_storage(study))
    twin = object.__new__(type(backend))
    twin.__dict__.update(backend.__dict__)
    twin.heartbeat_interval = grace_period  # only asserted to be set by the query
    twin.grace_period = grace_period
    stale = set(with_retry(twin._get_stale_trial_ids, study_id(study)))

    def running_with_heartbeat() -> set[int]:
        with _session(backend) as session:
            rows = (
                session.query(models.TrialHeartbeatModel.trial_id)
                .join(models.TrialModel, models.TrialModel.trial_id == models.TrialHeartbeatModel.trial_id)
                .filter(models.TrialModel.study_id == study_id(study), models.TrialModel.state == TrialState.RUNNING)
                .all()
            )
        return {r[0] for r in rows}

    beating = with_retry(running_with_heartbeat)
    return StorageHeartbeats(beating, stale & beating)


def fail_running_trial(study: optuna.Study, trial_id: int, user_attrs: dict[str, Any]) -> bool:
    """Make a RUNNING trial FAIL and set ``user_attrs`` on it in **one transaction**; False (nothing
    written) when it was no longer RUNNING: another worker failed or finished it first.

    Optuna's ``set_trial_state_values`` reads the state and then writes it; on SQLite the read
    takes no lock, so two workers that judge the same trial stale at the same moment (they agree
    on the moment now that the database's clock decides) could both fail it and both retry it, and
    a finished trial's user attributes cannot be set afterwards. One conditional ``UPDATE ... WHERE
    state = RUNNING`` claims the trial atomically on SQLite and PostgreSQL alike; it goes through
    Optuna's table models (no public call does this)."""
    import datetime
    import json

    from optuna.storages._rdb import models
    from optuna.trial import TrialState

    backend = _rdb_backend(study_storage(study))

    def claim() -> bool:
        with _session(backend) as session:
            claimed = (
                session.query(models.TrialModel)
                .filter(models.TrialModel.trial_id == trial_id, models.TrialModel.state == TrialState.RUNNING)
                .update({models.TrialModel.state: TrialState.FAIL}, synchronize_session=False)
            )
            if claimed != 1:
                return False  # nothing was written: the commit on the way out is empty
            trial = session.get(models.TrialModel, trial_id)
            trial.datetime_complete = datetime.datetime.now()  # as Optuna stamps a finished trial
            for key, value in user_attrs.items():
                attr = models.TrialUserAttributeModel.find_by_trial_and_key(trial, key, session)
                if attr is None:
                    session.add(models.TrialUserAttributeModel(trial_id=trial_id, key=key, value_json=json.dumps(value)))
                else:
                    attr.value_json = json.dumps(value)
        return True

    return with_retry(claim)
