"""What ``sassha-tune status`` shows, as data: the studies in a storage, or one study in detail
(trial counts by state with their health sub-rows, the budget, where the training went, the best
trial). Read-only; the CLI draws the tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

__all__ = ["StudyList", "StudyStatus", "list_studies", "study_status"]


@dataclass(frozen=True)
class StudyList:
    """The studies in a storage: ``storage`` its URL with the password masked, one row of
    :func:`~sassha_tune.study.views.study_detail` per study."""

    storage: str
    rows: list[dict[str, Any]]


@dataclass(frozen=True)
class StudyStatus:
    """One study: ``detail`` (:func:`~sassha_tune.study.views.study_detail`), ``health`` (the
    sub-rows of the state table, by state), ``spent`` (where the training went, one line),
    ``best_rows`` (the best trial's params and summary metrics as (label, value); empty without a
    complete trial)."""

    detail: dict[str, Any]
    health: dict[str, list[tuple[str, str]]]
    spent: str
    best_rows: list[tuple[str, Any]]


def list_studies(storage: str | None = None) -> StudyList:
    """The studies in ``storage`` (default as ``--storage``: ``$SASSHA_TUNE_STORAGE``, else
    ``sqlite:///sassha-tune.db``)."""
    from ..study.storage import mask_url, resolve_storage
    from ..study.views import study_rows

    url = resolve_storage(storage)
    return StudyList(mask_url(url), study_rows(url))


def study_status(name: str, storage: str | None = None) -> StudyStatus:
    """Study ``name`` in ``storage`` in detail."""
    from ..metrics.names import SUMMARY_METRICS
    from ..study.storage import load_study, resolve_storage
    from ..study.views import spent_line, study_detail

    study = load_study(name, resolve_storage(storage))
    detail = study_detail(study)
    health = _health_rows(study)
    best = detail["best"]
    best_rows: list[tuple[str, Any]] = []
    if best is not None:
        best_rows = [(f"param {k}", v) for k, v in best.params.items()]
        best_rows += [(k, best.user_attrs[k]) for k in SUMMARY_METRICS if k in best.user_attrs]
    return StudyStatus(detail, health, spent_line(detail["spent"]), best_rows)


def _health_rows(study: optuna.Study) -> dict[str, list[tuple[str, str]]]:
    """Sub-rows of the state table, by state: near-chance trials under COMPLETE, the chance
    guard's and diverged trials under PRUNED, failures by reason under FAIL. Only what the trials
    store: an older study (no ``num_classes``, no ``failure_reason``) gets none."""
    from ..report.health import budget_health, near_chance_count
    from ..report.rows import load_rows

    health = budget_health(load_rows(study))  # every trial, as the state counts above it
    rows: dict[str, list[tuple[str, str]]] = {}
    chance = near_chance_count(health)
    if chance is not None:
        rows["COMPLETE"] = [("near chance (of COMPLETE)", chance)]
    pruned = [("near chance (the chance guard)", health["pruned_near_chance"]), ("diverged", health["pruned_diverged"])]
    if any(n for _, n in pruned):
        rows["PRUNED"] = [(label, str(n)) for label, n in pruned if n]
    if health["failures_known"]:
        rows["FAIL"] = [(kind, str(n)) for kind, n in health["failures"].items()]
    return rows
