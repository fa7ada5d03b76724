"""The CLI's view of a running study (``run``, ``resume``, ``worker``).

On a terminal, a live area at the bottom (rich): one line per running trial (a spinner, its number,
its place in the budget, epoch k/E, train loss and the validation metric of its last epoch, or the
phase it is in, e.g. "measuring sharpness"), then the study: trials done of the budget, the best
value so far, the ETA ("—" until a trial of this run finished, "soon" once the running trials take
longer than the estimate) and the time so far. The log lines print above it as before. When stdout is
not a terminal (a pipe, CI), or ``$SASSHA_TUNE_PLAIN`` is set, there is no live area: the log lines
only. Either way a run that reaches its end prints one summary line
(:meth:`~sassha_tune.study.progress.StudyTally.summary_line`). The events come from the study loop
(:mod:`sassha_tune.study.progress`), not from its log lines. What the study's storage or a trial
process supplied (the study's name, a phase, a plug-in's metric values) is drawn with its control
characters shown (:func:`~sassha_tune.printable.printable`), never sent to the terminal.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from ..printable import printable
from ..study.progress import PLAIN_ENV, RunningTrial, StudyTally, fmt_seconds

__all__ = ["LiveView", "live_wanted", "study_view"]

MAX_TRIAL_LINES = 8  # a big pack shows its first members and "... and N more"
PHASE_WORDS = {"sharpness": "measuring sharpness"}


def live_wanted(console: Console) -> bool:
    """A live area on ``console``: a real terminal (not "dumb") and ``$SASSHA_TUNE_PLAIN`` unset."""
    if os.environ.get(PLAIN_ENV, "") not in ("", "0"):
        return False
    return console.is_terminal and not console.is_dumb_terminal


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) and not isinstance(value, bool) else printable(value)


class LiveView(StudyTally):
    """A :class:`StudyTally` drawn live on ``console``: started by the study's first event, stopped
    by :meth:`stop` (the live area vanishes; what was printed above it stays)."""

    def __init__(self, console: Console, *, refresh_per_second: float = 8, **tally: Any) -> None:
        super().__init__(**tally)
        self.console = console
        self.refresh_per_second = refresh_per_second
        self.live: Live | None = None
        self.spinners: dict[int, Spinner] = {}
        self.idle = Spinner("dots", style="cyan")

    def study_started(self, *args: Any, **kwargs: Any) -> None:
        super().study_started(*args, **kwargs)
        if self.live is None:
            self.live = Live(console=self.console, get_renderable=self.render, transient=True,
                             refresh_per_second=self.refresh_per_second, redirect_stdout=True, redirect_stderr=True)
            self.live.start()

    def stop(self) -> None:
        if self.live is not None:
            live, self.live = self.live, None
            live.stop()

    # -- rendering --------------------------------------------------------------------------------
    @property
    def watches_steps(self) -> bool:
        return True  # drawn next to the running trial's last epoch

    def shown_metrics(self, metrics: dict[str, Any]) -> list[str]:
        """The epoch metrics a trial line shows: train loss and the study's validation metric."""
        keys = ["train_loss"]
        objective = self.metrics[0] if self.metrics else None
        for key in (objective, "val_acc", "val_ppl", "val_loss"):
            if key is not None and key in metrics and key not in keys:
                keys.append(key)
                break
        return [k for k in keys if k in metrics]

    def trial_text(self, t: RunningTrial) -> Text:
        total = self.total if self.total is not None else "?"
        line = Text()
        line.append(f"trial {t.number}", style="bold")
        line.append(f" ({t.slot}/{total})")
        if t.member is not None:
            line.append(f" pack member {t.member}", style="dim")
        if t.epoch:
            line.append(f"  epoch {t.epoch}/{self.epochs}" if self.epochs else f"  epoch {t.epoch}")
            for key in self.shown_metrics(t.metrics):
                line.append(f"  {printable(key)} {_number(t.metrics[key])}")
        elif t.phase is None and t.step is None:
            line.append("  starting", style="dim")
        if t.step is not None:  # within the next epoch, not yet reported
            epoch, step, steps = t.step
            line.append(f"  step {step}/{steps} of epoch {epoch}", style="cyan")
        if t.phase is not None:
            line.append(f"  {PHASE_WORDS.get(t.phase) or printable(t.phase)}", style="yellow")
        line.append(f"  {fmt_seconds(self.clock() - t.started)}", style="dim")
        return line

    def study_text(self) -> Text:
        eta = self.eta()
        elapsed = self.clock() - self.started if self.started is not None else 0.0
        line = Text()
        line.append(printable(self.name) or "study", style="bold cyan")
        if eta is None:
            eta_text = "—"  # no trial of this run finished yet
        elif eta == 0 and self.total is not None and self.done < self.total:
            eta_text = "soon"  # the running trials take longer than the mean so far
        else:
            eta_text = fmt_seconds(eta)
        line.append(printable(f"  {self.done_text()} · {self.best_text()} · ETA {eta_text} · {fmt_seconds(elapsed)} so far"))
        return line

    def render(self) -> RenderableType:
        """What the live area shows now (also for tests: print it on any console)."""
        with self.lock:
            grid = Table.grid(padding=(0, 1))
            grid.add_column(no_wrap=True)
            grid.add_column(overflow="ellipsis", no_wrap=True)
            running = sorted(self.running.values(), key=lambda t: t.number)
            for t in running[:MAX_TRIAL_LINES]:
                grid.add_row(self.spinners.setdefault(t.number, Spinner("dots", style="green")), self.trial_text(t))
            if len(running) > MAX_TRIAL_LINES:
                grid.add_row("", Text(f"... and {len(running) - MAX_TRIAL_LINES} more running", style="dim"))
            if not running:
                idle = (f"waiting for trial(s) {self.elsewhere} of other processes" if self.elsewhere
                        else "between trials")
                grid.add_row(self.idle, Text(idle, style="dim"))
            for number in [n for n in self.spinners if n not in self.running]:
                del self.spinners[number]
            return Group(grid, self.study_text())


@contextmanager
def study_view(console: Console) -> Iterator[StudyTally]:
    """The observer a CLI command hands to the study loop: a :class:`LiveView` on a terminal, else a
    plain :class:`StudyTally`. On the way out the live area is stopped (Ctrl-C and errors included,
    so the terminal is left as it was); a run that reached its end then prints its summary line."""
    view: StudyTally = LiveView(console) if live_wanted(console) else StudyTally()
    try:
        yield view
    finally:
        if isinstance(view, LiveView):
            view.stop()
    if view.seconds is not None:  # the loop of this process ran to its end
        console.print(escape(printable(view.summary_line())), soft_wrap=True, highlight=False)
