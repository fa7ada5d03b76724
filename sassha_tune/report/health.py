"""Budget health: which trials ended near chance, why trials failed, and the counts of both.

The one definition of a failure's kind (:func:`failure_kind`) that ``status``, ``report`` and
``compare`` use, and the verdict "near chance" on a stored trial (:func:`near_chance`, defined with
the trial record in :mod:`sassha_tune.study.records` and re-exported here); the rule itself
(:func:`near_chance_threshold`, :data:`NEAR_CHANCE_RULE`) lives in :mod:`sassha_tune.metrics.chance`,
where the study loop's chance guard uses it too, and is re-exported here.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

from sassha_tune.study.records import DIVERGED, NEAR_CHANCE, TrialRecord, near_chance

from ..metrics.chance import NEAR_CHANCE_RULE, near_chance_threshold
from .rows import complete_rows, search_rows

__all__ = [
    "NEAR_CHANCE_RULE",
    "budget_health",
    "failure_kind",
    "near_chance",
    "near_chance_count",
    "near_chance_threshold",
    "near_chance_rows",
    "pareto_numbers",
    "trained_rows",
]


def failure_kind(reason: Any) -> str:
    """The kind of a ``failure_reason``: ``diverged``, ``out_of_memory``, ``lost``, ... as stored;
    ``error: <message>`` and ``rank_failed: <why>`` by their prefix, so that counts stay short;
    ``unknown`` when the trial stores none."""
    if reason is None or str(reason).strip() == "":
        return "unknown"
    return str(reason).split(":", 1)[0].strip() or "unknown"


def budget_health(rows: Iterable[TrialRecord]) -> dict[str, Any]:
    """Where a study's trials went, from :func:`~sassha_tune.report.rows.load_rows` rows.

    ``complete``, ``pruned`` and ``failed`` (counts); ``pruned_near_chance``: the pruned trials the
    chance guard stopped (``prune_reason: near_chance``); ``near_chance``: complete trials near chance
    among the ``near_chance_known`` complete trials that store ``num_classes`` and ``val_acc``
    (both 0 for an older study: unknown, not zero); ``failures``: FAIL trials by
    :func:`failure_kind`, most frequent first, and ``failures_known``: how many of them store a
    ``failure_reason`` at all; ``pruned_diverged``: the pruned trials that diverged (told PRUNED so
    that the sampler sees them, ``study.diverged_as_pruned``); ``diverged``: every trial that
    diverged, FAIL or PRUNED.
    """
    rows = list(rows)
    states = Counter(r.state for r in rows)
    verdicts = [r.near_chance for r in rows if r.state == "COMPLETE"]
    failed = [r for r in rows if r.state == "FAIL"]
    kinds = Counter(failure_kind(r.failure_reason) for r in failed)
    pruned_diverged = sum(r.state == "PRUNED" and r.failure_reason == DIVERGED for r in rows)
    return {
        "complete": states["COMPLETE"],
        "pruned": states["PRUNED"],
        # stopped by the study's chance guard (study.chance_guard): still near chance after its epochs
        "pruned_near_chance": sum(r.state == "PRUNED" and r.prune_reason == NEAR_CHANCE
                                  for r in rows),
        "pruned_diverged": pruned_diverged,
        "diverged": kinds.get("diverged", 0) + pruned_diverged,
        "failed": states["FAIL"],
        "near_chance": sum(v is True for v in verdicts),
        "near_chance_known": sum(v is not None for v in verdicts),
        "failures": dict(sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))),
        "failures_known": sum(r.failure_reason is not None for r in failed),
    }


def near_chance_count(health: dict[str, Any]) -> str | None:
    """The near-chance count as shown in tables: ``"2"``, ``"2 of 5 known"`` when only some
    complete trials store ``num_classes``, ``None`` when none does (nothing to show)."""
    known = health["near_chance_known"]
    if not known:
        return None
    if known < health["complete"]:
        return f"{health['near_chance']} of {known} known"
    return str(health["near_chance"])


def trained_rows(rows: Iterable[TrialRecord]) -> list[TrialRecord]:
    """The trials that trained: complete search trials (seed re-runs left out) that are not near
    chance. A trial whose near-chance verdict is unknown (no ``num_classes``) is kept: nothing is
    guessed. What every statistic, scatter plot and Pareto front of ``report`` and ``compare`` is
    computed over."""
    return [r for r in complete_rows(search_rows(rows)) if r.near_chance is not True]


def near_chance_rows(rows: Iterable[TrialRecord]) -> list[TrialRecord]:
    """The complete search trials that ended near chance (drawn apart, left out of statistics)."""
    return [r for r in complete_rows(search_rows(rows)) if r.near_chance is True]


def pareto_numbers(rows: Iterable[TrialRecord]) -> set[int]:
    """Trial numbers on the front of (val_acc up, lambda_max down) among the trials that trained
    (:func:`trained_rows`): a near-chance network is trivially flat, so it is never on the front."""
    points = [(r.number, r.val_acc, r.metric("lambda_max")) for r in trained_rows(rows)]
    points = [p for p in points if not math.isnan(p[2])]
    front = set()
    for number, acc, lam in points:
        dominated = any(
            (a >= acc and m <= lam) and (a > acc or m < lam) for _, a, m in points
        )
        if not dominated:
            front.add(number)
    return front
