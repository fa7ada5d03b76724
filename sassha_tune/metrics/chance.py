"""Near chance: the one rule that says a classifier has not learned (a collapsed or untrained network).

The report (:func:`sassha_tune.report.health.near_chance`), ``status`` and ``compare`` judge
finished trials with it; the study loop's chance guard (``study.chance_guard``) judges a running
trial's epochs with it. Both go through :func:`near_chance_threshold` / :func:`acc_near_chance`.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["NEAR_CHANCE_RULE", "near_chance_threshold", "acc_near_chance"]

#: The near-chance rule in words, for reports (:func:`near_chance_threshold` computes it).
NEAR_CHANCE_RULE = "val_acc <= chance + min(chance / 2, 0.05), chance = 1 / num_classes"


def near_chance_threshold(num_classes: int) -> float:
    """The highest validation accuracy still "near chance" for ``num_classes`` classes.

    1.5x chance leaves room for the noise of a small validation split around an untrained
    network's 1/C (0.15 for 10 classes, 0.015 for 100); capped at 5 points above chance so that
    a binary task does not call a 74 %-accurate model collapsed (0.55 for 2 classes).
    """
    chance = 1.0 / num_classes
    return chance + min(chance / 2, 0.05)


def acc_near_chance(val_acc: Any, num_classes: Any) -> bool | None:
    """Whether ``val_acc`` is near chance for ``num_classes`` classes; ``None`` (unknown) when
    either is missing or not a number (``num_classes`` below 2, ``val_acc`` NaN): never guessed."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | float) or not num_classes >= 2:
        return None
    if isinstance(val_acc, bool) or not isinstance(val_acc, int | float):
        return None
    acc = float(val_acc)
    if math.isnan(acc):
        return None
    return acc <= near_chance_threshold(int(num_classes))
