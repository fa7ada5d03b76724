"""The ask-tell loop: run a stored study's trials until its budget is spent.

Each iteration re-reads the stored config (another process may raise the budget), reconciles lost
trials, checks the budget, asks with a sampler seeded from the study's progress, trains the trials
asked (one, or a pack) as one job (:func:`run_pack`: a single trial is a pack of one) and tells each
outcome. A single trial's job runs in the long-lived trial worker of its :class:`Launcher` (or, with
``fresh_process``, and for a multi-rank trial, in a fresh process); a pack's in a fresh process. A
trial that runs past ``budget.trial_timeout`` is stopped and fails with ``failure_reason: timeout``.
Every epoch passes the chance guard (:mod:`.chance_guard`) and the pruner; a trial process killed by
SIGKILL leaves its trial ``lost``, retried once (:func:`~.liveness.retry_lost`).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from ..config import Config, config_to_dict
from ..config.search import make_sampler, resolve_pruner
from ..config.spaces import SearchSpace, suggest, trial_hparams
from ..devices import check_available as check_device
from ..errors import UserError
from ..metrics.names import EPOCH_KEYS, LANGUAGE_EPOCH_KEYS, PER_EPOCH_METRICS, TRACKED_EPOCH_KEYS
from ..trial.attributes import (
    DIVERGED,
    EPOCHS_COMPLETED,
    FAILURE_REASON,
    HISTORY,
    NEAR_CHANCE,
    PRUNE_REASON,
    SEED_ATTR,
)
from ..trial.outcome import TrialOutcome
from ..trial.process import STEP_SECONDS, TrialProcess, WarmWorker, Watchdog
from .budget import budget_used, counts_toward_budget
from .callbacks import Callback, make_callbacks, notify
from .chance_guard import ChanceGuard, unjudged_accuracy
from .create import config_from_payload, plain, stored_payload
from .liveness import Heartbeat, reconcile, retry_lost, taken_over
from .models import ModelKeeper, check_model_store
from .progress import GuardedObserver, StudyObserver
from .reruns import runs_only_enqueued
from .samplers import make_pruner, trial_seed
from .storage import load_study, study_storage, trial_id, with_retry
from .tell import fail, finish

__all__ = ["WORKER_KEY", "Launcher", "LoopSummary", "run_trials", "start_trial", "run_pack", "split_line",
           "sampler_for", "pruner_for"]

WORKER_KEY = "sassha_tune:worker"
# What the ``history`` user attribute keeps of each epoch message.

Log = Callable[[str], None]


def sampler_for(cfg: Config, seed: int) -> optuna.samplers.BaseSampler:
    """The study's sampler (``study.sampler``) seeded with ``seed`` for one ask."""
    s = cfg.study.sampler
    return make_sampler(s.name, s.options, seed, qmc_seed=cfg.sampler_seed)


def pruner_for(cfg: Config) -> optuna.pruners.BasePruner:
    """The study's pruner (``study.pruner``; ``auto``: :func:`sassha_tune.config.search.auto_pruner`'s
    choice, judging only the early rungs: :class:`~.samplers.EarlyRungsOnly`)."""
    return make_pruner(cfg.study.pruner.name, cfg.study.pruner.options, max_resource=cfg.task.epochs,
                       can_prune=cfg.can_prune)


def prunes(cfg: Config) -> bool:
    """Whether a trial of this study may be stopped after an epoch (a pruner or the chance guard)."""
    name, _ = resolve_pruner(cfg.study.pruner.name, cfg.study.pruner.options, epochs=cfg.task.epochs,
                             can_prune=cfg.can_prune)
    return name != "none" or ChanceGuard(cfg).active


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
        return f"trial {frozen.number} FAIL ({frozen.user_attrs.get(FAILURE_REASON)})"
    if frozen.state == TrialState.PRUNED:
        epochs = frozen.user_attrs.get(EPOCHS_COMPLETED)
        if frozen.user_attrs.get(FAILURE_REASON) == DIVERGED:  # told pruned so that the sampler sees it
            return f"trial {frozen.number} PRUNED (diverged in epoch {(epochs or 0) + 1})"
        why = "near chance" if frozen.user_attrs.get(PRUNE_REASON) == NEAR_CHANCE else "by the pruner"
        return f"trial {frozen.number} PRUNED ({why}" + (f", after epoch {epochs})" if epochs else ")")
    return f"trial {frozen.number} {state}"


def run_trials(
    study_name: str,
    storage_url: str,
    *,
    worker: int | str = 0,
    device: str | None = None,
    log: Log = print,
    pack: str | int = 1,
    callbacks: Sequence[Callback] = (),
    fresh_process: bool = False,
    launcher: Launcher | None = None,
    observer: StudyObserver | None = None,
) -> LoopSummary:
    """Run trials of a stored study until its budget (or ``budget.timeout``) is reached.

    ``pack`` (``--pack``): ``1`` one trial per process; ``K`` or ``"auto"``: up to K trials asked at
    once and trained together in one process (:mod:`sassha_tune.training.packs`) where they can be packed.
    After each trial is told, the config's ``study.callbacks`` and then ``callbacks`` (callables
    ``(study, frozen_trial)``) are called with it (:mod:`.callbacks`). Single trials run one after
    another in one long-lived trial worker (:class:`Launcher`), unless ``fresh_process``
    (``--fresh-process``) or the config's ``study.fresh_process`` asks for a fresh process per
    trial; packs and multi-rank trials always get fresh processes. ``launcher``: a
    :class:`Launcher` the caller started early (:meth:`Launcher.prestart`) and closes itself. ``observer``: told the loop's events as they happen
    (:mod:`.progress`; a live view), nothing by default."""
    from ..trial.objective import check_task_inputs

    study = load_study(study_name, storage_url)
    payload = stored_payload(study)
    cfg, space = config_from_payload(study_name, payload, validate=True)  # this worker starts on it
    check_device(device or cfg.device.name, "--device" if device else "device")  # before any trial is asked
    check_task_inputs(cfg)  # a missing dataset file or train function costs no study
    check_model_store(storage_url, cfg)  # nor a folder the kept models cannot go to
    keeper = ModelKeeper(storage_url, log)
    told_to = [*make_callbacks(cfg.study.callbacks, cfg.study.metrics), *((getattr(c, "__name__", type(c).__name__), c) for c in callbacks)]
    summary = LoopSummary()
    observer = GuardedObserver(observer, log) if observer is not None else StudyObserver()
    observer.study_started(study_name, cfg.study.metrics, [d.name.lower() for d in study.directions], cfg.task.epochs)
    start = time.monotonic()
    restore = _sigterm_as_interrupt()
    own_launcher = launcher is None
    launcher = launcher or Launcher(fresh_process, log)
    only_enqueued = runs_only_enqueued(with_retry(lambda: study.user_attrs))  # seed re-runs: one at a time
    run = _Run(study, payload, cfg, space, worker=worker, device=device, log=log, pack=1 if only_enqueued else pack,
               launcher=launcher, observer=observer, keeper=keeper, told_to=told_to, summary=summary, start=start,
               only_enqueued=only_enqueued)
    try:
        while not summary.stopped_because:
            summary.stopped_because = run.turn() or ""
    finally:
        if own_launcher:
            launcher.close()
        keeper.close()
        restore()
        summary.seconds = time.monotonic() - start
    observer.study_finished(summary.seconds, summary.stopped_because)
    return summary


@dataclass
class _Run:
    """One :func:`run_trials` call: the study as this process last read it and the loop's state."""

    study: optuna.Study
    payload: dict[str, Any]  # the stored config as last read
    cfg: Config
    space: SearchSpace
    worker: int | str
    device: str | None
    log: Log
    pack: str | int
    launcher: Launcher
    observer: StudyObserver
    keeper: ModelKeeper
    told_to: list[tuple[str, Callback]]
    summary: LoopSummary
    start: float
    only_enqueued: bool
    waiting: bool = False  # for trials of other processes (said once)
    pack_logged: str = ""  # the last pack-size line said
    warned_unjudged: bool = False  # one warning per run, not per trial
    taken: dict[int, str] = field(default_factory=dict)  # trials another process took over while this one ran them: their line

    def turn(self) -> str | None:
        """One turn of the loop: re-read the study, check its budget, ask and run the next trial
        (or pack) and record what was told; the reason the run stops, or None to go on."""
        self._reread()
        cfg, study = self.cfg, self.study
        trials = with_retry(study.get_trials, deepcopy=False)
        used = budget_used(trials)
        self.observer.budget(trials, cfg.budget.n_trials)
        if cfg.budget.timeout is not None and time.monotonic() - self.start >= cfg.budget.timeout:
            return f"timeout ({cfg.budget.timeout:g} s)"
        if used >= cfg.budget.n_trials:
            return self._wait_or_stop(trials, used)
        self.waiting = False
        if self.only_enqueued and not any(t.state == TrialState.WAITING for t in trials):
            return f"no re-run left to start ({used}/{cfg.budget.n_trials} trials)"
        study.sampler = sampler_for(cfg, trial_seed(cfg.sampler_seed, len(trials), self.worker))
        told = self._run_next(used)
        if not told:  # lost the race for the last slots of the budget
            return f"budget reached ({cfg.budget.n_trials} trials)"
        for frozen in told:
            self._record(frozen)
        return None

    def _reread(self) -> None:
        """Re-read: another process may have raised the budget (resume --n-trials) or continued
        the study with other sampler, pruner or device settings. Rebuilt only when it changed,
        and not validated again: what is stored was validated when it was written."""
        current = stored_payload(self.study)
        if current != self.payload:
            self.payload = current
            self.cfg, self.space = config_from_payload(self.study.study_name, current, validate=False)
        self.study.pruner = pruner_for(self.cfg)
        reconcile(self.study, self.cfg.study.stale_after, log=self.log)

    def _wait_or_stop(self, trials: list[FrozenTrial], used: int) -> str | None:
        """The budget is used: wait a moment while other processes run trials (if one died, they
        go stale and come back as retries; None: ask again), else stop."""
        running = [t.number for t in trials if t.state == TrialState.RUNNING]
        if not running:
            return f"budget reached ({used}/{self.cfg.budget.n_trials} trials)"
        if not self.waiting:
            self.log(f"waiting for running trial(s) {running} of other processes")
            self.waiting = True
        time.sleep(min(self.cfg.study.heartbeat_interval, 5.0))
        return None

    def _run_next(self, used: int) -> list[FrozenTrial]:
        """Ask the next trial, or a pack of them where the study packs, and run it; those told."""
        cfg, study = self.cfg, self.study
        size = 1
        if self.pack != 1:
            from .pack_size import choose_pack_size

            size, why = choose_pack_size(cfg, self.pack, device=self.device, budget_left=cfg.budget.n_trials - used)
            if why != self.pack_logged:
                self.log(why)
                self.pack_logged = why
            size = min(size, cfg.budget.n_trials - used)
        asked = [with_retry(study.ask) for _ in range(max(size, 1))]
        return run_pack(study, asked, cfg, self.space, device=self.device, worker=self.worker, log=self.log,
                        observer=self.observer, taken_over=self.taken, keeper=self.keeper, launch=self.launcher.launch)

    def _record(self, frozen: FrozenTrial) -> None:
        """A told trial: counted, its line, the callbacks."""
        self.summary.ran += 1
        self.summary.states[frozen.state.name] += 1
        self.log(self.taken.pop(frozen.number, None) or _describe(frozen, self.cfg))
        if not self.warned_unjudged and (warning := unjudged_accuracy(self.cfg, frozen)):
            self.log(warning)
            self.warned_unjudged = True
        self.observer.trial_finished(frozen)
        notify(self.told_to, self.study, frozen, self.log)


def start_trial(study: optuna.Study, trial: optuna.Trial, cfg: Config, space: SearchSpace
                ) -> tuple[dict[str, Any], int] | None:
    """Claim an asked trial for this process: record the worker, fail it as ``over_budget`` when
    another worker filled the budget first (then None), else sample its params and store the
    optimizer's constructor arguments and the seed; returns (params, seed). The seed is the
    config's, or the ``seed`` user attribute a trial was enqueued with (seed re-runs,
    :mod:`.reruns`; a lost trial's retry keeps it). Shared by single trials and packs (whose
    studies enqueue no other seed: a study of re-runs runs one trial at a time)."""
    with_retry(study_storage(study).set_trial_system_attr, trial_id(trial), WORKER_KEY,
               f"{os.uname().nodename}:{os.getpid()}")
    before = [t for t in with_retry(study.get_trials, deepcopy=False)
              if t.number < trial.number and counts_toward_budget(t)]
    if len(before) >= cfg.budget.n_trials:
        fail(study, trial, "over_budget")
        return None
    params = suggest(trial, space)
    hparams = trial_hparams(cfg, params)
    seed = with_retry(lambda: trial.user_attrs).get(SEED_ATTR, cfg.seed)
    with_retry(trial.set_user_attr, "optimizer_hparams", plain(dict(hparams)))
    with_retry(trial.set_user_attr, SEED_ATTR, seed)
    return params, seed


def _seeded(cfg: Config, seed: int) -> Config:
    """``cfg`` with the trial's training seed (itself when it is the config's)."""
    return cfg if seed == cfg.seed else dataclasses.replace(cfg, seed=seed)


def _job_message(study: optuna.Study, cfg: Config, params: Any, device: str | None, *, watched: bool = False,
                 save_model: str | list[str | None] | None = None) -> dict[str, Any]:
    """The trial protocol's job (:mod:`sassha_tune.trial`): one trial's params, or a pack's list;
    ``watched``: ask for step messages every ``STEP_SECONDS`` (an observer shows progress within an epoch);
    ``save_model``: where the trial (a pack: each member) writes its model file (``study.keep_models``)."""
    return {
        "study": study.study_name,
        "config": config_to_dict(cfg),  # validated: the trial process rebuilds it as is
        "params": params,
        "device": device,
        # the child waits for go/stop after each epoch when a pruner or the chance guard may stop it
        "prune": prunes(cfg),
        "steps": STEP_SECONDS if watched else None,
        "save_model": save_model,
    }


def _stored_history(epochs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``history`` user attribute: one entry per epoch the trial reported (a language model's
    perplexity and the sharpness measured during training where the epoch has them)."""
    extra = (*LANGUAGE_EPOCH_KEYS, *TRACKED_EPOCH_KEYS)
    return [{k: m.get(k) for k in EPOCH_KEYS} | {k: m[k] for k in extra if k in m} for m in epochs]


def _with_history(outcome: TrialOutcome) -> TrialOutcome:
    """A ``result``'s outcome with its ``history`` attribute: the epochs reported before it."""
    outcome.attrs[HISTORY] = _stored_history(outcome.history)
    return outcome


def reported_metric(cfg: Config) -> str | None:
    """The per-epoch value every trial reports to Optuna (``trial.report``): the objective of a
    single-objective study whose metric is measured per epoch; None otherwise (Optuna has no
    intermediate values for several objectives)."""
    metrics = cfg.study.metrics
    return metrics[0] if len(metrics) == 1 and metrics[0] in PER_EPOCH_METRICS else None


class _Relay:
    """Reads a job's messages to the end (:meth:`run`). ``pending`` maps the job's members
    (``None`` for a single trial) to their asked trials: an epoch of a pending trial is reported to
    it (``report_metric``, whether the study prunes or not: the learning curves of the dashboard and
    ``plot_intermediate_values``), and when ``prune`` is true, answered prune / go; its result is
    popped from ``pending`` and handed to ``on_result`` (with the epochs before it as
    ``outcome.history``). ``guard``: the chance guard (:mod:`.chance_guard`), asked first; a trial
    it stops is told PRUNED with ``prune_reason: near_chance``. ``observer`` is told a pending
    trial's epochs and phases; ``on_started`` is called when the process says it took the job up
    (the trial timeout's clock); other message types are ignored."""

    def __init__(
        self,
        proc: TrialProcess,
        pending: dict[int | None, optuna.Trial],
        report_metric: str | None,
        prune: bool,
        on_result: Callable[[int | None, optuna.Trial, TrialOutcome], None],
        on_split: Callable[[dict[str, Any]], None] | None = None,
        guard: ChanceGuard | None = None,
        observer: StudyObserver | None = None,
        on_started: Callable[[], None] | None = None,
    ) -> None:
        self.proc, self.pending, self.report_metric, self.prune = proc, pending, report_metric, prune
        self.on_result, self.on_split, self.guard, self.observer = on_result, on_split, guard, observer
        self.on_started = on_started
        self.epochs: dict[int | None, list[dict[str, Any]]] = {key: [] for key in pending}
        self.user_error: str | None = None  # the user error the process reported
        self.guarded: set[int | None] = set()  # members the chance guard stopped

    def run(self) -> tuple[str | None, dict[int | None, list[dict[str, Any]]]]:
        """(The user error the process reported, or None; the epochs by member)."""
        handlers = {"epoch": self._epoch, "result": self._result, "split": self._split, "phase": self._phase,
                    "step": self._step, "user_error": self._user_error, "started": self._started}
        for msg in self.proc.messages():
            handler = handlers.get(msg.get("type"))
            if handler is not None:
                handler(msg, msg.get("member"))
        return self.user_error, self.epochs

    def _epoch(self, msg: dict[str, Any], key: int | None) -> None:
        metrics, epoch = msg.get("metrics", {}), int(msg["epoch"])
        self.epochs[key].append(metrics)
        trial = self.pending.get(key)
        if self.observer is not None and trial is not None:
            self.observer.epoch(trial.number, epoch, metrics)
        value = metrics.get(self.report_metric) if self.report_metric is not None else None
        reported = isinstance(value, int | float) and not isinstance(value, bool) and trial is not None
        if reported:
            with_retry(trial.report, float(value), epoch)
        if not self.prune:
            return
        if trial is not None and self.guard is not None and self.guard.stops(epoch, metrics):
            self.guarded.add(key)
            self.proc.answer(True)
        else:
            self.proc.answer(bool(reported and trial.should_prune()))

    def _result(self, msg: dict[str, Any], key: int | None) -> None:
        if key not in self.pending:
            return
        outcome = TrialOutcome.from_message(msg, self.epochs[key])
        if key in self.guarded and outcome.state == "pruned":
            outcome.attrs[PRUNE_REASON] = NEAR_CHANCE
        self.on_result(key, self.pending.pop(key), outcome)

    def _split(self, msg: dict[str, Any], key: int | None) -> None:
        if self.on_split is not None:
            self.on_split(msg)

    def _phase(self, msg: dict[str, Any], key: int | None) -> None:
        if self.observer is not None and key in self.pending:
            self.observer.phase(self.pending[key].number, str(msg.get("phase")))

    def _step(self, msg: dict[str, Any], key: int | None) -> None:
        if self.observer is None:
            return
        for member in msg.get("members", [None]):  # a pack's: the members of the pack training now
            if member in self.pending:
                self.observer.step(self.pending[member].number, int(msg["epoch"]), int(msg["step"]), int(msg["steps"]))

    def _user_error(self, msg: dict[str, Any], key: int | None) -> None:
        self.user_error = str(msg.get("message"))

    def _started(self, msg: dict[str, Any], key: int | None) -> None:
        if self.on_started is not None:
            self.on_started()


class _Received:
    """The outcomes of a job's trials that this process has (a trial process's ``result``, or what
    its end means: a timeout, a kill) until each is stored: Ctrl-C, SIGTERM or SIGHUP arriving
    in between stores them rather than failing their trials as interrupted."""

    def __init__(self, study: optuna.Study, cfg: Config, log: Log, keeper: ModelKeeper | None = None) -> None:
        self.study, self.cfg, self.log, self.keeper = study, cfg, log, keeper
        self.waiting: dict[int, tuple[optuna.Trial, TrialOutcome]] = {}  # trial number -> (trial, outcome)
        self.stored: set[int] = set()

    def add(self, trial: optuna.Trial, outcome: TrialOutcome) -> None:
        """``outcome`` is the trial's, to be stored as it is."""
        self.waiting[trial.number] = (trial, outcome)

    def tell(self, trial: optuna.Trial) -> FrozenTrial:
        """Store the trial's outcome (:meth:`add` first); its model first, when the study keeps it."""
        if self.keeper is not None:
            self.keeper.keep(self.study, trial, self.waiting[trial.number][1], self.cfg)
        frozen = _told(self.study, trial, self.waiting[trial.number][1], self.log, self.cfg)
        self.waiting.pop(trial.number)
        self.stored.add(trial.number)
        return frozen

    def store_waiting(self) -> list[optuna.Trial]:
        """Store every outcome not stored yet, each with a line; the trials that could not be."""
        left = []
        for trial, _ in list(self.waiting.values()):
            try:
                frozen = self.tell(trial)
            except UpdateFinishedTrialError:  # told already, just before the interrupt
                self.waiting.pop(trial.number)
                self.stored.add(trial.number)
                continue
            except Exception:
                left.append(trial)
                continue
            with suppress(OSError):
                self.log(f"{_describe(frozen, self.cfg)} (its outcome came before the interrupt: stored)")
        return left


def _release_interrupted_frames(exc: BaseException) -> None:
    """Ctrl-C can land inside a storage write. The interrupted frames, kept alive by the
    exception's traceback, then hold an SQLite connection in the middle of its transaction, and
    its lock makes every write below wait out the busy timeout (a run hung for a minute or more
    about once in twenty Ctrl-Cs). Clearing those frames' variables and collecting lets the
    connection roll back and go; the exception itself is re-raised unchanged."""
    traceback.clear_frames(exc.__traceback__)
    gc.collect()


@contextmanager
def _failed_when_unwinding(
    study: optuna.Study, unfinished: Callable[[], list[optuna.Trial]], procs: Sequence[TrialProcess], log: Log,
    interrupted: Callable[[list[optuna.Trial]], str], received: _Received | None = None,
) -> Iterator[None]:
    """Whatever stops a run early stops its process and fails its unfinished trials, with the
    reason: Ctrl-C (``interrupted``; an outcome already ``received`` is stored instead), a user
    error (``error: <message>``), a crash of this process."""
    try:
        yield
    except KeyboardInterrupt as exc:
        # A second Ctrl-C (or SIGTERM, SIGHUP) while the first is being handled would leave the
        # trial RUNNING (reclaimed later as lost): the run is already stopping, so ignore it until
        # the trials are marked.
        with _signals_ignored():
            _release_interrupted_frames(exc)
            _stop(procs)
            _fail_interrupted(study, unfinished, log, interrupted, received)
        raise
    except UpdateFinishedTrialError:
        # a trial of this job was finished by another process (taken over: the caller says so)
        _stop(procs, retire="its trial was taken over")
        raise
    except UserError as exc:
        _stop(procs)
        _fail_all(study, unfinished(), f"error: {exc}"[:300])
        raise
    except BaseException:
        _stop(procs)
        _fail_all(study, unfinished(), CRASHED)
        raise


def _stop(procs: Sequence[TrialProcess], retire: str = "") -> None:
    """Stop a job's processes; ``retire``: why a warm worker among them takes no further job."""
    for p in procs:
        if retire:
            p.retire(retire)
        p.stop()


def _fail_all(study: optuna.Study, trials: list[optuna.Trial], reason: str) -> None:
    for trial in trials:
        fail(study, trial, reason)


def _fail_interrupted(study: optuna.Study, unfinished: Callable[[], list[optuna.Trial]], log: Log,
                      interrupted: Callable[[list[optuna.Trial]], str], received: _Received | None) -> None:
    """Ctrl-C: store the outcomes already ``received``, fail the other unfinished trials as
    ``interrupted`` and say so (``interrupted``: the line)."""
    left = received.store_waiting() if received is not None else []
    stored = received.stored if received is not None else set()
    trials = [t for t in unfinished() if t.number not in stored]
    trials += [t for t in left if t.number not in {u.number for u in trials}]
    _fail_all(study, trials, "interrupted")
    if trials:
        with suppress(OSError):  # the terminal closed (SIGHUP): the line has nowhere to go
            log(interrupted(trials))


@contextmanager
def _signals_ignored() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP ignored inside (main thread only; elsewhere signals never arrive)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, *INTERRUPTING)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# What a trial process killed by SIGKILL (by hand, by the out-of-memory killer, by a scheduler)
# leaves: its trial is lost, as if the machine had gone, and retried once (README, liveness).
LOST = "lost"
KILLED_WHY = "trial process killed by SIGKILL"
# What a trial stopped by budget.trial_timeout fails with (counted toward the budget, not retried).
TIMEOUT = "timeout"
# What a trial fails with when this process crashed while running it.
CRASHED = "error: sassha-tune crashed while running this trial"


def _exit_reason(rc: int | None, *, pack: bool) -> str:
    """Why a job's process that sent no result for a trial failed it: ``lost`` when SIGKILL ended
    it (retried once), else its exit code (a single trial's process: the signal that ended it)."""
    if rc == -signal.SIGKILL:
        return LOST
    if pack:
        return f"error: pack process exited with code {rc}"
    if rc is not None and rc < 0:
        return f"error: trial process killed by signal {-rc}"
    return f"error: trial process exited with code {rc}"


def _finish(study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome, cfg: Config) -> FrozenTrial:
    """Tell ``outcome`` under the study's rules (a diverged trial as pruned: :mod:`.tell`)."""
    return finish(study, trial, outcome, diverged_as_pruned=cfg.study.diverged_as_pruned,
                  reports=reported_metric(cfg) is not None)


def _told(study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome, log: Log, cfg: Config) -> FrozenTrial:
    """Tell ``outcome``; a trial lost to a killed process gets its retry (once, :func:`retry_lost`)."""
    frozen = _finish(study, trial, outcome, cfg)
    if outcome.state == "fail" and outcome.failure_reason == LOST:
        retry_lost(study, frozen, KILLED_WHY, log=log)
    return frozen


def _taken_over(study: optuna.Study, trial: optuna.Trial, cfg: Config, taken: dict[int, str]) -> FrozenTrial | None:
    """After the storage refused a write to ``trial`` (finished): the trial as another process
    stored it, its line in ``taken``; None when it is still RUNNING (the refusal was something else)."""
    frozen, line = taken_over(study, trial, cfg.study.stale_after)
    if line is None:
        return None
    taken[frozen.number] = line
    return frozen


class Launcher:
    """Where a single trial's job runs: the current :class:`WarmWorker` (the default), started on
    first use and replaced by a new one after a job that spent it (an unexpected error, out of
    memory, Ctrl-C, a kill, the trial timeout), with a log line; or a fresh :class:`TrialProcess`
    per trial with ``fresh_process`` or the job config's ``study.fresh_process``. Multi-rank trials
    (``device.processes > 1``) always get a fresh process."""

    def __init__(self, fresh_process: bool, log: Log) -> None:
        self.fresh_process, self.log = fresh_process, log
        self.worker: WarmWorker | None = None
        self.last: TrialProcess | None = None

    def spawn(self) -> None:
        """Start the warm worker before the study's config is known (validated, or read from the
        storage), unless ``fresh_process`` rules it out already: its process start and imports
        (torch, a few seconds) then overlap all of the study's own setup, the coordinator's
        imports included, instead of delaying the first trial. :meth:`prestart` keeps it or
        closes it once the config is known."""
        if self.worker is None and not self.fresh_process:
            self.worker = WarmWorker()  # announced by its first job (launch), after the study's own lines

    def prestart(self, cfg: Config, pack: str | int, device: str | None) -> None:
        """Have the warm worker running (started now, or kept from :meth:`spawn`) when this
        study's trials will run in one (single trials, as :func:`~.pack_size.choose_pack_size`
        decides), so that its process start and imports overlap the study's own setup (the data
        check, creating the study) instead of delaying the first trial; otherwise close one that
        :meth:`spawn` started (it never had a job)."""
        from .pack_size import choose_pack_size

        wanted = (self._warm(cfg.study.fresh_process, cfg.device.processes)
                  and choose_pack_size(cfg, pack, device=device, budget_left=cfg.budget.n_trials)[0] == 1)
        if not wanted:  # fresh processes, multi-rank trials, or packs (fresh processes): it would sit idle
            if self.worker is not None and self.worker.jobs == 0:
                self.worker.close()
                self.worker = None
            return
        if self.worker is None:
            self.worker = WarmWorker()  # announced by its first job (launch), after the study's own lines

    def _warm(self, fresh_process: bool, processes: int) -> bool:
        """Whether a job runs in the warm worker: not with fresh processes, nor for multi-rank trials."""
        return not (self.fresh_process or fresh_process or processes > 1)

    def launch(self, job: dict[str, Any]) -> TrialProcess:
        config = job["config"]
        pack = isinstance(job["params"], list)  # a pack always gets a fresh process
        if pack or not self._warm(bool(config.get("study", {}).get("fresh_process")),
                                  config.get("device", {}).get("processes", 1)):
            return TrialProcess(job)
        old = None
        if self.worker is None or self.worker.spent:
            old = self.worker
            if old is not None:
                old.close()
            self.worker = WarmWorker()
        if self.worker.jobs == 0:
            why = self.last.why_spent if self.last is not None and self.last.why_spent else "it ended"
            self.log(f"warm trial worker {self.worker.pid} started"
                     + (f" (replacing worker {old.pid} after {why})" if old is not None else ""))
        self.last = self.worker.start(job)
        return self.last

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


def _timeout_words(deadline: Watchdog, cfg: Config) -> str:
    """What a job did when its watchdog fired: ``ran past budget.trial_timeout (4 s)``, or for a
    process that never took the job up, ``did not start within 64 s (its process never took the job up)``."""
    if deadline.began:
        return f"ran past budget.trial_timeout ({cfg.budget.trial_timeout:g} s)"
    return f"did not start within {deadline.startup:g} s (its process never took the job up)"


def split_line(epoch: int, halves: list[list[int]]) -> str:
    """The one line that tells the user a pack was split, e.g. ``pack of 8 ran out of memory in
    epoch 1; retrying as 2 packs of 4 (trials [0, 1, 2, 3] and [4, 5, 6, 7])``."""
    sizes = [len(h) for h in halves]
    when = f"in epoch {epoch}" if epoch else "while setting up its members"
    how = f"2 packs of {sizes[0]}" if sizes[0] == sizes[1] else f"packs of {sizes[0]} and {sizes[1]}"
    return f"pack of {sum(sizes)} ran out of memory {when}; retrying as {how} (trials {halves[0]} and {halves[1]})"


def run_pack(
    study: optuna.Study, trials: list[optuna.Trial], cfg: Config, space: SearchSpace, *, device: str | None,
    worker: int | str, log: Log, observer: StudyObserver | None = None, taken_over: dict[int, str] | None = None,
    keeper: ModelKeeper | None = None, launch: Callable[[dict[str, Any]], TrialProcess] = TrialProcess,
) -> list[FrozenTrial]:
    """Asked trials -> one job in one trial process (``launch``: a fresh one by default) -> each
    trial told. A single trial is a pack of one: its job carries one trial's params and it is told
    when its process is done; K > 1 trials are trained together as a pack
    (:mod:`sassha_tune.training.packs`), each told as its member finishes.

    Returns the frozen trials told (a trial that lost the race for the budget is failed
    ``over_budget`` and left out). When another process took a trial over (this one was paused
    past ``study.stale_after``) the job's process is stopped: the trials taken over come back as
    stored, their lines in ``taken_over``; a pack's others, cut short with it, are failed as lost
    and retried."""
    job = _Job(study, cfg, log, keeper, pack=len(trials) > 1)
    try:
        job.run(trials, space, device=device, launch=launch, observer=observer)
    except UpdateFinishedTrialError:
        if not job.taken_over({} if taken_over is None else taken_over):
            raise
    return job.told


class _Job:
    """The trial bookkeeping of one job, a single trial or a pack: its trials claimed, the process
    started, its messages relayed, each trial's outcome told once, and whatever stops it early
    (:func:`_failed_when_unwinding`) failing the trials it leaves unfinished."""

    def __init__(self, study: optuna.Study, cfg: Config, log: Log, keeper: ModelKeeper | None, *, pack: bool) -> None:
        self.study, self.cfg, self.log, self.keeper, self.pack = study, cfg, log, keeper, pack
        self.received = _Received(study, cfg, log, keeper)
        self.started: list[optuna.Trial] = []  # trials claimed for this job
        self.pending: dict[int | None, optuna.Trial] = {}  # member (None: a single trial) -> trial without its result
        self.told: list[FrozenTrial] = []
        self.procs: list[TrialProcess] = []

    def unfinished(self) -> list[optuna.Trial]:
        return [t for t in self.started if t.number not in self.received.stored]

    def _interrupted(self, trials: list[optuna.Trial]) -> str:
        if self.pack:
            return f"trials {[t.number for t in trials]} interrupted: marked FAIL"
        return f"trial {self.started[0].number} interrupted: marked FAIL"

    def run(self, trials: list[optuna.Trial], space: SearchSpace, *, device: str | None,
            launch: Callable[[dict[str, Any]], TrialProcess], observer: StudyObserver | None) -> None:
        cfg = self.cfg
        with _failed_when_unwinding(self.study, self.unfinished, self.procs, self.log, self._interrupted, self.received):
            with ExitStack() as heartbeats:
                claimed = self._claim(trials, space, heartbeats, observer)
                if not claimed:
                    return
                job = self._message(claimed, device, watched=observer is not None and observer.watches_steps)
                self.procs.append(proc := launch(job))
                # a pack's members train together, so the pack as a whole gets one trial's timeout
                with Watchdog(proc, cfg.budget.trial_timeout) as deadline:
                    relay = _Relay(proc, self.pending, reported_metric(cfg), job["prune"], on_result=self._result,
                                   on_split=self._split, guard=ChanceGuard(cfg), observer=observer,
                                   on_started=deadline.begin)
                    user_error, epochs = relay.run()
                    proc.wait()
                if deadline.fired:
                    proc.retire("the trial timeout")  # signalled: even a worker that said done is replaced
                rc = proc.close()
                if user_error is not None:
                    raise UserError(user_error)
                self._end(rc, deadline, epochs)

    def _claim(self, trials: list[optuna.Trial], space: SearchSpace, heartbeats: ExitStack,
               observer: StudyObserver | None) -> list[tuple[dict[str, Any], int]]:
        """Claim each trial for this job (:func:`start_trial`) and say so; (params, seed) of each
        member, in order."""
        claimed: list[tuple[dict[str, Any], int]] = []
        for trial in trials:
            heartbeats.enter_context(Heartbeat(self.study, trial, self.cfg.study.heartbeat_interval))
            self.started.append(trial)
            started = start_trial(self.study, trial, self.cfg, space)
            if started is None:
                self.started.remove(trial)
                continue
            member = len(claimed) if self.pack else None
            self.pending[member] = trial
            claimed.append(started)
            params = started[0]
            as_member = f" (pack member {member})" if self.pack else ""
            self.log(f"trial {trial.number} started{as_member}: {fmt_params(params)}")
            if observer is not None:
                observer.trial_started(trial.number, params, member)
        return claimed

    def _message(self, claimed: list[tuple[dict[str, Any], int]], device: str | None, *, watched: bool) -> dict[str, Any]:
        """The job's message: a single trial's params and seed, or a pack's list of params (a pack
        trains with the study's seed: a study of seed re-runs runs one trial at a time)."""
        saves = [self.keeper.path(self.cfg, t.number) for t in self.started] if self.keeper is not None else None
        if not self.pack:
            params, seed = claimed[0]
            return _job_message(self.study, _seeded(self.cfg, seed), params, device, watched=watched,
                                save_model=saves[0] if saves is not None else None)
        return _job_message(self.study, self.cfg, [params for params, _ in claimed], device, watched=watched,
                            save_model=saves if saves and any(saves) else None)

    def _result(self, member: int | None, trial: optuna.Trial, outcome: TrialOutcome) -> None:
        """A trial's result: a pack's member is told at once (the others train on), a single
        trial when its process is done (:meth:`_end`)."""
        self.received.add(trial, _with_history(outcome))
        if self.pack:
            self.told.append(self.received.tell(trial))

    def _split(self, msg: dict[str, Any]) -> None:
        """A pack ran out of memory before any member reported: its line."""
        halves = [[self.started[j].number for j in half] for half in msg.get("halves", [])]
        self.log(split_line(int(msg.get("epoch", 0)), halves))

    def _end(self, rc: int, deadline: Watchdog, epochs: dict[int | None, list[dict[str, Any]]]) -> None:
        """The process is done: the trials it left without a result fail (the trial timeout, a
        kill: :func:`_exit_reason`); every outcome not told yet is told."""
        if self.pending:
            reason = TIMEOUT if deadline.fired else _exit_reason(rc, pack=self.pack)
            if deadline.fired:
                self.log(self._stopped_line(deadline))
            for member, trial in list(self.pending.items()):
                outcome = TrialOutcome("fail", failure_reason=reason)
                if not self.pack:
                    outcome.attrs[HISTORY] = _stored_history(epochs[member])
                self.received.add(trial, outcome)
                self.pending.pop(member)
        for trial, _ in list(self.received.waiting.values()):
            self.told.append(self.received.tell(trial))

    def _stopped_line(self, deadline: Watchdog) -> str:
        words = _timeout_words(deadline, self.cfg)
        if self.pack:
            return f"trials {[t.number for t in self.pending.values()]} stopped: their pack {words}"
        return f"trial {self.started[0].number} stopped: it {words}"

    def taken_over(self, taken: dict[int, str]) -> bool:
        """After the storage refused a write to a trial (another process finished it: taken over):
        each trial not told yet comes back as stored, its line in ``taken``, and a pack's others,
        still running and cut short with it, fail as lost and are retried. False when a single
        trial was not taken over (the refusal was something else): it failed as a crash."""
        done = {t.number for t in self.told}
        for trial in self.started:
            if trial.number in done:
                continue
            frozen = _taken_over(self.study, trial, self.cfg, taken)
            if frozen is None and not self.pack:
                fail(self.study, trial, CRASHED)
                return False
            if frozen is None:  # still running: its pack's process was stopped under it
                frozen = _finish(self.study, trial, TrialOutcome("fail", failure_reason=LOST), self.cfg)
                retry_lost(self.study, frozen, "its pack was stopped: another member was taken over", log=self.log)
            self.told.append(frozen)
        return True


def fmt_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


#: The signals that stop a run as Ctrl-C does (the running trial marked ``interrupted``): SIGTERM
#: (a scheduler, ``kill``) and SIGHUP (the terminal closed), unless SIGHUP is ignored (``nohup``).
INTERRUPTING = (signal.SIGTERM, signal.SIGHUP)


def _sigterm_as_interrupt() -> Callable[[], None]:
    """Treat SIGTERM and SIGHUP like Ctrl-C while trials run (the running trial is marked
    interrupted, a line says so); a SIGHUP this process was started to ignore (``nohup``) stays
    ignored. Returns the function that puts the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.getsignal(sig) for sig in INTERRUPTING}
    for sig, before in previous.items():
        if not (sig == signal.SIGHUP and before == signal.SIG_IGN):
            signal.signal(sig, handler)

    def restore() -> None:
        for sig, before in previous.items():
            signal.signal(sig, before if before is not None else signal.SIG_DFL)

    return restore
