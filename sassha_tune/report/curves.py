"""Budget curves: the best validation accuracy so far as trials, train-seconds and training
(run-equivalents) are spent, observed and over seeded shuffles of the trial order (the bootstrap
bands of ``compare``).

Failed and pruned trials spend a trial, their seconds and what they trained, but never improve the
best so far.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from sassha_tune.study.records import TrialRecord

from ..study.budget import outcome, run_equivalents
from .rows import as_float, search_rows

__all__ = [
    "BOOTSTRAP_SEED",
    "N_BOOTSTRAP",
    "best_so_far_by_seconds",
    "best_so_far_by_trials",
    "budget_arrays",
    "study_epochs",
    "training_curve",
    "trial_cost",
]

#: Number of bootstrap resamples of the trial order for the budget curves, and their seed.
N_BOOTSTRAP = 200
BOOTSTRAP_SEED = 0


def trial_cost(row: TrialRecord) -> float:
    """Seconds a trial spent: train_seconds, else its wall-clock duration, else 0."""
    cost = row.metric("train_seconds")
    if math.isnan(cost):
        cost = as_float(row.duration_s)
    return 0.0 if math.isnan(cost) else max(cost, 0.0)


def budget_arrays(rows: Sequence[TrialRecord]) -> tuple[np.ndarray, np.ndarray]:
    """Per search trial (in trial order): val_acc (-inf unless complete) and its cost in seconds."""
    search = search_rows(rows)
    accs = np.array([r.val_acc if r.state == "COMPLETE" else -np.inf for r in search], dtype=float)
    accs[np.isnan(accs)] = -np.inf
    costs = np.array([trial_cost(r) for r in search], dtype=float)
    return accs, costs


def _bootstrap_orders(n: int, n_boot: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """``n_boot`` permutations of the trial order (first one = the observed order)."""
    rng = np.random.default_rng(seed)
    orders = [np.arange(n)] + [rng.permutation(n) for _ in range(n_boot - 1)]
    return np.stack(orders) if n else np.zeros((n_boot, 0), dtype=int)


def best_so_far_by_trials(accs: np.ndarray) -> np.ndarray:
    """Best-so-far curves, one row per bootstrap order; NaN before the first complete trial."""
    orders = _bootstrap_orders(len(accs))
    curves = np.maximum.accumulate(accs[orders], axis=1)
    curves[~np.isfinite(curves)] = np.nan
    return curves


def best_so_far_by_seconds(accs: np.ndarray, costs: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Best-so-far at each time on ``grid`` (a trial counts once it has finished); NaN past the
    study's own total, so a study that spent less is not drawn as if it had spent more."""
    orders = _bootstrap_orders(len(accs))
    beyond = grid > costs.sum() * (1 + 1e-9)
    curves = np.full((len(orders), len(grid)), np.nan)
    for i, order in enumerate(orders):
        done_at = np.cumsum(costs[order])
        best = np.maximum.accumulate(accs[order])
        idx = np.searchsorted(done_at, grid, side="right") - 1
        valid = idx >= 0
        vals = np.full(len(grid), -np.inf)
        vals[valid] = best[idx[valid]]
        vals[~np.isfinite(vals) | beyond] = np.nan
        curves[i] = vals
    return curves


def study_epochs(study: Any) -> int:
    """The epochs of one full run of a study's trials (``task.epochs`` of its stored config; 0
    when it stores none)."""
    config = study.user_attrs.get("config") or {}
    epochs = (config.get("task") or {}).get("epochs") if isinstance(config, dict) else None
    return int(epochs) if isinstance(epochs, int) and not isinstance(epochs, bool) else 0


def training_curve(rows: Sequence[TrialRecord], epochs: int) -> dict[str, list[Any]]:
    """The study's anytime curve: per finished search trial in trial order, the run-equivalents
    spent when it ended (``cost``, cumulative), how it ended (``outcome``: completed, near chance,
    pruned, diverged, failed), its validation accuracy (``value``: its last epoch's when it did not
    complete; NaN when it has none) and the best validation accuracy of a complete trial so far
    (``best``: the configuration the study would select then; NaN before the first)."""
    cost, best = 0.0, -math.inf
    out: dict[str, list[Any]] = {"number": [], "cost": [], "outcome": [], "value": [], "best": []}
    for r in sorted((r for r in search_rows(rows) if outcome(r) is not None),
                    key=lambda r: r.number):
        cost += run_equivalents(r, epochs)
        value = r.val_acc if r.state == "COMPLETE" else r.metric("val_acc")
        if r.state == "COMPLETE" and not math.isnan(value):
            best = max(best, value)
        out["number"].append(r.number)
        out["cost"].append(cost)
        out["outcome"].append(outcome(r))
        out["value"].append(value)
        out["best"].append(best if math.isfinite(best) else math.nan)
    return out
