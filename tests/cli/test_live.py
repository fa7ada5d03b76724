"""The CLI's live study view (sassha_tune/app/live.py): what it draws on a terminal (forced, into a
string), that it leaves a plain console alone, stops cleanly on Ctrl-C and prints one summary line."""

from __future__ import annotations

from io import StringIO

import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from rich.console import Console

from sassha_tune.app.live import LiveView, live_wanted, study_view
from sassha_tune.study.progress import PLAIN_ENV, StudyTally


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _told(number, state, values=None):
    t = create_trial(state=state, values=values, params={"lr": 0.1}, distributions={"lr": FloatDistribution(0.01, 1.0)})
    t.number = number
    return t


def _terminal() -> Console:
    return Console(file=StringIO(), force_terminal=True, width=120, color_system=None)


def _text(console: Console, view: LiveView) -> str:
    console.print(view.render())
    return console.file.getvalue()


def test_the_view_shows_trial_k_of_n_epoch_best_and_eta():
    clock = Clock()
    console = _terminal()
    view = LiveView(console, clock=clock)
    view.name, view.metrics, view.directions, view.epochs, view.started = "quick", ["val_acc"], ["maximize"], 10, clock.now
    view.budget([_told(0, TrialState.COMPLETE, [0.81]), _told(1, TrialState.PRUNED)], 8)
    text = _text(console, view)
    assert "between trials" in text and "2/8 trials done" in text and "ETA —" in text
    assert "best val_acc 0.81 (trial 0)" in text
    view.budget([_told(0, TrialState.COMPLETE, [0.81]), _told(1, TrialState.PRUNED),
                 _told(5, TrialState.RUNNING)], 8)  # another worker's
    assert "waiting for trial(s) [5] of other processes" in _text(_terminal(), view)
    view.budget([_told(0, TrialState.COMPLETE, [0.81]), _told(1, TrialState.PRUNED)], 8)

    view.trial_started(2, {"lr": 0.1})
    clock.now += 12
    view.epoch(2, 4, {"train_loss": 0.51234, "val_acc": 0.9325, "lr": 0.1})
    text = _text(_terminal(), view)
    assert "trial 2 (3/8)  epoch 4/10  train_loss 0.5123  val_acc 0.9325  12 s" in text
    view.step(2, 5, 120, 390)  # within epoch 5: shown next to epoch 4's metrics
    assert "val_acc 0.9325  step 120/390 of epoch 5  12 s" in _text(_terminal(), view)
    view.step(2, 4, 7, 390)  # a late step of an epoch already reported changes nothing
    assert "val_acc 0.9325  step 120/390 of epoch 5  12 s" in _text(_terminal(), view)
    view.epoch(2, 5, {"train_loss": 0.5, "val_acc": 0.9325, "lr": 0.1})
    assert "step" not in _text(_terminal(), view)
    view.phase(2, "sharpness")
    assert "val_acc 0.9325  measuring sharpness  12 s" in _text(_terminal(), view)
    clock.now += 8
    view.trial_finished(_told(2, TrialState.COMPLETE, [0.9325]))
    text = _text(_terminal(), view)
    assert "3/8 trials done · best val_acc 0.9325 (trial 2) · ETA 1m 40s · 20 s so far" in text  # 20 s x 5 left
    view.trial_started(3, {})
    assert "trial 3 (4/8)  starting" in _text(_terminal(), view)
    view.step(3, 1, 10, 390)
    assert "trial 3 (4/8)  step 10/390 of epoch 1  0 s" in _text(_terminal(), view)
    clock.now += 200  # longer than the 100 s the estimate gave the last 5
    assert "ETA soon" in _text(_terminal(), view)


def test_a_pack_shows_its_members():
    view = LiveView(_terminal(), clock=Clock())
    view.study_started("p", ["val_acc"], ["maximize"], 2)
    try:
        view.budget([], 4)
        view.trial_started(0, {}, member=0)
        view.trial_started(1, {}, member=1)
        text = _text(_terminal(), view)
    finally:
        view.stop()
    assert "trial 0 (1/4) pack member 0  starting" in text and "trial 1 (2/4) pack member 1  starting" in text


def test_study_view_on_a_terminal_starts_and_stops_the_live_area(monkeypatch):
    monkeypatch.delenv(PLAIN_ENV, raising=False)
    console = _terminal()
    with study_view(console) as view:
        assert isinstance(view, LiveView) and view.live is None  # nothing drawn before the study starts
        view.study_started("s", ["val_acc"], ["maximize"], 1)
        assert view.live is not None
        console.print("trial 0 started: lr=0.1")  # a log line goes above the live area
        view.budget([], 1)
        view.trial_started(0, {"lr": 0.1})
        view.trial_finished(_told(0, TrialState.COMPLETE, [0.5]))
        view.study_finished(3.0, "budget reached (1/1 trials)")
    assert view.live is None
    out = console.file.getvalue()
    assert "trial 0 started: lr=0.1" in out
    assert out.rstrip().endswith("1 trial in 3 s: 1 complete; best val_acc 0.5 (trial 0)")
    assert "\x1b[?25h" in out  # the cursor is shown again


def test_ctrl_c_stops_the_live_area_without_a_summary(monkeypatch):
    monkeypatch.delenv(PLAIN_ENV, raising=False)
    console = _terminal()
    with pytest.raises(KeyboardInterrupt), study_view(console) as view:
        view.study_started("s", ["val_acc"], ["maximize"], 1)
        view.trial_started(0, {})
        raise KeyboardInterrupt
    assert view.live is None
    out = console.file.getvalue()
    assert "trials in" not in out and "\x1b[?25h" in out


def test_plain_when_not_a_terminal_or_asked(monkeypatch):
    monkeypatch.delenv(PLAIN_ENV, raising=False)
    piped = Console(file=StringIO(), width=160)
    assert not live_wanted(piped)
    with study_view(piped) as view:
        assert type(view) is StudyTally
        view.study_started("s", ["val_acc"], ["maximize"], 1)
        view.study_finished(2.0, "budget reached")
    assert piped.file.getvalue() == "0 trials in 2 s; no complete trial yet\n"  # no escape codes
    monkeypatch.setenv(PLAIN_ENV, "1")
    assert not live_wanted(_terminal())
    monkeypatch.setenv(PLAIN_ENV, "0")
    assert live_wanted(_terminal())


HOSTILE = "\x1b]0;pwned\x07\x1b[2J\u202e"  # retitle the terminal, clear it, reverse the line


def test_strings_from_the_storage_or_a_trial_process_are_shown_not_sent():
    """The study's name (a study another Optuna client named, joined with `worker NAME`), a phase and
    a plug-in's metric value from a trial process: their control characters are drawn as escapes,
    never sent to the terminal (the rest of the CLI does the same: sassha_tune/printable.py)."""
    clock = Clock()
    view = LiveView(_terminal(), clock=clock)
    view.study_started(f"study{HOSTILE}", ["val_acc"], ["maximize"], 10)  # as the loop tells it
    view.stop()  # the live area drew on its own console; what one frame shows is checked below
    view.budget([], 4)
    view.trial_started(0, {"lr": 0.1})
    view.epoch(0, 1, {"train_loss": f"nan{HOSTILE}", "val_acc": 0.5})
    view.phase(0, f"phase{HOSTILE}")
    text = _text(Console(file=StringIO(), force_terminal=True, width=200, color_system=None), view)
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    shown = r"\x1b]0;pwned\x07\x1b[2J\u202e"
    assert f"study{shown}  0/4 trials done" in text
    assert f"train_loss nan{shown}" in text and f"phase{shown}" in text
