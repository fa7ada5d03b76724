"""What a running study tells whoever watches it: structured events from the ask-tell loop.

:func:`~.loop.run_trials` calls the methods of an observer (``observer=``) as the study runs:

* ``study_started(name, metrics, directions, epochs)`` once, after the stored config is checked;
* ``budget(trials, total)`` at every iteration of the loop: the study's trials as stored now (other
  workers' included) and ``budget.n_trials``;
* ``trial_started(number, params, member)`` when a trial's process is about to start (``member``:
  its index in a pack, None for a single trial);
* ``epoch(number, epoch, metrics)`` for every epoch message of the trial (:mod:`sassha_tune.trial`);
* ``phase(number, name)`` for its ``phase`` messages (``"sharpness"``: measuring sharpness);
* ``step(number, epoch, step, steps)`` within a long epoch, at most about once a second (only for
  an observer that overrides it: :attr:`StudyObserver.watches_steps`; the trial process sends
  step messages only then);
* ``trial_finished(frozen)`` once it is told (pack members one by one);
* ``study_finished(seconds, stopped_because)`` when the loop ends normally (not on Ctrl-C or an error).

:class:`StudyObserver` does nothing (the default): subclass it and override what you need. Its
methods run in the loop's thread, between storage calls, so they should be quick; one that raises
gets a warning line and is told nothing more (:class:`GuardedObserver`), the trials go on. :class:`StudyTally` folds the events into what a live view shows: trials done of the
budget, the best value so far, the running trials and their last epoch, the ETA, and the final
:meth:`StudyTally.summary_line`. The rich view of the CLI (:mod:`sassha_tune.app.live`) renders it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from ..trial.outcome import one_line
from .budget import counts_toward_budget

__all__ = ["PLAIN_ENV", "GuardedObserver", "StudyObserver", "RunningTrial", "StudyTally", "fmt_seconds"]

#: set (to anything but "" or "0"): plain lines even on a terminal; ``run --gpus`` sets it for its workers
PLAIN_ENV = "SASSHA_TUNE_PLAIN"


class StudyObserver:
    """The study loop's events (module docstring); every method does nothing here."""

    def study_started(self, name: str, metrics: Sequence[str], directions: Sequence[str], epochs: int | None) -> None:
        """``directions``: ``"maximize"`` / ``"minimize"``, one per metric; ``epochs``: per trial."""

    def budget(self, trials: Sequence[FrozenTrial], total: int) -> None:
        """The stored trials (do not keep or change them) and the budget, at every loop iteration."""

    def trial_started(self, number: int, params: Mapping[str, Any], member: int | None = None) -> None:
        """A trial (``member``: of a pack) was claimed and its process is about to start."""

    def epoch(self, number: int, epoch: int, metrics: Mapping[str, Any]) -> None:
        """Trial ``number`` finished ``epoch`` (1-based) with these metrics (``train_loss``, ``val_acc``, ...)."""

    def phase(self, number: int, name: str) -> None:
        """Trial ``number`` began a phase that sends no epochs (``"sharpness"``; others may come)."""

    def step(self, number: int, epoch: int, step: int, steps: int) -> None:
        """Trial ``number`` is at ``step`` of the ``steps`` of ``epoch`` (not yet reported)."""

    @property
    def watches_steps(self) -> bool:
        """Whether this observer wants :meth:`step` (it overrides it): only then do trials send steps."""
        return type(self).step is not StudyObserver.step

    def trial_finished(self, frozen: FrozenTrial) -> None:
        """The trial was told (any state: COMPLETE, PRUNED, FAIL)."""

    def study_finished(self, seconds: float, stopped_because: str) -> None:
        """The loop ended normally after ``seconds`` (``stopped_because``: budget reached, timeout)."""


class GuardedObserver(StudyObserver):
    """Passes every event on to ``observer``; the first event it raises on (any ``Exception``) gets
    one warning line through ``log``, and it is told nothing more. A view that breaks must not fail
    the trial it was showing, nor the study (study callbacks are guarded the same way)."""

    def __init__(self, observer: StudyObserver, log: Any) -> None:
        self.observer, self.log = observer, log
        self.broken = False

    def _tell(self, event: str, *args: Any) -> None:
        if self.broken:
            return
        try:
            getattr(self.observer, event)(*args)
        except Exception as exc:
            self.broken = True
            self.log(f"warning: observer {type(self.observer).__name__} failed in {event}: {one_line(exc)}; "
                     "it is told nothing more")

    def study_started(self, name: str, metrics: Sequence[str], directions: Sequence[str], epochs: int | None) -> None:
        self._tell("study_started", name, metrics, directions, epochs)

    def budget(self, trials: Sequence[FrozenTrial], total: int) -> None:
        self._tell("budget", trials, total)

    def trial_started(self, number: int, params: Mapping[str, Any], member: int | None = None) -> None:
        self._tell("trial_started", number, params, member)

    def epoch(self, number: int, epoch: int, metrics: Mapping[str, Any]) -> None:
        self._tell("epoch", number, epoch, metrics)

    def phase(self, number: int, name: str) -> None:
        self._tell("phase", number, name)

    def step(self, number: int, epoch: int, step: int, steps: int) -> None:
        self._tell("step", number, epoch, step, steps)

    @property
    def watches_steps(self) -> bool:
        if self.broken:
            return False
        try:
            return bool(getattr(self.observer, "watches_steps", False))
        except Exception:
            return False

    def trial_finished(self, frozen: FrozenTrial) -> None:
        self._tell("trial_finished", frozen)

    def study_finished(self, seconds: float, stopped_because: str) -> None:
        self._tell("study_finished", seconds, stopped_because)


def fmt_seconds(seconds: float) -> str:
    """``42 s``, ``3m 05s``, ``1h 02m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


@dataclass
class RunningTrial:
    number: int
    slot: int  # its place in the budget: 1 for the first trial, ... (as the budget counts)
    params: dict[str, Any]
    member: int | None
    started: float  # time.monotonic()
    epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    phase: str | None = None
    step: tuple[int, int, int] | None = None  # (epoch, step, steps) within the epoch after ``epoch``


class StudyTally(StudyObserver):
    """The state of a study as its events tell it. Thread-safe (a view may render from another
    thread: take :attr:`lock` around reads of several fields).

    Done and total count as the budget does (:mod:`.budget`): finished trials that count toward
    ``budget.n_trials``, other workers' included. Best: the best COMPLETE trial by the first
    metric's direction; with several metrics, the Pareto front (how many trials, and which). ETA:
    this run's wall seconds per finished trial (from its first trial's start, so packs and the
    time between trials count) times the trials left of the budget, less the time since the last
    one finished; None until a trial of this run finished."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self.lock = threading.RLock()
        self.name = ""
        self.metrics: list[str] = []
        self.directions: list[str] = []
        self.epochs: int | None = None
        self.total: int | None = None
        self.done = 0
        self.started: float | None = None  # study_started
        self.first_trial: float | None = None
        self.last_finish: float | None = None
        self.running: dict[int, RunningTrial] = {}
        self.elsewhere: list[int] = []  # RUNNING trials of other processes (as last stored)
        self.ran: Counter = Counter()  # this run's trials by state name
        self.best: tuple[float, int] | None = None  # single objective: (value, number)
        self.pareto: list[int] = []  # several objectives: the front's trial numbers
        self.seconds: float | None = None
        self.stopped_because = ""
        self._complete: dict[int, list[float]] = {}  # number -> values of COMPLETE trials

    # -- events ---------------------------------------------------------------------------------
    def study_started(self, name: str, metrics: Sequence[str], directions: Sequence[str], epochs: int | None) -> None:
        with self.lock:
            self.name, self.metrics, self.directions, self.epochs = name, list(metrics), list(directions), epochs
            self.started = self.clock()

    def budget(self, trials: Sequence[FrozenTrial], total: int) -> None:
        with self.lock:
            self.total = total
            self.done = sum(counts_toward_budget(t) and t.state.is_finished() for t in trials)
            self.elsewhere = [t.number for t in trials if t.state == TrialState.RUNNING and t.number not in self.running]
            for t in trials:
                if t.state == TrialState.COMPLETE and t.values:
                    self._complete[t.number] = list(t.values)
            self._rank()

    def trial_started(self, number: int, params: Mapping[str, Any], member: int | None = None) -> None:
        with self.lock:
            now = self.clock()
            if self.first_trial is None:
                self.first_trial = now
            slot = self.done + len(self.running) + 1
            self.running[number] = RunningTrial(number, slot, dict(params), member, now)

    def epoch(self, number: int, epoch: int, metrics: Mapping[str, Any]) -> None:
        with self.lock:
            t = self.running.get(number)
            if t is not None:
                t.epoch, t.metrics, t.phase, t.step = epoch, dict(metrics), None, None

    @property
    def watches_steps(self) -> bool:
        """A tally keeps the steps it is told but shows nothing: only a view that draws them (the
        live view) asks trials to send them."""
        return False

    def step(self, number: int, epoch: int, step: int, steps: int) -> None:
        with self.lock:
            t = self.running.get(number)
            if t is not None and epoch > t.epoch:
                t.step = (epoch, step, steps)

    def phase(self, number: int, name: str) -> None:
        with self.lock:
            t = self.running.get(number)
            if t is not None:
                t.phase, t.step = name, None

    def trial_finished(self, frozen: FrozenTrial) -> None:
        with self.lock:
            self.running.pop(frozen.number, None)
            self.ran[frozen.state.name] += 1
            self.last_finish = self.clock()
            if counts_toward_budget(frozen):
                self.done += 1
            if frozen.state == TrialState.COMPLETE and frozen.values:
                self._complete[frozen.number] = list(frozen.values)
                self._rank()

    def study_finished(self, seconds: float, stopped_because: str) -> None:
        with self.lock:
            self.seconds, self.stopped_because = seconds, stopped_because

    # -- what a view shows ----------------------------------------------------------------------
    def _rank(self) -> None:
        if not self._complete:
            return
        signs = [1.0 if d == "maximize" else -1.0 for d in self.directions] or [1.0]
        finite = {n: v for n, v in self._complete.items() if all(math.isfinite(x) for x in v)}
        if not finite:
            return
        if len(signs) == 1:
            number = max(finite, key=lambda n: (signs[0] * finite[n][0], -n))  # ties: the earliest trial
            self.best = (finite[number][0], number)
            return

        def dominates(a: list[float], b: list[float]) -> bool:
            pairs = [(s * x, s * y) for s, x, y in zip(signs, a, b, strict=False)]
            return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)

        self.pareto = sorted(n for n, v in finite.items() if not any(dominates(w, v) for w in finite.values()))

    @property
    def ran_total(self) -> int:
        return sum(self.ran.values())

    def eta(self) -> float | None:
        """Seconds until the budget is spent, or None until a trial of this run finished."""
        with self.lock:
            if self.total is None or self.first_trial is None or self.last_finish is None or not self.ran_total:
                return None
            per_trial = (self.last_finish - self.first_trial) / self.ran_total
            left = max(0, self.total - self.done)
            return max(0.0, per_trial * left - (self.clock() - self.last_finish)) if left else 0.0

    def best_text(self) -> str:
        """``best val_acc 0.9325 (trial 4)``; ``Pareto front: 3 trials [1, 4, 6]``; ``no complete trial yet``."""
        with self.lock:
            if len(self.metrics) > 1:
                if not self.pareto:
                    return "no complete trial yet"
                shown = ", ".join(map(str, self.pareto[:8])) + (", ..." if len(self.pareto) > 8 else "")
                return f"Pareto front: {len(self.pareto)} trial{'s' if len(self.pareto) != 1 else ''} [{shown}]"
            if self.best is None:
                return "no complete trial yet"
            metric = self.metrics[0] if self.metrics else "value"
            return f"best {metric} {self.best[0]:.4g} (trial {self.best[1]})"

    def done_text(self) -> str:
        """``3/8 trials done``."""
        with self.lock:
            return f"{self.done}/{self.total if self.total is not None else '?'} trials done"

    def summary_line(self) -> str:
        """``8 trials in 65 s: 5 complete, 3 pruned; best val_acc 0.9325 (trial 4)``."""
        with self.lock:
            n = self.ran_total
            seconds = self.seconds if self.seconds is not None else (
                self.clock() - self.started if self.started is not None else 0.0)
            states = ", ".join(f"{count} {_STATE_WORDS.get(state, state.lower())}"
                               for state, count in sorted(self.ran.items(), key=lambda kv: _STATE_ORDER.get(kv[0], 9)))
            return (f"{n} trial{'s' if n != 1 else ''} in {fmt_seconds(seconds)}"
                    f"{': ' + states if states else ''}; {self.best_text()}")


_STATE_WORDS = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}
_STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2}
