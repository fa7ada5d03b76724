"""Storages: the URL of a study database, masking its password, opening it, loading a study.

Every storage call of the package goes through :func:`with_retry` (SQLite says ``database is
locked`` under concurrent workers; the call is retried with backoff). SQLite gets a 60 s lock
timeout. No message ever shows a password: :func:`mask_url` for URLs, the same scrubbing for the
driver's error texts. What Optuna offers no public call for (a study's storage and ids, writes in
one transaction, its heartbeat queries) comes from :mod:`.optuna_internals`, the one module that
reads Optuna's private internals; :func:`study_storage`, :func:`study_id` and :func:`trial_id` are
its accessors, named here for the rest of the package.

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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import optuna

from ..errors import StorageError
from ..redact import mask_url, scrub
from .optuna_internals import (
    add_study,
    fail_if_running,
    rdb_session,
    rdb_storage,
    running_trials_with_heartbeat,
    stale_trial_ids,
    study_id,
    study_storage,
    trial_id,
    write_trial_user_attrs,
)

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


def open_storage(url: str, *, create: bool = True, study_name: str | None = None) -> optuna.storages.RDBStorage:
    """An RDBStorage for any SQLAlchemy URL; SQLite gets a long lock timeout.

    ``create=False`` (every command but ``run``): a missing SQLite file is a :class:`StorageError`,
    never an empty new file, and no table is created. ``study_name`` only words that error."""
    shown = mask_url(url)
    _opened.append(shown)
    parsed = _parsed_url(url, shown)
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite_url(parsed.database, shown, create=create, study_name=study_name)
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}
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
        raise StorageError(_open_failure(exc, url, shown)) from None


def _parsed_url(url: str, shown: str) -> Any:
    """``url`` parsed by SQLAlchemy; a :class:`StorageError` when it is not a database URL."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        raise StorageError(
            f"storage {shown}: not a database URL (e.g. sqlite:///sassha-tune.db or "
            "postgresql+psycopg://user@host:5432/db)"
        ) from None


def _check_sqlite_url(db: str | None, shown: str, *, create: bool, study_name: str | None) -> None:
    """Refuse an SQLite database file ``db`` that is missing (``create=False``), whose folder is
    missing, or that is corrupt, before anything opens it."""
    if not db or db == ":memory:":
        return
    is_path = not db.startswith("file:")  # a file: URI is SQLite's to read
    missing = is_path and not Path(db).is_file()
    if not create and missing:
        so = f", so there is no study {study_name!r}" if study_name else ""
        raise StorageError(
            f"storage {shown}: no such database file ({db} does not exist{so}; "
            "only `sassha-tune run CONFIG` creates one)"
        )
    if not Path(db).expanduser().resolve().parent.is_dir():
        raise StorageError(f"storage {shown}: directory {Path(db).parent} does not exist")
    if is_path and not missing:
        _check_sqlite_file(Path(db).expanduser(), shown)


def _open_failure(exc: Exception, url: str, shown: str) -> str:
    """The one line for a storage that failed to open: the fault it names, else the driver's first line."""
    if (fault := storage_fault(exc)) is not None and "refused an operation" not in fault:
        return fault
    cause = exc.__cause__ or exc
    return f"storage {shown}: cannot open it: {scrub(str(cause).splitlines()[0] if str(cause) else type(cause).__name__, url)}"


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
    False when a study of that name exists (another process created it first): nothing written."""
    from sqlalchemy.exc import IntegrityError

    if not isinstance(storage, optuna.storages.RDBStorage):
        raise TypeError("create_study_atomically needs an RDBStorage")
    try:
        with rdb_session(storage) as session:
            add_study(session, name, directions, user_attrs, system_attrs)
            crash_point("create:before-commit")
    except IntegrityError:
        return False
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
        raise StorageError(f"storage {where}: cannot read it: {scrub(text, storage_url or '')}") from None
    import difflib

    names = sorted(with_retry(optuna.get_all_study_names, storage))
    close = difflib.get_close_matches(name, names, n=1)
    available = ", ".join(names) if names else "(none)"
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise StorageError(f"study {name!r} not found in {where}; available studies: {available}{hint}")


def set_user_attrs(study: optuna.Study, trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    """Every key of ``attrs`` as a user attribute of a running trial, in one transaction.

    A finished trial stores 30-40 attributes; Optuna's public ``set_user_attr`` commits each one
    (an fsync on SQLite, several milliseconds), which cost a study about 0.2 s per trial. An
    RDBStorage writes them with one commit (:func:`~.optuna_internals.write_trial_user_attrs`);
    any other storage gets the keys one by one."""
    storage = study_storage(study)
    backend = rdb_storage(storage)
    if backend is None:
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial_id(trial), key, value)
        return
    write_trial_user_attrs(backend, trial_id(trial), attrs)


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


def _rdb_backend(storage: optuna.storages.BaseStorage) -> optuna.storages.RDBStorage:
    backend = rdb_storage(storage)
    if backend is None:
        raise TypeError(f"storage heartbeats need an RDBStorage, not {type(storage).__name__}")  # a study's cache wraps only an RDBStorage
    return backend


def storage_heartbeats(study: optuna.Study, grace_period: float) -> StorageHeartbeats:
    """Which RUNNING trials of ``study`` have a storage heartbeat, and which of those have had none
    for more than ``grace_period`` seconds, judged by the database's clock.

    Optuna has no public query for either: the staleness verdict is Optuna's own (the query behind
    ``fail_stale_trials``, so our verdict is the one Optuna's tools reach with the same grace
    period), and which trials have a heartbeat at all is read from its tables
    (:mod:`.optuna_internals`)."""
    backend = _rdb_backend(study_storage(study))
    sid = study_id(study)
    stale = with_retry(stale_trial_ids, backend, sid, grace_period)

    def running_with_heartbeat() -> set[int]:
        with rdb_session(backend) as session:
            return running_trials_with_heartbeat(session, sid)

    beating = with_retry(running_with_heartbeat)
    return StorageHeartbeats(beating, stale & beating)


def fail_running_trial(study: optuna.Study, trial_id: int, user_attrs: dict[str, Any]) -> bool:
    """Make a RUNNING trial FAIL and set ``user_attrs`` on it in **one transaction**; False (nothing
    written) when it was no longer RUNNING: another worker failed or finished it first.

    Optuna's ``set_trial_state_values`` reads the state and then writes it; on SQLite the read
    takes no lock, so two workers that judge the same trial stale at the same moment (they agree
    on the moment now that the database's clock decides) could both fail it and both retry it, and
    a finished trial's user attributes cannot be set afterwards. One conditional ``UPDATE ... WHERE
    state = RUNNING`` claims the trial atomically on SQLite and PostgreSQL alike
    (:func:`~.optuna_internals.fail_if_running`)."""
    backend = _rdb_backend(study_storage(study))

    def claim() -> bool:
        with rdb_session(backend) as session:
            return fail_if_running(session, trial_id, user_attrs)

    return with_retry(claim)
