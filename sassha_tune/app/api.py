"""The study commands as Python functions: ``run_study`` and ``resume_study`` (``run``,
``resume``), ``rerun_study`` (``rerun``) and ``run_worker`` (``worker``). The others:
``init_config`` (``init``) in :mod:`~sassha_tune.app.starter`; ``export``, ``write_report``,
``write_comparison`` (``export``, ``report``, ``compare``) and ``trials_dataframe`` in
:mod:`~sassha_tune.app.results`; in a notebook ``sassha_tune.report`` and ``sassha_tune.compare``
(the package :mod:`sassha_tune.report`) return what they wrote.

    import sassha_tune

    study = sassha_tune.run_study("examples/quickstart.yaml", storage="sqlite:///mine.db")
    print(study.best_trials[0].params)

The study functions return the :class:`optuna.study.Study`, so everything Optuna offers
(``trials_dataframe``, ``optuna.visualization``, optuna-dashboard on the same storage) works on the
result. They leave the process's logging as it is: progress lines go to ``log`` (default: the
``sassha_tune`` logger at INFO level, silent unless the caller configured logging) and Optuna's
own verbosity is never changed here (the CLI quiets it for its commands only).

Bad input raises :class:`~sassha_tune.errors.UserError` (one line naming the field and what was
expected) before a storage is touched; a storage that fails under a run (corrupt, read-only, full,
locked) raises :class:`~sassha_tune.errors.StorageError`, a ``UserError`` with the one line the
CLI prints (the storage named, the cause, passwords masked).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .base import Log, default_log, one_line_storage_faults

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from ..config import Config
    from ..study.create import BudgetChange
    from ..study.loop import Launcher, LoopSummary
    from ..study.progress import StudyObserver

Callback = Callable[["optuna.Study", "FrozenTrial"], None]


class WorkersFailed(UserError):
    """A GPU worker process (``gpus=[...]``) exited with an error; its own output says why."""

    def __init__(self, code: int) -> None:
        super().__init__(f"a GPU worker exited with code {code} (its output above says why)")
        self.exit_code = code


def _as_config(config: str | Path | Mapping[str, Any] | Config, overrides: Sequence[str] = ()) -> Config:
    from ..config import Config, config_from_dict, load_config
    from ..config.overrides import apply_overrides, overridden_source, parse_overrides

    if isinstance(overrides, str):
        raise UserError(f"overrides: expected a list of key.path=value strings, got {overrides!r}")
    if isinstance(config, Config):
        if overrides:
            raise UserError("overrides: apply to a YAML path or a dict, not to a Config (change its fields instead)")
        return config
    if isinstance(config, (str, Path)):
        return load_config(config, overrides)
    if isinstance(config, Mapping):
        # relative paths in a dict (data_dir, a search-space file) are read from the working directory
        changes = parse_overrides(overrides)
        return config_from_dict(apply_overrides(dict(config), changes), source=overridden_source("<config dict>", changes),
                                base_dir=Path.cwd())
    raise UserError(f"config: expected a YAML path, a dict or a Config, got {type(config).__name__}")


def _check_override_budget(overrides: Sequence[str], n_trials: Any) -> None:
    """``--n-trials`` and ``--set budget.n_trials`` name one setting twice: refused."""
    from ..config.overrides import parse_overrides

    if n_trials is not None and any(o.key in ("budget", "budget.n_trials") for o in parse_overrides(overrides)):
        raise UserError("--set budget.n_trials and --n-trials both set the budget; give one")


def _check_gpus(gpus: list[str] | list[int] | None, device: str | None) -> list[str]:
    if not gpus:
        return []
    items = [str(g) for g in gpus]
    if not all(g.isdigit() for g in items):
        raise UserError(f"gpus: expected GPU indices like [0, 1], got {list(gpus)!r}")
    if len(set(items)) != len(items):
        raise UserError(f"gpus: GPU listed twice in {list(gpus)!r}")
    if device is not None:
        raise UserError("device cannot be combined with gpus (each GPU worker trains on its own cuda device)")
    return items


def _check_flags(gpus: list[str] | list[int] | None, device: str | None, pack: str | int) -> tuple[list[str], str | int]:
    """The arguments that need neither a config nor a storage, checked first: (GPUs, pack size)."""
    from ..devices import check_available, check_device_name
    from ..study.pack_size import parse_pack

    check_device_name(device, "device")
    gpu_list = _check_gpus(gpus, device)
    if isinstance(pack, bool) or not isinstance(pack, (str, int)):
        raise UserError(f"pack: expected auto or an integer >= 1, got {pack!r}")
    try:
        pack_size = parse_pack(str(pack))
    except UserError:
        raise UserError(f"pack: expected auto or an integer >= 1, got {pack!r}") from None
    check_available(device, "device")
    if gpu_list:
        check_available("cuda", "gpus")
    return gpu_list, pack_size


def _check_callbacks_arg(callbacks: Sequence[Callback], gpus: list[str], observer: StudyObserver | None = None) -> None:
    if isinstance(callbacks, (str, bytes)) or not all(callable(c) for c in callbacks):
        raise UserError("callbacks: expected a list of callables (study, frozen_trial)")
    if callbacks and gpus:
        raise UserError("callbacks: run in this process only, so not with gpus (use study.callbacks in the config)")
    if observer is not None and gpus:
        raise UserError("observer: sees the trials of this process only, so not with gpus")


def _checked_arguments(n_trials: int | str | BudgetChange | None, gpus: list[str] | list[int] | None,
                       device: str | None, pack: str | int, callbacks: Sequence[Callback],
                       observer: StudyObserver | None, overrides: Sequence[str]) -> tuple[BudgetChange | None, list[str], str | int]:
    """``run_study``'s and ``resume_study``'s arguments that need neither a config nor a storage,
    checked before either is touched: (the budget change, the GPUs, the pack size)."""
    from ..study.create import budget_change

    change = budget_change(n_trials) if n_trials is not None else None
    gpu_list, pack_size = _check_flags(gpus, device, pack)
    _check_callbacks_arg(callbacks, gpu_list, observer)
    _check_override_budget(overrides, n_trials)
    return change, gpu_list, pack_size


def _run(name: str, url: str, gpus: list[str], device: str | None, pack_size: str | int, log: Log,
         callbacks: Sequence[Callback], fresh_process: bool = False, launcher: Launcher | None = None,
         observer: StudyObserver | None = None) -> None:
    from ..study.loop import run_trials
    from ..study.workers import run_gpu_workers

    if gpus:
        code = run_gpu_workers(name, url, gpus, log=log, pack=pack_size, fresh_process=fresh_process)
        if code:
            raise WorkersFailed(code)
        return
    summary = run_trials(name, url, device=device, log=log, pack=pack_size, callbacks=callbacks, fresh_process=fresh_process,
                         launcher=launcher, observer=observer)
    states = ", ".join(f"{k} {v}" for k, v in sorted(summary.states.items())) or "no trials"
    log(f"done: {summary.ran} trials this run ({states}) in {summary.seconds:.1f} s; {summary.stopped_because}")


@one_line_storage_faults
def run_study(
    config: str | Path | Mapping[str, Any] | Config,
    *,
    storage: str | None = None,
    n_trials: int | str | BudgetChange | None = None,
    device: str | None = None,
    pack: str | int = "auto",
    gpus: list[str] | list[int] | None = None,
    allow_space_change: bool = False,
    create_only: bool = False,
    log: Log | None = None,
    callbacks: Sequence[Callback] = (),
    fresh_process: bool = False,
    observer: StudyObserver | None = None,
    overrides: Sequence[str] = (),
) -> optuna.Study:
    """Create the study ``config`` describes (or continue it) and run trials until its budget is spent.

    ``config``: a YAML path, the same content as a dict, or a :class:`~sassha_tune.config.Config`.
    ``storage``: a SQLAlchemy URL (default: ``study.storage`` of the config, else
    ``$SASSHA_TUNE_STORAGE``, else ``sqlite:///sassha-tune.db``). ``n_trials`` sets the study's
    total budget (all runs and workers together): an integer, or ``"+N"`` for N more than the
    budget the study has (the config's for a new study); below the trials the study has already
    counted it is refused (:class:`~sassha_tune.errors.UserError`, nothing changed). Without it a
    continued study keeps the larger of its stored budget and the config's (a line says so); ``device`` overrides the config's; ``pack`` is ``"auto"``, ``1`` or ``K`` trials
    per process (docs/packs.md); ``gpus`` starts one worker process per listed GPU;
    ``create_only`` creates (or checks) the study and runs nothing; ``callbacks``: Optuna-style
    callables ``(study, frozen_trial)`` told of every finished trial, after the config's
    ``study.callbacks`` (in this process only, so not with ``gpus``). ``fresh_process``: a fresh
    trial process per trial instead of one warm trial worker (as ``study.fresh_process: true``).
    ``observer``: a :class:`~sassha_tune.study.progress.StudyObserver` told the study loop's events
    (trial started, epochs, phases, steps within an epoch if it ``watches_steps``, trial finished;
    in this process only, so not with ``gpus``),
    nothing by default; one that raises gets a warning line and is told nothing more. Same as ``sassha-tune run`` (whose live view on a terminal is such an observer).
    ``overrides``: ``key.path=value`` strings (``--set``, docs/config.md) put into the config before
    it is validated; the study stores the config with them.
    """
    from ..config import advice, with_model_normalization
    from ..devices import check_available
    from ..study.callbacks import check_callbacks
    from ..study.create import create_or_continue
    from ..study.storage import resolve_storage
    from ..trial.objective import check_task_inputs
    from ..trial.preflight import check_task

    log = log or default_log
    change, gpu_list, pack_size = _checked_arguments(n_trials, gpus, device, pack, callbacks, observer, overrides)
    with _early_launcher(gpu_list, fresh_process, log, run=not create_only) as launcher:
        cfg = _as_config(config, overrides)  # everything validated before any storage is touched
        url = resolve_storage(storage, cfg)
        if not gpu_list:
            check_available(device or cfg.device.name)  # a GPU this machine lacks costs no study
        check_task_inputs(cfg)  # a missing dataset file or train function costs no study
        check_callbacks(cfg.study.callbacks)  # nor a tracker whose package is missing
        _keep_worker(launcher, cfg, pack_size, device)
        # nor data or a model that every trial would fail on; a plug-in model's normalization
        # layers are known once it is built, and may choose the search space
        with_model_normalization(cfg, check_task(cfg))
        for note in advice(cfg):
            log(f"note: {note}")
        create_or_continue(cfg, url, allow_space_change=allow_space_change, budget=change, log=log)
        if not create_only:
            _run(cfg.study.name, url, gpu_list, device, pack_size, log, callbacks, fresh_process=fresh_process,
                 launcher=launcher, observer=observer)
    return _reloaded(cfg.study.name, url)


@one_line_storage_faults
def resume_study(
    name: str,
    *,
    storage: str | None = None,
    n_trials: int | str | BudgetChange | None = None,
    device: str | None = None,
    pack: str | int = "auto",
    gpus: list[str] | list[int] | None = None,
    log: Log | None = None,
    callbacks: Sequence[Callback] = (),
    fresh_process: bool = False,
    observer: StudyObserver | None = None,
    overrides: Sequence[str] = (),
) -> optuna.Study:
    """Continue a stored study from its stored config: lost trials are failed and retried, the budget
    is finished. Same as ``sassha-tune resume``; the arguments are those of :func:`run_study`.
    ``overrides`` (``--set``) may change only what a stored study may change (budget, sampler,
    pruner, heartbeats, device: ``study.create.OVERRIDABLE``); the others are refused, nothing stored."""
    from ..config.overrides import parse_overrides
    from ..devices import check_available
    from ..study.create import check_budget, overridden_config, set_budget, store_overridden
    from ..study.storage import load_study, resolve_storage
    from ..trial.preflight import check_task

    log = log or default_log
    change, gpu_list, pack_size = _checked_arguments(n_trials, gpus, device, pack, callbacks, observer, overrides)
    parse_overrides(overrides)  # a malformed one costs no storage
    url = resolve_storage(storage)
    with _early_launcher(gpu_list, fresh_process, log) as launcher:
        study = load_study(name, url)
        cfg, overridden = overridden_config(study, overrides)  # validated, nothing written yet
        if not gpu_list:
            check_available(device or cfg.device.name)  # before the budget changes or a trial is asked
        if change is not None:
            check_budget(study, change)  # refused before the data check; set after it (checked again)
        _keep_worker(launcher, cfg, pack_size, device)
        check_task(cfg)  # a plug-in's data, checked again: it may have changed since the study was created
        if overridden is not None:
            store_overridden(study, overridden, overrides, log=log)
        if change is not None:
            set_budget(study, change, log=log)
        _run(name, url, gpu_list, device, pack_size, log, callbacks, fresh_process=fresh_process, launcher=launcher,
             observer=observer)
    return _reloaded(name, url)


@one_line_storage_faults
def rerun_study(
    name: str,
    seeds: str | Sequence[int],
    *,
    trial: int | None = None,
    storage: str | None = None,
    device: str | None = None,
    log: Log | None = None,
    callbacks: Sequence[Callback] = (),
    fresh_process: bool = False,
    observer: StudyObserver | None = None,
) -> optuna.Study:
    """Re-run trial ``trial`` of study ``name`` (default: its best, as ``export`` chooses it) with
    each training seed of ``seeds`` (``"1,2,3"`` or a list), as trials of the companion study
    ``<name>-seeds`` run by the study loop (:mod:`sassha_tune.study.reruns`): crash-safe, and
    resumable by calling it again (only the seeds without a re-run are run). Same as
    ``sassha-tune rerun``; returns the companion study, whose trials ``report`` and ``compare``
    show as seed re-runs (mean, spread and a 95 % interval)."""
    from ..devices import check_available
    from ..study.create import stored_config
    from ..study.reruns import parse_seeds, prepare_reruns
    from ..study.storage import load_study, resolve_storage
    from ..trial.objective import check_task_inputs
    from ..trial.preflight import check_task

    log = log or default_log
    wanted = parse_seeds(seeds, "seeds" if not isinstance(seeds, str) else "--seeds")
    if trial is not None and (isinstance(trial, bool) or not isinstance(trial, int) or trial < 0):
        raise UserError(f"--trial: expected a trial number >= 0, got {trial!r}")
    _, pack_size = _check_flags(None, device, 1)
    _check_callbacks_arg(callbacks, [], observer)
    url = resolve_storage(storage)
    with _early_launcher([], fresh_process, log) as launcher:
        stored, _ = stored_config(load_study(name, url))  # a missing study: one line, before anything is created
        check_available(device or stored.device.name)  # the re-runs' device and data are the study's
        check_task_inputs(stored)
        companion, cfg = prepare_reruns(name, url, wanted, number=trial, log=log)
        _keep_worker(launcher, cfg, pack_size, device)
        check_task(cfg)
        _run(companion, url, [], device, pack_size, log, callbacks, fresh_process=fresh_process, launcher=launcher,
             observer=observer)
    return _reloaded(companion, url)


@one_line_storage_faults
def run_worker(
    name: str,
    *,
    storage: str | None = None,
    worker_id: int | None = None,
    device: str | None = None,
    pack: str | int = "auto",
    log: Log | None = None,
    fresh_process: bool = False,
    observer: StudyObserver | None = None,
    overrides: Sequence[str] = (),
) -> LoopSummary:
    """Join the stored study ``name`` (e.g. on PostgreSQL from another machine) and run its trials
    until its budget is spent, beside other workers. Same as ``sassha-tune worker``.
    ``worker_id`` is mixed into the sampler seed (default: the process id); ``overrides`` (``--set``)
    are checked against what a stored study may change and stored before a trial is asked. The
    others as in :func:`run_study`. Returns what this worker ran
    (:class:`~sassha_tune.study.loop.LoopSummary`)."""
    import os

    from ..study.create import overridden_config, store_overridden
    from ..study.loop import run_trials
    from ..study.storage import load_study, resolve_storage

    log = log or default_log
    _, pack_size = _check_flags(None, device, pack)
    url = resolve_storage(storage)
    if overrides:  # validated and checked against what a stored study may change before anything is stored
        stored = load_study(name, url)
        _, overridden = overridden_config(stored, overrides)
        store_overridden(stored, overridden, overrides, log=log)
    worker: int | str = worker_id if worker_id is not None else f"pid{os.getpid()}"
    # run_trials checks the stored config's device before it asks a trial
    summary = run_trials(name, url, worker=worker, device=device, log=log, pack=pack_size, fresh_process=fresh_process,
                         observer=observer)
    log(f"worker done: {summary.ran} trials in {summary.seconds:.1f} s; {summary.stopped_because}")
    return summary


@contextmanager
def _early_launcher(gpus: list[str], fresh_process: bool, log: Log, *, run: bool = True) -> Iterator[Launcher | None]:
    """The study loop's :class:`~sassha_tune.study.loop.Launcher`, its warm trial worker started
    first, before the config is validated or read from the storage (which imports torch here),
    the data check and the study's creation, so that its own start and imports overlap all of them;
    :func:`_keep_worker` decides once the config is known; closed on the way out, whatever happens
    (a worker that never had a job at once). None with ``gpus`` (each GPU worker has its own) or
    ``run`` False."""
    if gpus or not run:
        yield None
        return
    from ..study.loop import Launcher

    launcher = Launcher(fresh_process, log)
    try:
        launcher.spawn()
        yield launcher
    finally:
        launcher.close()


def _keep_worker(launcher: Launcher | None, cfg: Config, pack_size: str | int, device: str | None) -> None:
    """The early worker kept when the study's trials run in one, else closed (packs, fresh
    processes, multi-rank trials): :meth:`~sassha_tune.study.loop.Launcher.prestart`."""
    if launcher is not None:
        launcher.prestart(cfg, pack_size, device)


def _reloaded(name: str, url: str) -> optuna.Study:
    """The study as stored now (trials told by worker processes included)."""
    from ..study.storage import load_study

    return load_study(name, url)
