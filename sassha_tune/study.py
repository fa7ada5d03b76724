"""Studies: storages, create / continue, the ask-tell loop, budget, heartbeats, retries.

How a study runs (``run``, ``resume`` and ``worker`` all end in :func:`run_trials`):

1. **Reconcile.** A RUNNING trial whose heartbeat (trial system attribute
   ``sassha_tune:heartbeat``, refreshed every ``study.heartbeat_interval`` seconds by the process
   that owns the trial) is older than ``study.stale_after`` is *lost*: it becomes FAIL with
   ``failure_reason: lost`` and its params are enqueued once (the retried numbers are kept in the
   study system attribute ``sassha_tune:retried``; the retry carries ``retry_of``). Optuna's own
   heartbeat works only inside ``study.optimize``, so the loop keeps its own.
2. **Budget.** ``budget.n_trials`` counts every trial of the study, across runs and workers:
   COMPLETE, PRUNED, RUNNING and FAIL -- except FAIL trials whose reason is ``lost`` (retried),
   ``interrupted`` (Ctrl-C) or ``over_budget`` (a worker that lost the race for the last slot).
3. **Ask** with a sampler seeded from (seed, number of trials so far, worker), so a resumed
   seeded study does not repeat its earlier parameter sets (Optuna's samplers restart from their
   seed in a new process).
4. **Train** the trial in a fresh process (``python -m sassha_tune.objective``): an out-of-memory
   error or a leaked CUDA context cannot poison the next trial. Per-epoch validation metrics come
   back to this process, which reports them and answers prune / go.
5. **Tell** with the user attributes of the outcome.

Ctrl-C (or SIGTERM) marks the running trial FAIL with ``failure_reason: interrupted`` and changes
nothing else. SQLite gets a 60 s lock timeout and every storage call made here retries with
backoff on ``database is locked``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import optuna
from optuna.trial import FrozenTrial, TrialState

from . import __version__
from .config import Config, config_from_dict, config_to_dict, published_to_enqueue
from .errors import StorageError, UserError
from .provenance import git_commit
from .spaces import SearchSpace, space_for_config, space_from_dict, suggest

__all__ = [
    "DEFAULT_STORAGE",
    "mask_url",
    "resolve_storage",
    "check_device",
    "open_storage",
    "make_sampler",
    "make_pruner",
    "create_or_continue",
    "load_study",
    "stored_config",
    "run_trials",
    "run_gpu_workers",
    "reconcile",
    "counts_toward_budget",
    "budget_used",
]

DEFAULT_STORAGE = "sqlite:///sassha-tune.db"
STORAGE_ENV = "SASSHA_TUNE_STORAGE"
HEARTBEAT_KEY = "sassha_tune:heartbeat"
RETRIED_KEY = "sassha_tune:retried"
WORKER_KEY = "sassha_tune:worker"
SPACE_HISTORY_KEY = "sassha_tune:search_space_history"
NOT_COUNTED = frozenset({"lost", "interrupted", "over_budget"})
MAX_RETRY_DEPTH = 2  # a lost retry of a lost retry is not retried again

optuna.logging.set_verbosity(optuna.logging.WARNING)

T = TypeVar("T")
Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# Storage URLs
# --------------------------------------------------------------------------------------------


# ``scheme://user:password@`` (or ``user:password@``): everything up to the last ``@`` counts as
# the password, so an unparsable URL still never shows one (over-masking is the safe side).
_USERINFO = re.compile(r"^(?P<head>(?:[A-Za-z][\w+.\-]*://)?[^:/@?#\s]*:)(?P<password>(?!//).*)@", re.S)


def _mask_userinfo(text: str) -> str:
    return _USERINFO.sub(lambda m: f"{m['head']}***@", text, count=1)


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for every message and table).

    Works on strings SQLAlchemy cannot parse too: ``//user:pass@`` becomes ``//user:***@``."""
    from sqlalchemy.engine import make_url

    text = str(url)
    try:
        text = make_url(text).render_as_string(hide_password=True)
    except Exception:
        pass
    return _mask_userinfo(text)


def resolve_storage(cli_storage: str | None, cfg: Config | None = None) -> str:
    """``--storage`` wins, then ``study.storage`` in the config, then ``sqlite:///sassha-tune.db``."""
    if cli_storage:
        return cli_storage
    if cfg is not None and cfg.study.storage:
        return cfg.study.storage
    return DEFAULT_STORAGE


def check_device(name: str | None, what: str = "device") -> None:
    """``cuda`` / ``cuda:N`` must exist on this machine: a one-line :class:`UserError` before a
    study is created or a trial asked, not a failed trial. ``auto`` and ``cpu`` always pass."""
    name = (name or "auto").strip().lower()
    if not name.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"{what} {name}: CUDA is not available on this machine (use cpu or auto)")
    index = name.partition(":")[2]
    if index.isdigit() and int(index) >= torch.cuda.device_count():
        raise UserError(f"{what} {name}: no such GPU ({torch.cuda.device_count()} CUDA device(s) visible)")


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
    from sqlalchemy.engine import make_url

    try:
        password = make_url(url).password
    except Exception:
        password = None
    if password:
        text = text.replace(str(password), "***")
    m = _USERINFO.match(str(url))
    if m and m["password"]:
        text = text.replace(m["password"], "***")
    return " ".join(text.split())[:300]


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
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    try:
        return with_retry(optuna.storages.RDBStorage, url, engine_kwargs=engine_kwargs, skip_table_creation=not create)
    except ModuleNotFoundError as exc:
        raise StorageError(
            f"storage {shown}: the database driver is not installed ({exc.name}); for PostgreSQL: "
            "pip install 'psycopg[binary]' and use postgresql+psycopg://"
        ) from None
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise StorageError(f"storage {shown}: cannot open it: {_scrub(str(cause).splitlines()[0] if str(cause) else type(cause).__name__, url)}") from None


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


def stored_config(study: optuna.Study) -> tuple[Config, SearchSpace]:
    """The config and search space a study was created from (validated again)."""
    raw = study.user_attrs.get("config")
    space_raw = study.user_attrs.get("search_space")
    if not isinstance(raw, dict) or not isinstance(space_raw, dict):
        raise StorageError(f"study {study.study_name!r} was not created by sassha-tune (no stored config)")
    src = f"study {study.study_name} (stored config)"
    cfg = config_from_dict(raw, source=src)
    return cfg, space_from_dict(space_raw, src, cfg.optimizer.name)


# --------------------------------------------------------------------------------------------
# Samplers and pruners
# --------------------------------------------------------------------------------------------


def make_sampler(cfg: Config, seed: int) -> optuna.samplers.BaseSampler:
    name, opts = cfg.study.sampler.name, dict(cfg.study.sampler.options)
    s = optuna.samplers
    if name == "tpe":
        return s.TPESampler(seed=seed, **opts)
    if name == "random":
        return s.RandomSampler(seed=seed, **opts)
    if name == "gp":
        return s.GPSampler(seed=seed, **opts)
    if name == "cmaes":
        return s.CmaEsSampler(seed=seed, **opts)
    if name == "qmc":
        # The quasi-random sequence indexes itself through the storage: keep its scramble seed
        # fixed. Until a trial completes, QMC samples with its independent sampler, which is
        # rebuilt for every trial here (fresh process state): seed that one per trial, or every
        # trial before the first completion would get the same parameters.
        return s.QMCSampler(seed=cfg.sampler_seed, independent_sampler=s.RandomSampler(seed=seed), **opts)
    if name == "nsgaii":
        return s.NSGAIISampler(seed=seed, **opts)
    raise ValueError(f"unknown sampler {name!r}")


def make_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    name, opts = cfg.study.pruner.name, dict(cfg.study.pruner.options)
    p = optuna.pruners
    if name == "none":
        if opts:
            raise ValueError("pruner none takes no options")
        return p.NopPruner()
    if name == "median":
        return p.MedianPruner(**opts)
    if name == "hyperband":
        opts.setdefault("max_resource", cfg.task.epochs)
        return p.HyperbandPruner(**opts)
    if name == "successive_halving":
        return p.SuccessiveHalvingPruner(**opts)
    raise ValueError(f"unknown pruner {name!r}")


def trial_seed(base: int, n_trials_so_far: int, salt: int | str = 0) -> int:
    """The sampler seed for the next ask: a function of the study's progress, not of the process."""
    digest = hashlib.sha256(f"{base}:{n_trials_so_far}:{salt}".encode()).hexdigest()
    return int(digest[:8], 16)


# --------------------------------------------------------------------------------------------
# Create or continue
# --------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if a == b else [path or "(all)"]


# Config sections a continued study may change; anything else changes what a trial means.
_MUTABLE = ("budget", "study.sampler", "study.pruner", "study.heartbeat_interval", "study.stale_after", "device", "provenance")


def study_payload(cfg: Config, space: SearchSpace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, search space) as stored in the study: plain data, no storage URL, space inline."""
    d = config_to_dict(cfg)
    d["study"].pop("storage", None)
    d["optimizer"]["search_space"] = space.to_dict()
    return _plain(d), _plain(space.to_dict())


def create_or_continue(
    cfg: Config,
    storage_url: str,
    *,
    allow_space_change: bool = False,
    log: Log = print,
) -> optuna.Study:
    """Create the study named in ``cfg`` or continue it; the stored config is the one that runs."""
    space = space_for_config(cfg, check_fixed=True)
    config_d, space_d = study_payload(cfg, space)
    storage = open_storage(storage_url)
    name = cfg.study.name
    directions = [optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else optuna.study.StudyDirection.MINIMIZE
                  for d in cfg.study.directions]
    existing = name in with_retry(optuna.get_all_study_names, storage)
    study = with_retry(
        optuna.create_study, study_name=name, storage=storage, directions=cfg.study.directions, load_if_exists=True
    )
    if not existing and "config" not in study.user_attrs:
        with_retry(study.set_user_attr, "config", config_d)
        with_retry(study.set_user_attr, "search_space", space_d)
        with_retry(study.set_user_attr, "optimizer", cfg.optimizer.name)
        with_retry(study.set_user_attr, "objectives", [f"{o.metric} {o.direction}" for o in cfg.study.objectives])
        with_retry(study.set_user_attr, "sassha_tune_version", __version__)
        commit = git_commit()
        if commit:
            with_retry(study.set_user_attr, "code_commit", commit)
        for entry in published_to_enqueue(cfg, space):
            params = {k: v for k, v in entry.items() if k in space.params}
            with_retry(
                study.enqueue_trial, params, user_attrs={"published": entry.get("source", "published")},
                skip_if_exists=True,
            )
        log(f"created study {name!r} in {mask_url(storage_url)}")
        return study

    stored = study.user_attrs.get("config")
    stored_space = study.user_attrs.get("search_space")
    if not isinstance(stored, dict) or not isinstance(stored_space, dict):
        raise StorageError(f"study {name!r} in {mask_url(storage_url)} was not created by sassha-tune; pick another study.name")
    if list(study.directions) != directions:
        raise UserError(
            f"study {name!r} exists with objectives {study.user_attrs.get('objectives')}; the config asks for "
            f"{[f'{o.metric} {o.direction}' for o in cfg.study.objectives]}: use a new study.name"
        )
    space_changes = _diff(stored_space, space_d)
    if space_changes:
        if not allow_space_change:
            raise UserError(
                f"study {name!r} exists with a different search space (changed: {', '.join(space_changes[:4])}); "
                "pass --allow-space-change to continue with the new space, or use a new study.name"
            )
        history = list(with_retry(study._storage.get_study_system_attrs, study._study_id).get(SPACE_HISTORY_KEY, []))
        history.append({"replaced_at_trial": len(study.trials), "space": stored_space})
        with_retry(study._storage.set_study_system_attr, study._study_id, SPACE_HISTORY_KEY, history)
        with_retry(study.set_user_attr, "search_space", space_d)
        log(f"search space of {name!r} changed ({', '.join(space_changes[:4])})")
    other = [
        k for k in _diff({**stored, "optimizer": {**stored.get("optimizer", {}), "search_space": None}},
                         {**config_d, "optimizer": {**config_d["optimizer"], "search_space": None}})
        if not k.startswith(_MUTABLE)
    ]
    if other:
        raise UserError(
            f"study {name!r} exists with different settings ({', '.join(other[:4])}); trials would not be "
            "comparable: use a new study.name (budget, sampler, pruner and device may change)"
        )
    with_retry(study.set_user_attr, "config", config_d)
    log(f"continuing study {name!r} in {mask_url(storage_url)} ({len(study.trials)} trials so far)")
    return study


def set_budget(study: optuna.Study, n_trials: int) -> None:
    """Change ``budget.n_trials`` in the stored config (``--n-trials``)."""
    d = dict(study.user_attrs["config"])
    d["budget"] = {**d.get("budget", {}), "n_trials": int(n_trials)}
    with_retry(study.set_user_attr, "config", d)


# --------------------------------------------------------------------------------------------
# Budget and reconciliation
# --------------------------------------------------------------------------------------------


def counts_toward_budget(t: FrozenTrial) -> bool:
    if t.state == TrialState.WAITING:
        return False
    if t.state == TrialState.FAIL and t.user_attrs.get("failure_reason") in NOT_COUNTED:
        return False
    return True


def budget_used(trials: list[FrozenTrial]) -> int:
    return sum(counts_toward_budget(t) for t in trials)


def _last_beat(t: FrozenTrial) -> float:
    hb = t.system_attrs.get(HEARTBEAT_KEY)
    if isinstance(hb, (int, float)):
        return float(hb)
    return t.datetime_start.timestamp() if t.datetime_start else 0.0


def reconcile(study: optuna.Study, stale_after: float, *, log: Log = print) -> list[int]:
    """Fail RUNNING trials with a stale heartbeat ("lost") and enqueue their params once."""
    storage = study._storage
    now = time.time()
    lost: list[int] = []
    for t in with_retry(study.get_trials, deepcopy=False, states=(TrialState.RUNNING,)):
        if now - _last_beat(t) <= stale_after:
            continue
        try:
            with_retry(storage.set_trial_user_attr, t._trial_id, "failure_reason", "lost")
            with_retry(storage.set_trial_state_values, t._trial_id, TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            continue  # finished meanwhile, or another worker got there first
        lost.append(t.number)
        retried = list(with_retry(storage.get_study_system_attrs, study._study_id).get(RETRIED_KEY, []))
        depth = len(t.user_attrs.get("retry_history", []))
        if t.number in retried or depth >= MAX_RETRY_DEPTH:
            log(f"trial {t.number} lost (heartbeat stale); not retried again")
            continue
        retried.append(t.number)
        with_retry(storage.set_study_system_attr, study._study_id, RETRIED_KEY, sorted(retried))
        attrs = {"retry_of": t.number, "retry_history": [*t.user_attrs.get("retry_history", []), t.number]}
        for key in ("published",):
            if key in t.user_attrs:
                attrs[key] = t.user_attrs[key]
        with_retry(study.enqueue_trial, dict(t.params), user_attrs=attrs)
        log(f"trial {t.number} lost (heartbeat stale): marked FAIL, params enqueued for a retry")
    return lost


class _Heartbeat:
    """Refreshes the trial's heartbeat from a thread while the trial process trains."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int, interval: float) -> None:
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def beat(self) -> None:
        with_retry(self.storage.set_trial_system_attr, self.trial_id, HEARTBEAT_KEY, time.time())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception:  # finished trial or storage hiccup: the next beat tries again
                if self._stop.is_set():
                    return

    def __enter__(self) -> _Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------------------------
# One trial in a fresh process
# --------------------------------------------------------------------------------------------


@dataclass
class _Outcome:
    state: str
    attrs: dict[str, Any] = field(default_factory=dict)
    values: list[float] | None = None
    failure_reason: str | None = None


class _TrialProcess:
    """``python -m sassha_tune.objective``: JSON job in, JSON lines out, go/stop replies."""

    def __init__(self, job: dict[str, Any], env: Mapping[str, str] | None = None) -> None:
        full_env = dict(os.environ if env is None else env)
        full_env["SASSHA_TUNE_PARENT_PID"] = str(os.getpid())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sassha_tune.objective"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=full_env,
            bufsize=1,
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()

    def messages(self):
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if line:
                yield json.loads(line)

    def reply(self, text: str) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> int:
        self.stop()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        return self.proc.returncode


def _run_trial_process(job: dict[str, Any], trial: optuna.Trial, prune_metric: str | None, holder: list) -> _Outcome:
    proc = _TrialProcess(job)
    holder.append(proc)
    outcome: _Outcome | None = None
    user_error: str | None = None
    history: list[dict[str, Any]] = []
    for msg in proc.messages():
        kind = msg.get("type")
        if kind == "epoch":
            metrics = msg.get("metrics", {})
            history.append(metrics)
            if prune_metric is not None:
                value = metrics.get(prune_metric)
                stop = False
                if isinstance(value, (int, float)):
                    trial.report(float(value), int(msg["epoch"]))
                    stop = trial.should_prune()
                proc.reply("stop" if stop else "go")
        elif kind == "result":
            outcome = _Outcome(msg["state"], msg.get("attrs") or {}, msg.get("values"), msg.get("failure_reason"))
        elif kind == "user_error":
            user_error = str(msg.get("message"))
    proc.proc.wait()
    rc = proc.close()
    if user_error is not None:
        raise UserError(user_error)
    if outcome is None:
        reason = f"error: trial process exited with code {rc}"
        if rc is not None and rc < 0:
            reason = f"error: trial process killed by signal {-rc}"
            if -rc == signal.SIGKILL:
                reason = "error: trial process killed (SIGKILL; out of host memory?)"
        outcome = _Outcome("fail", failure_reason=reason)
    outcome.attrs["history"] = [
        {k: m.get(k) for k in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")} for m in history
    ]
    return outcome


def _finish(study: optuna.Study, trial: optuna.Trial, outcome: _Outcome) -> FrozenTrial:
    for key, value in outcome.attrs.items():
        with_retry(trial.set_user_attr, key, value)
    if outcome.state == "fail":
        with_retry(trial.set_user_attr, "failure_reason", outcome.failure_reason or "error: unknown")
        return _tell(study, trial, state=TrialState.FAIL)
    if outcome.state == "pruned":
        return _tell(study, trial, state=TrialState.PRUNED)
    return _tell(study, trial, values=outcome.values)


def _tell(study: optuna.Study, trial: optuna.Trial, **kwargs: Any) -> FrozenTrial:
    try:
        return with_retry(study.tell, trial, skip_if_finished=True, **kwargs)
    except ValueError as exc:
        # e.g. a value Optuna rejects: the trial fails rather than staying RUNNING
        with_retry(trial.set_user_attr, "failure_reason", f"error: {exc}")
        return with_retry(study.tell, trial, state=TrialState.FAIL, skip_if_finished=True)


def _fail(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    try:
        with_retry(trial.set_user_attr, "failure_reason", reason)
        with_retry(study.tell, trial, state=TrialState.FAIL, skip_if_finished=True)
    except Exception:
        pass


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class LoopSummary:
    ran: int = 0
    states: Counter = field(default_factory=Counter)
    stopped_because: str = ""
    seconds: float = 0.0


def _describe(frozen: FrozenTrial, cfg: Config) -> str:
    state = frozen.state.name
    if frozen.state == TrialState.COMPLETE:
        values = ", ".join(f"{m}={v:.4g}" for m, v in zip(cfg.study.metrics, frozen.values or [], strict=False))
        extra = frozen.user_attrs.get("lambda_max")
        tail = f" lambda_max={extra:.4g}" if isinstance(extra, (int, float)) and "lambda_max" not in cfg.study.metrics else ""
        return f"trial {frozen.number} {state} {values}{tail}"
    if frozen.state == TrialState.FAIL:
        return f"trial {frozen.number} FAIL ({frozen.user_attrs.get('failure_reason')})"
    return f"trial {frozen.number} {state}"


def run_trials(
    study_name: str,
    storage_url: str,
    *,
    worker: int | str = 0,
    device: str | None = None,
    log: Log = print,
    pack: str | int = 1,
) -> LoopSummary:
    """Run trials of a stored study until its budget (or ``budget.timeout``) is reached.

    ``pack`` (``--pack``): ``1`` one trial per process; ``K`` or ``"auto"``: up to K trials asked at
    once and trained together in one process (:mod:`sassha_tune.packs`) where they can be packed."""
    from .data import check_dataset_files

    study = load_study(study_name, storage_url)
    cfg, _ = stored_config(study)
    check_device(device or cfg.device.name, "--device" if device else "device")  # before any trial is asked
    check_dataset_files(cfg.task.dataset, cfg.task.data_dir)
    summary = LoopSummary()
    start = time.monotonic()
    restore = _sigterm_as_interrupt()
    waiting = False
    pack_logged = ""
    try:
        while True:
            cfg, space = stored_config(study)  # re-read: another process may extend the budget
            study.pruner = make_pruner(cfg)
            reconcile(study, cfg.study.stale_after, log=log)
            trials = with_retry(study.get_trials, deepcopy=False)
            used = budget_used(trials)
            if cfg.budget.timeout is not None and time.monotonic() - start >= cfg.budget.timeout:
                summary.stopped_because = f"timeout ({cfg.budget.timeout:g} s)"
                break
            if used >= cfg.budget.n_trials:
                running = [t.number for t in trials if t.state == TrialState.RUNNING]
                if running:
                    # Another process holds them; if it died, they go stale and come back as retries.
                    if not waiting:
                        log(f"waiting for running trial(s) {running} of other processes")
                        waiting = True
                    time.sleep(min(cfg.study.heartbeat_interval, 5.0))
                    continue
                summary.stopped_because = f"budget reached ({used}/{cfg.budget.n_trials} trials)"
                break
            waiting = False
            study.sampler = make_sampler(cfg, trial_seed(cfg.sampler_seed, len(trials), worker))
            if pack != 1:
                from .packs import choose_pack_size, run_pack_trials

                size, why = choose_pack_size(cfg, pack, device=device, budget_left=cfg.budget.n_trials - used)
                if why != pack_logged:
                    log(why)
                    pack_logged = why
                size = min(size, cfg.budget.n_trials - used)
                if size > 1:
                    asked = [with_retry(study.ask) for _ in range(size)]
                    told = run_pack_trials(study, asked, cfg, space, device=device, worker=worker, log=log)
                    if not told:
                        summary.stopped_because = f"budget reached ({cfg.budget.n_trials} trials)"
                        break
                    for frozen in told:
                        summary.ran += 1
                        summary.states[frozen.state.name] += 1
                        log(_describe(frozen, cfg))
                    continue
            trial = with_retry(study.ask)
            frozen = _run_one(study, trial, cfg, space, device=device, worker=worker, log=log)
            if frozen is None:  # lost the race for the last slot of the budget
                summary.stopped_because = f"budget reached ({cfg.budget.n_trials} trials)"
                break
            summary.ran += 1
            summary.states[frozen.state.name] += 1
            log(_describe(frozen, cfg))
    finally:
        restore()
        summary.seconds = time.monotonic() - start
    return summary


def start_trial(study: optuna.Study, trial: optuna.Trial, cfg: Config, space: SearchSpace) -> dict[str, Any] | None:
    """Claim an asked trial for this process: record the worker, fail it as ``over_budget`` when
    another worker filled the budget first (then None), else sample its params and store the
    optimizer's constructor arguments and the seed. Shared by single trials and packs."""
    from .spaces import to_hparams

    storage = study._storage
    with_retry(storage.set_trial_system_attr, trial._trial_id, WORKER_KEY, f"{os.uname().nodename}:{os.getpid()}")
    before = [t for t in with_retry(study.get_trials, deepcopy=False)
              if t.number < trial.number and counts_toward_budget(t)]
    if len(before) >= cfg.budget.n_trials:
        _fail(study, trial, "over_budget")
        return None
    params = suggest(trial, space)
    hparams = to_hparams(cfg.optimizer.name, {**cfg.optimizer.fixed, **params}, seed=cfg.seed)
    with_retry(trial.set_user_attr, "optimizer_hparams", _plain(dict(hparams)))
    with_retry(trial.set_user_attr, "seed", cfg.seed)
    return params


def _run_one(
    study: optuna.Study, trial: optuna.Trial, cfg: Config, space: SearchSpace, *, device: str | None,
    worker: int | str, log: Log,
) -> FrozenTrial | None:
    storage = study._storage
    holder: list[_TrialProcess] = []
    try:
        with _Heartbeat(storage, trial._trial_id, cfg.study.heartbeat_interval):
            params = start_trial(study, trial, cfg, space)
            if params is None:
                return None
            job = {
                "study": study.study_name,
                "config": study.user_attrs["config"],
                "params": params,
                "device": device,
                "prune": cfg.study.pruner.name != "none",
            }
            prune_metric = cfg.study.metrics[0] if cfg.study.pruner.name != "none" else None
            log(f"trial {trial.number} started: {_fmt_params(params)}")
            outcome = _run_trial_process(job, trial, prune_metric, holder)
            return _finish(study, trial, outcome)
    except KeyboardInterrupt:
        for p in holder:
            p.stop()
        _fail(study, trial, "interrupted")
        log(f"trial {trial.number} interrupted: marked FAIL")
        raise
    except UserError as exc:
        for p in holder:
            p.stop()
        _fail(study, trial, f"error: {exc}"[:300])
        raise
    except BaseException:
        for p in holder:
            p.stop()
        _fail(study, trial, "error: sassha-tune crashed while running this trial")
        raise


def _fmt_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _sigterm_as_interrupt() -> Callable[[], None]:
    """Treat SIGTERM like Ctrl-C while trials run (the running trial is marked interrupted)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------------------------
# One worker per GPU
# --------------------------------------------------------------------------------------------


def run_gpu_workers(
    study_name: str, storage_url: str, gpus: list[str], *, log: Log = print, pack: str | int = 1
) -> int:
    """Start one ``sassha-tune worker`` per GPU (``CUDA_VISIBLE_DEVICES=N``); wait for all of them.

    Each worker trains on ``cuda`` (its one visible GPU) with ``--pack pack``. The storage URL goes
    to the workers in the environment, so a password never shows in ``ps``.
    """
    procs = []
    for i, gpu in enumerate(gpus):
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = gpu
        env[STORAGE_ENV] = storage_url
        cmd = [sys.executable, "-m", "sassha_tune.cli", "worker", study_name, "--device", "cuda",
               "--worker-id", str(i), "--pack", str(pack)]
        procs.append(subprocess.Popen(cmd, env=env))
        log(f"worker {i} started on GPU {gpu} (pid {procs[-1].pid})")
        time.sleep(0.5)  # stagger the first storage writes
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    bad = [c for c in codes if c != 0]
    return bad[0] if bad else 0


# --------------------------------------------------------------------------------------------
# Read-only views for the CLI (status, export)
# --------------------------------------------------------------------------------------------


def study_rows(storage_url: str) -> list[dict[str, Any]]:
    storage = open_storage(storage_url, create=False)
    rows = []
    for s in with_retry(optuna.get_all_study_summaries, storage, include_best_trial=False):
        study = load_study(s.study_name, storage_url, storage=storage)
        rows.append(study_detail(study))
    return rows


def study_detail(study: optuna.Study) -> dict[str, Any]:
    trials = with_retry(study.get_trials, deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    cfg_raw = study.user_attrs.get("config") or {}
    n_trials = (cfg_raw.get("budget") or {}).get("n_trials")
    best = best_trial(study)
    failures = Counter(str(t.user_attrs.get("failure_reason", "unknown")) for t in trials if t.state == TrialState.FAIL)
    return {
        "name": study.study_name,
        "optimizer": study.user_attrs.get("optimizer", "?"),
        "objectives": study.user_attrs.get("objectives") or [d.name.lower() for d in study.directions],
        "counts": dict(counts),
        "budget": f"{budget_used(trials)}/{n_trials}" if n_trials else "?",
        "best": best,
        "failures": dict(failures),
    }


def best_trial(study: optuna.Study, number: int | None = None) -> FrozenTrial | None:
    """Trial ``number``, or the best: single objective by value, several by the first (on the front)."""
    trials = with_retry(study.get_trials, deepcopy=False)
    if number is not None:
        for t in trials:
            if t.number == number:
                return t
        raise UserError(f"study {study.study_name!r} has no trial {number}")
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    if not done:
        return None
    if len(study.directions) == 1:
        sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
        return max(done, key=lambda t: (sign * t.values[0], -t.number))
    front = with_retry(lambda: study.best_trials)
    sign = 1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
    return max(front or done, key=lambda t: (sign * t.values[0], -t.number))


def export_config(study: optuna.Study, number: int | None = None) -> dict[str, Any]:
    """The study's config with the chosen trial's params fixed: ``sassha-tune train`` runs it as is."""
    trial = best_trial(study, number)
    if trial is None:
        raise UserError(f"study {study.study_name!r} has no complete trial to export yet")
    if trial.state != TrialState.COMPLETE:
        raise UserError(f"trial {trial.number} of {study.study_name!r} is {trial.state.name}, not COMPLETE")
    d = json.loads(json.dumps(study.user_attrs["config"]))
    d["optimizer"]["fixed"] = {**d["optimizer"].get("fixed", {}), **dict(trial.params)}
    d["optimizer"].pop("enqueue_published", None)
    metrics = {k: trial.user_attrs.get(k) for k in ("val_acc", "val_loss", "test_acc", "lambda_max") if k in trial.user_attrs}
    d["provenance"] = {
        "study": study.study_name,
        "trial": trial.number,
        "values": list(trial.values or []),
        "metrics": metrics,
        "sassha_tune_version": __version__,
    }
    return d
