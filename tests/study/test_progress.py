"""The study loop's events (study/progress.py): what an observer is told for a tiny real study
(a pack and a single trial, epochs, the child's sharpness phase), and how StudyTally folds them
(budget counting, direction-aware best, Pareto front, ETA, the summary line)."""

from __future__ import annotations

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from sassha_tune.config import load_config
from sassha_tune.study.create import create_or_continue
from sassha_tune.study.loop import run_trials
from sassha_tune.study.progress import GuardedObserver, StudyObserver, StudyTally, fmt_seconds

TINY = {
    "study": {"name": "events", "pruner": "none"},
    "budget": {"n_trials": 3},
    "task": {"dataset": "mnist1d", "model": "mlp", "model_options": {"hidden": [16]}, "epochs": 2,
             "batch_size": 64, "max_steps_per_epoch": 2},
    "optimizer": {"name": "sgd", "enqueue_published": False},  # nothing waiting: the budget events count asks
    "metrics": {"subset_size": 64, "budget": {"lambda_max_iters": 3, "trace_probes": 2, "sam_steps": 1}},
    "device": "cpu",
    "seed": 0,
}


class Recorder(StudyObserver):
    """Every event, as (name, trial number or None, detail)."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def study_started(self, name, metrics, directions, epochs):
        self.events.append(("study_started", name, tuple(metrics), tuple(directions), epochs))

    def budget(self, trials, total):
        self.events.append(("budget", len(trials), total))

    def trial_started(self, number, params, member=None):
        self.events.append(("trial_started", number, member, sorted(params)))

    def epoch(self, number, epoch, metrics):
        self.events.append(("epoch", number, epoch, "train_loss" in metrics and "val_acc" in metrics))

    def phase(self, number, name):
        self.events.append(("phase", number, name))

    def trial_finished(self, frozen):
        self.events.append(("trial_finished", frozen.number, frozen.state.name))

    def study_finished(self, seconds, stopped_because):
        self.events.append(("study_finished", stopped_because))


def test_the_observer_is_told_a_pack_and_a_single_trial_in_order(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(TINY))
    cfg = load_config(p)
    url = f"sqlite:///{tmp_path}/e.db"
    create_or_continue(cfg, url)
    rec = Recorder()
    summary = run_trials("events", url, log=lambda _m: None, pack=2, observer=rec)
    assert summary.ran == 3
    params = sorted(optuna.load_study(study_name="events", storage=url).trials[0].params)

    def trained(number, member):  # one trial's events, from the child's messages
        return [("trial_started", number, member, params), ("epoch", number, 1, True), ("epoch", number, 2, True),
                ("phase", number, "sharpness")]

    ev = rec.events
    assert ev[0] == ("study_started", "events", ("val_acc",), ("maximize",), 2)
    assert ev[1] == ("budget", 0, 3)
    # the pack: both members start, their epochs interleave, then each measures sharpness and is told
    pack = ev[2:10]
    assert [e for e in pack if e[1] == 0] == trained(0, 0)
    assert [e for e in pack if e[1] == 1] == trained(1, 1)
    assert pack[:2] == [trained(0, 0)[0], trained(1, 1)[0]] and pack[-2:] == [trained(0, 0)[-1], trained(1, 1)[-1]]
    assert ev[10:12] == [("trial_finished", 0, "COMPLETE"), ("trial_finished", 1, "COMPLETE")]
    assert ev[12] == ("budget", 2, 3)
    assert ev[13:17] == trained(2, None)
    assert ev[17:] == [("trial_finished", 2, "COMPLETE"), ("budget", 3, 3),
                       ("study_finished", "budget reached (3/3 trials)")]


class StepRecorder(Recorder):
    def step(self, number, epoch, step, steps):
        self.events.append(("step", number, epoch, step, steps))


def test_an_observer_of_steps_is_told_the_steps_within_each_epoch(tmp_path, monkeypatch):
    """With step messages on every step (STEP_SECONDS 0), every step but an epoch's last comes
    before that epoch's message, for a pack's members and a single trial alike; an observer
    that does not override ``step`` asks for none (the test above)."""
    import sassha_tune.study.loop as loop

    monkeypatch.setattr(loop, "STEP_SECONDS", 0.0)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({**TINY, "task": {**TINY["task"], "max_steps_per_epoch": 3}}))
    url = f"sqlite:///{tmp_path}/e.db"
    create_or_continue(load_config(p), url)
    rec = StepRecorder()
    assert rec.watches_steps and not Recorder().watches_steps
    assert run_trials("events", url, log=lambda _m: None, pack=2, observer=rec).ran == 3
    for number in (0, 1, 2):  # the pack's two members, then a single trial
        seen = [e[0] if e[0] != "step" else e[2:] for e in rec.events if e[0] in ("step", "epoch") and e[1] == number]
        assert seen == [(1, 1, 3), (1, 2, 3), "epoch", (2, 1, 3), (2, 2, 3), "epoch"], (number, seen)


class BreaksAtItsSecondEpoch(Recorder):
    def epoch(self, number, epoch, metrics):
        super().epoch(number, epoch, metrics)
        if epoch == 2:
            raise ZeroDivisionError("division by zero")


def test_an_observer_that_raises_is_dropped_with_one_warning_and_the_trials_go_on(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({**TINY, "budget": {"n_trials": 2}}))
    url = f"sqlite:///{tmp_path}/e.db"
    create_or_continue(load_config(p), url)
    rec, lines = BreaksAtItsSecondEpoch(), []
    summary = run_trials("events", url, log=lines.append, pack=1, observer=rec)
    trials = optuna.load_study(study_name="events", storage=url).trials
    assert summary.ran == 2 and [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert [e[0] for e in rec.events] == ["study_started", "budget", "trial_started", "epoch", "epoch"]
    warnings = [line for line in lines if line.startswith("warning: observer")]
    assert warnings == ["warning: observer BreaksAtItsSecondEpoch failed in epoch: "
                        "error: ZeroDivisionError: division by zero; it is told nothing more"]


def test_who_asks_for_step_messages():
    """Only an observer that overrides ``step`` (the live view), and not once it broke; a plain
    tally keeps steps but shows none; an observer of another class asks for none (no error)."""

    class Duck:  # the events' methods, not a StudyObserver
        def epoch(self, number, epoch, metrics):
            raise RuntimeError("no")

    class BreaksWithSteps(StepRecorder, BreaksAtItsSecondEpoch):
        pass

    lines: list[str] = []
    assert not GuardedObserver(Duck(), lines.append).watches_steps and not StudyTally().watches_steps
    guarded = GuardedObserver(BreaksWithSteps(), lines.append)
    assert guarded.watches_steps
    guarded.epoch(0, 2, {})
    assert guarded.broken and not guarded.watches_steps and len(lines) == 1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _told(number, state, values=None, reason=None):
    t = create_trial(state=state, values=values, params={"lr": 0.1},
                     distributions={"lr": FloatDistribution(0.01, 1.0)},
                     user_attrs={"failure_reason": reason} if reason else {})
    t.number = number
    return t


def test_the_tally_counts_as_the_budget_and_knows_the_direction():
    clock = Clock()
    tally = StudyTally(clock=clock)
    tally.study_started("s", ["val_loss"], ["minimize"], 10)
    tally.budget([_told(0, TrialState.COMPLETE, [0.9]), _told(1, TrialState.FAIL, reason="interrupted")], 8)
    assert tally.done_text() == "1/8 trials done"  # an interrupted trial does not count
    assert tally.best_text() == "best val_loss 0.9 (trial 0)"
    assert tally.eta() is None  # no trial of this run finished yet
    tally.trial_started(2, {"lr": 0.1})
    assert tally.running[2].slot == 2
    clock.now += 30
    tally.epoch(2, 1, {"train_loss": 1.0, "val_loss": 0.5})
    tally.phase(2, "sharpness")
    assert tally.running[2].phase == "sharpness"
    tally.trial_finished(_told(2, TrialState.COMPLETE, [0.5]))
    assert tally.best_text() == "best val_loss 0.5 (trial 2)"  # lower is better
    assert tally.done_text() == "2/8 trials done" and not tally.running
    assert tally.eta() == pytest.approx(6 * 30)  # 30 s per trial, 6 left
    clock.now += 10
    assert tally.eta() == pytest.approx(6 * 30 - 10)
    tally.trial_started(3, {"lr": 0.2})
    clock.now += 20
    tally.trial_finished(_told(3, TrialState.PRUNED))
    tally.trial_finished(_told(4, TrialState.FAIL, reason="diverged"))
    tally.study_finished(61.0, "budget reached")
    assert tally.summary_line() == "3 trials in 1m 01s: 1 complete, 1 pruned, 1 failed; best val_loss 0.5 (trial 2)"


def test_the_tally_of_two_objectives_is_the_pareto_front():
    tally = StudyTally()
    tally.study_started("mo", ["val_acc", "lambda_max"], ["maximize", "minimize"], 1)
    assert tally.best_text() == "no complete trial yet"
    tally.budget([_told(0, TrialState.COMPLETE, [0.9, 5.0]), _told(1, TrialState.COMPLETE, [0.8, 1.0]),
                  _told(2, TrialState.COMPLETE, [0.7, 6.0])], 3)  # 2 is dominated by 0
    assert tally.best_text() == "Pareto front: 2 trials [0, 1]"


def test_fmt_seconds():
    assert [fmt_seconds(s) for s in (0.4, 42, 65, 3725)] == ["0 s", "42 s", "1m 05s", "1h 02m"]
