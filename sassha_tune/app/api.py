"""The commands as Python functions: ``run_study`` and ``resume_study`` (``run``, ``resume``),
``rerun_study`` (``rerun``), ``run_worker`` (``worker``), ``init_config`` (``init``), ``export``
(``export``), ``write_report`` and ``write_comparison`` (``report``, ``compare``) and
``trials_dataframe``; in a notebook ``sassha_tune.report`` and ``sassha_tune.compare`` (the
package :mod:`sassha_tune.report`) return what they wrote. The command line calls only this layer
(:mod:`sassha_tune.app.cli`; what ``status`` and ``train`` show: :mod:`~sassha_tune.app.status`,
:mod:`~sassha_tune.app.train`).

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

import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import StorageError, UserError

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from ..config import Config
    from ..report.files import Written
    from ..study.create import BudgetChange
    from ..study.loop import Launcher, LoopSummary
    from ..study.progress import StudyObserver

Log = Callable[[str], None]
Callback = Callable[["optuna.Study", "FrozenTrial"], None]

_logger = logging.getLogger("sassha_tune")


class WorkersFailed(UserError):
    """A GPU worker process (``gpus=[...]``) exited with an error; its own output says why."""

    def __init__(self, code: int) -> None:
        super().__init__(f"a GPU worker exited with code {code} (its output above says why)")
        self.exit_code = code


def storage_fault_line(exc: BaseException) -> str | None:
    """The one line that says what went wrong when ``exc`` is a storage fault (a corrupt, read-only,
    full or locked database; the storage named, passwords masked), else None."""
    from ..study.storage import storage_fault

    return storage_fault(exc)


def _storage_faults_in_one_line(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError:
            raise
        except Exception as exc:
            message = storage_fault_line(exc)
            if message is None:
                raise
            raise StorageError(message) from None

    return wrapper


def _default_log(message: str) -> None:
    _logger.info(message)


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


@_storage_faults_in_one_line
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

    log = log or _default_log
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


@_storage_faults_in_one_line
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

    log = log or _default_log
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


@_storage_faults_in_one_line
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

    log = log or _default_log
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


@_storage_faults_in_one_line
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

    log = log or _default_log
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


def init_config(out: str | Path = "study.yaml", *, dataset: str | None = None, model: str | None = None,
                optimizer: str = "sassha", own_loop: bool = False, data_dir: str | None = None,
                log: Log | None = None) -> list[Path]:
    """Write a starter config to ``out`` (``sassha-tune init``): a built-in ``dataset`` and ``model``
    (defaults: MNIST-1D and a model that fits the dataset) or, with ``own_loop``, your own training
    function in a module written beside it (``<name>_train.py``); the study is named after the
    file. The config is validated before anything is written and runs as it is; an existing file
    is never overwritten (a :class:`UserError`, nothing written). Returns the files written."""
    from ..config.starter import default_model, module_name, starter_config

    log = log or _default_log
    path = Path(out)
    dataset = _starter_dataset(path, dataset, model, own_loop, data_dir)
    module = path.parent / f"{module_name(path.stem)}.py" if own_loop else None
    _check_targets(path, [path] + ([module] if module is not None else []))
    if module is not None:
        text = starter_config(name=path.stem, config=str(path), optimizer=optimizer, train=f"{module.stem}:train")
    else:
        text = starter_config(name=path.stem, config=str(path), optimizer=optimizer, dataset=dataset,
                              model=model or default_model(str(dataset)), data_dir=data_dir)
    written = _write_starter(path, text, module, optimizer)
    for done in written:
        log(f"wrote {done}")
    return written


def _starter_dataset(path: Path, dataset: str | None, model: str | None, own_loop: bool,
                     data_dir: str | None) -> str | None:
    """``init_config``'s arguments checked (before any file is looked at): the built-in dataset the
    starter config uses (None with ``own_loop``)."""
    from ..config.starter import DEFAULT_DATASET, FILE_DATASETS

    if path.suffix not in (".yaml", ".yml"):
        raise UserError(f"--out {path}: expected a .yaml file name (the study is named after it)")
    if own_loop and (dataset is not None or model is not None or data_dir is not None):
        raise UserError("--own-loop: your training function brings its own data and model; "
                        "not with --dataset, --model or --data-dir")
    dataset = None if own_loop else dataset or DEFAULT_DATASET
    if dataset in FILE_DATASETS and data_dir is None:
        raise UserError(f"--dataset {dataset}: reads files (nothing is downloaded): give --data-dir DIR, where they are")
    return dataset


def _check_targets(path: Path, targets: list[Path]) -> None:
    """The files ``init`` would write: none a link, none there already, each in a directory."""
    from .outputs import check_output

    for target in targets:
        check_output(target, "--out", directory=False)
        if target.exists():
            raise UserError(f"--out {path}: {target} exists; init never overwrites a file (choose another --out, "
                            "or remove it)")
        if not target.parent.is_dir():
            raise UserError(f"--out {path}: directory {target.parent} does not exist")


def _write_starter(path: Path, text: str, module: Path | None, optimizer: str) -> list[Path]:
    """The starter config ``text`` written to ``path`` once it validates (and first the own-loop
    ``module`` it names); on any failure nothing is left behind. Returns the files written."""
    from ..config import config_from_dict, yaml_load
    from ..config.starter import starter_train_module
    from .outputs import write_output

    written: list[Path] = []
    try:
        if module is not None:  # first: the config names it, and validation imports it
            write_output(module, starter_train_module(optimizer), "--out")
            written.append(module)
        with _importable(path.parent):
            config_from_dict(yaml_load(text, "sassha-tune init"), source="sassha-tune init", name_from=str(path),
                             base_dir=path.resolve().parent)
        write_output(path, text, "--out")
        written.append(path)
    except BaseException:
        for done in written:
            done.unlink(missing_ok=True)
        raise
    return written


@contextmanager
def _importable(folder: Path) -> Iterator[None]:
    """``folder`` on ``sys.path`` for the block (an own-loop module written there, checked by
    importing it as a run does with ``PYTHONPATH=.``)."""
    import sys

    entry = str(folder.resolve())
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        if entry in sys.path:
            sys.path.remove(entry)


@_storage_faults_in_one_line
def export(study: str, *, storage: str | None = None, trial: int | None = None, format: str = "yaml",
           out: str | Path | None = None, model: bool = False) -> dict[str, Any] | Path:
    """``sassha-tune export`` from Python (``sassha_tune.export(...)``): the study's config with
    trial ``trial``'s (default: the best) parameters fixed, as a dict (``format="kwargs"``: the
    optimizer's class and constructor arguments), also written to ``out`` as YAML or JSON when
    given; ``model=True``: the trial's kept model file (``study.keep_models``) written to ``out``,
    whose path is returned."""
    from ..study.storage import load_study, resolve_storage
    from ..study.views import export_config, export_kwargs
    from .outputs import check_output, write_output

    if format not in ("yaml", "json", "kwargs"):
        raise UserError(f"format: expected yaml, json or kwargs, got {format!r}")
    url = resolve_storage(storage)
    if model:
        from ..study.models import export_model

        if out is None:
            raise UserError("model: give out=FILE (a model file is binary)")
        path = Path(out)
        check_output(path, "out")
        export_model(load_study(study, url), url, path, trial)
        return path
    s = load_study(study, url)
    d = export_kwargs(s, trial) if format == "kwargs" else export_config(s, trial)
    if out is not None:
        write_output(Path(out), export_text(d, format), "out")
    return d


def export_text(d: dict[str, Any], format: str) -> str:
    """An exported dict as the text ``export`` writes: YAML, or JSON for ``json`` and ``kwargs``."""
    import json

    import yaml

    return yaml.safe_dump(d, sort_keys=False) if format == "yaml" else json.dumps(d, indent=2) + "\n"


def write_report(study: str, *, storage: str | None = None, out: str | Path = "report",
                 echo: Log = print) -> Written:
    """``sassha-tune report``: the report of one study written to ``out``, its best trials and
    verdict through ``echo`` (:func:`~sassha_tune.report.study_report.run_report`)."""
    from ..report.study_report import run_report
    from ..study.storage import resolve_storage

    return run_report(study, resolve_storage(storage), Path(out), echo=echo)


def write_comparison(studies: Sequence[str], *, storage: str | None = None, out: str | Path = "compare") -> Written:
    """``sassha-tune compare``: studies compared under equal budgets, written to ``out``, the
    ranking printed (:func:`~sassha_tune.report.compare.run_compare`)."""
    from ..report.compare import run_compare
    from ..study.storage import resolve_storage

    return run_compare(list(studies), resolve_storage(storage), Path(out))


def trials_dataframe(study: str | optuna.Study, *, storage: str | None = None) -> Any:
    """``study.trials_dataframe()`` (a pandas DataFrame, one row per trial: parameters, values and
    every stored metric as ``user_attrs_*`` columns) of a study or a study's name; without pandas
    a one-line :class:`UserError` saying how to install it (``pip install -e ".[pandas]"``)."""
    try:
        import pandas  # noqa: F401
    except ImportError:
        raise UserError('trials_dataframe: needs pandas, which is not installed: pip install pandas '
                        '(or pip install -e ".[pandas]" in a checkout)') from None
    if isinstance(study, str):
        from ..study.storage import load_study, resolve_storage

        study = load_study(study, resolve_storage(storage))
    return study.trials_dataframe()
