"""The chance guard: a trial still near chance after a few epochs stops, stored as PRUNED.

From epoch ``cfg.chance_guard_after`` (``study.chance_guard``) up to the epoch before the last, a
trial whose validation accuracy is near chance (:func:`sassha_tune.metrics.chance.acc_near_chance`,
the rule the report uses) is answered ``stop``, whether the study has a pruner or not; it is told
PRUNED with the user attribute ``prune_reason: near_chance`` and its sharpness is not measured.
The last epoch is never judged here: a trial that trains to the end completes, and the report
judges it. Only epochs that carry ``num_classes`` are judged (the built-in trainer's
classification tasks; not language models; ``task.train`` functions whose reports carry it).
:func:`unjudged_accuracy` words the one warning a study gets when a ``task.train`` function's
trials report accuracies without ``num_classes``: nothing can then tell a trial that stayed at
chance from one that trained.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from ..config import Config
from ..metrics.chance import acc_near_chance
from ..trial.attributes import NUM_CLASSES, VAL_ACC

__all__ = ["ChanceGuard", "unjudged_accuracy"]


class ChanceGuard:
    """Judges a trial's epoch messages: :meth:`stops` says whether this epoch ends it."""

    def __init__(self, cfg: Config) -> None:
        self.after = cfg.chance_guard_after
        self.epochs = cfg.task.epochs

    @property
    def active(self) -> bool:
        return self.after is not None and self.after < self.epochs

    def stops(self, epoch: int, metrics: Mapping[str, Any]) -> bool:
        if not self.active or not self.after <= epoch < self.epochs:  # type: ignore[operator]
            return False
        return acc_near_chance(metrics.get("val_acc"), metrics.get("num_classes")) is True


def unjudged_accuracy(cfg: Config, trial: FrozenTrial) -> str | None:
    """The warning for a complete ``task.train`` trial that stores an accuracy but no
    ``num_classes`` (None otherwise): its near-chance verdict is unknown, so neither the chance
    guard nor ``report`` can leave it out if it never trained."""
    attrs = trial.user_attrs
    if (cfg.task.train is None or trial.state != TrialState.COMPLETE or NUM_CLASSES in attrs
            or not any(key in attrs for key in (VAL_ACC, "train_acc", "test_acc"))):
        return None
    return (f"warning: task.train {cfg.task.train} returns accuracies without num_classes (trial {trial.number}): "
            "a trial that stayed at chance counts as trained, and the chance guard cannot stop it; "
            "return num_classes with the metrics (and in reporter.report) to fix this")
