"""Does flatness predict generalization in this study? Rank correlations of the sharpness measures
with the generalization gap and the held-out accuracies, over the trials that trained, with
bootstrap confidence intervals, a control for "flat because barely trained", and a verdict.

Everything is computed here with numpy (ranks with ties averaged, then Pearson; Kendall's tau-b
from pair signs), so that the tests can check the values against :mod:`scipy.stats` as an
independent implementation.

* **Which trials**: :func:`~sassha_tune.report.health.trained_rows` (complete search trials that
  are not near chance). Untrained networks are trivially flat, so including them manufactures a
  "flatter generalizes better" trend; the same correlations over all complete trials are computed
  too, only to say when the excluded trials would have changed the answer.
* **Intervals**: percentile bootstrap over trials (:data:`N_BOOT` resamples, numpy seed
  :data:`BOOT_SEED`, level :data:`LEVEL`); resamples in which x or y is constant are dropped.
* **Control**: the partial Spearman correlation given the training loss (``train_loss``): what is
  left of the relationship once how far each trial trained is accounted for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sassha_tune.metrics.names import SHARPNESS_METRICS

from .rows import row_attr, row_val_acc

__all__ = [
    "BOOT_SEED",
    "CONTROL",
    "KENDALL_MAX_N",
    "LEVEL",
    "MIN_TRIALS",
    "N_BOOT",
    "PRIMARY",
    "TARGETS",
    "correlate",
    "correlation_entries",
    "find",
    "kendall_tau",
    "partial_spearman",
    "rank",
    "spearman",
    "verdict",
]

#: Bootstrap resamples, their numpy seed and the interval's level.
N_BOOT = 2000
BOOT_SEED = 0
LEVEL = 0.95
#: Fewer trained trials than this: no correlation is estimated at all.
MIN_TRIALS = 5
#: What each sharpness measure is correlated with (the gap first: it is the hypothesis).
TARGETS = ("gen_gap_acc", "val_acc", "test_acc")
#: The control variable of the partial correlation.
CONTROL = "train_loss"
#: The pair the verdict is about.
PRIMARY = ("lambda_max", "gen_gap_acc")
#: Kendall's tau is bootstrapped only up to this many trials (its cost is quadratic).
KENDALL_MAX_N = 300


def rank(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, ties given their average rank (vectorized over rows)."""
    a = np.asarray(values, dtype=float)
    n = a.shape[-1]
    flat = a.reshape(-1, n)
    order = np.argsort(flat, axis=-1, kind="mergesort")
    sorted_a = np.take_along_axis(flat, order, axis=-1)
    # Runs of equal values get one group id, unique across rows; their ranks are averaged.
    new_run = np.ones_like(sorted_a, dtype=bool)
    new_run[:, 1:] = sorted_a[:, 1:] != sorted_a[:, :-1]
    groups = np.cumsum(new_run.ravel()) - 1
    positions = np.broadcast_to(np.arange(1, n + 1, dtype=float), flat.shape).ravel()
    mean_rank = np.bincount(groups, weights=positions) / np.bincount(groups)
    ranks_sorted = mean_rank[groups].reshape(flat.shape)
    out = np.empty_like(ranks_sorted)
    np.put_along_axis(out, order, ranks_sorted, axis=-1)
    return out.reshape(a.shape)


def _pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis; NaN where x or y is constant."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    den = np.sqrt((xc * xc).sum(axis=-1) * (yc * yc).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc).sum(axis=-1) / den
    return np.where(den > 0, np.clip(r, -1.0, 1.0), np.nan)


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> np.ndarray | float:
    """Spearman's rho (Pearson of the average ranks) along the last axis; NaN when constant."""
    r = _pearson(rank(x), rank(y))
    return float(r) if np.ndim(r) == 0 else r


def kendall_tau(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> np.ndarray | float:
    """Kendall's tau-b (ties in x or y corrected) along the last axis; NaN when constant."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    sx = np.sign(a[..., :, None] - a[..., None, :])
    sy = np.sign(b[..., :, None] - b[..., None, :])
    iu = np.triu_indices(a.shape[-1], k=1)
    sx, sy = sx[..., iu[0], iu[1]], sy[..., iu[0], iu[1]]
    den = np.sqrt((sx != 0).sum(axis=-1) * (sy != 0).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = (sx * sy).sum(axis=-1) / den
    tau = np.where(den > 0, tau, np.nan)
    return float(tau) if np.ndim(tau) == 0 else tau


def partial_spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray,
                     z: Sequence[float] | np.ndarray) -> np.ndarray | float:
    """Spearman correlation of x and y given z: the partial correlation of their ranks,
    ``(r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2))``; NaN when z explains x or y fully."""
    rx, ry, rz = rank(x), rank(y), rank(z)
    rxy, rxz, ryz = _pearson(rx, ry), _pearson(rx, rz), _pearson(ry, rz)
    den = np.sqrt((1 - rxz**2) * (1 - ryz**2))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (rxy - rxz * ryz) / den
    r = np.where(den > 1e-12, np.clip(r, -1.0, 1.0), np.nan)
    return float(r) if np.ndim(r) == 0 else r


def _bootstrap_ci(columns: Sequence[np.ndarray], stat: Callable[..., Any]) -> list[float] | None:
    """Percentile bootstrap interval of ``stat(*columns)`` over resampled trials."""
    n = len(columns[0])
    rng = np.random.default_rng(BOOT_SEED)
    idx = rng.integers(0, n, size=(N_BOOT, n))
    values = np.asarray(stat(*(c[idx] for c in columns)), dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < N_BOOT // 2:  # mostly degenerate resamples: no interval
        return None
    tail = (1 - LEVEL) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return [float(lo), float(hi)]


def _value(row: dict[str, Any], key: str) -> float:
    return row_val_acc(row) if key == "val_acc" else row_attr(row, key)


def _columns(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> tuple[list[int], list[np.ndarray]]:
    """The trials with a finite value of every key, and one array per key."""
    kept = [r for r in rows if all(math.isfinite(_value(r, k)) for k in keys)]
    return [r["number"] for r in kept], [np.array([_value(r, k) for r in kept], dtype=float) for k in keys]


def correlate(x: str, y: str, method: str, rows: Sequence[dict[str, Any]], over: str = "trained") -> dict[str, Any]:
    """One correlation entry ``{"x", "y", "method", "value", "ci", "n", "over"}`` over ``rows``."""
    keys = (x, y, CONTROL) if method == "partial_spearman" else (x, y)
    _, cols = _columns(rows, keys)
    n = len(cols[0])
    entry: dict[str, Any] = {"x": x, "y": y, "method": method, "value": None, "ci": None, "n": n, "over": over}
    if method == "partial_spearman":
        entry["given"] = CONTROL
    if n < MIN_TRIALS:
        return entry
    stat = {"spearman": spearman, "kendall": kendall_tau, "partial_spearman": partial_spearman}[method]
    value = float(stat(*cols))
    entry["value"] = value if math.isfinite(value) else None
    if entry["value"] is not None and not (method == "kendall" and n > KENDALL_MAX_N):
        entry["ci"] = _bootstrap_ci(cols, stat)
    return entry


def correlation_entries(rows: Sequence[dict[str, Any]], over: str = "trained") -> list[dict[str, Any]]:
    """For each sharpness measure and each of :data:`TARGETS`: Spearman, Kendall and the partial
    Spearman given :data:`CONTROL`, each ``{"x", "y", "method", "value", "ci": [lo, hi], "n",
    "over"}`` (``value`` / ``ci`` ``None`` below :data:`MIN_TRIALS` trials or when a variable is
    constant). ``rows``: the trials to correlate over (``over`` names them in the entries)."""
    return [correlate(x, y, method, rows, over)
            for x in SHARPNESS_METRICS for y in TARGETS
            for method in ("spearman", "kendall", "partial_spearman")]


def find(entries: Sequence[dict[str, Any]], x: str, y: str, method: str) -> dict[str, Any] | None:
    """The entry for (x, y, method), or None."""
    return next((e for e in entries if (e["x"], e["y"], e["method"]) == (x, y, method)), None)


def _excludes_zero(entry: dict[str, Any] | None) -> bool:
    return bool(entry and entry["ci"] and (entry["ci"][0] > 0 or entry["ci"][1] < 0))


def _fmt(entry: dict[str, Any]) -> str:
    ci = entry["ci"]
    interval = f", {LEVEL:.0%} CI [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ", no interval"
    return f"{entry['value']:+.2f}{interval}, n = {entry['n']}"


def verdict(trained: Sequence[dict[str, Any]], all_complete: Sequence[dict[str, Any]], excluded: int) -> str:
    """One short paragraph: what the numbers support about lambda_max and the generalization gap
    over the trained trials, and what they don't."""
    x, y = PRIMARY
    entries = correlation_entries(trained)
    main = find(entries, x, y, "spearman")
    partial = find(entries, x, y, "partial_spearman")
    assert main is not None and partial is not None
    if main["value"] is None:
        why = (f"only {main['n']} trained trials have both {x} and {y}" if main["n"] < MIN_TRIALS
               else f"{x} or {y} is constant over the trained trials")
        return (f"Not enough data to say whether flatness predicts generalization here: {why} "
                f"(at least {MIN_TRIALS} are needed, and a few dozen for a useful interval).")
    text = f"Over the {main['n']} trained trials, Spearman's rho of {x} with {y} is {_fmt(main)}. "
    if _excludes_zero(main):
        direction = ("sharper minima (higher lambda_max) come with a larger gap: flatter generalized better"
                     if main["value"] > 0 else
                     "sharper minima come with a smaller gap, the opposite of the flat-minima hypothesis")
        text += f"The interval excludes 0, so this study supports a monotone relationship: {direction}. "
        if partial is not None and partial["value"] is not None:
            if _excludes_zero(partial):
                text += (f"It survives the control for how far each trial trained (partial rho given "
                         f"{CONTROL}: {_fmt(partial)}). ")
            else:
                text += (f"But given {CONTROL} it is not distinguishable from 0 (partial rho {_fmt(partial)}): "
                         "it may only say that less-trained networks are both flatter and overfit less. ")
        text += "A correlation over tuned trials is not a causal effect of flatness."
    else:
        wide = main["ci"] is None or main["ci"][1] - main["ci"][0] > 1.0
        text += "The interval includes 0: these trials show no reliable monotone relationship"
        text += (", and it is too wide to conclude either way (more trials needed)." if wide else
                 "; a strong effect in either direction is unlikely here.")
    if excluded:
        full = find(correlation_entries(all_complete, over="complete"), x, y, "spearman")
        if full is not None and full["value"] is not None and _excludes_zero(full) != _excludes_zero(main):
            text += (f" With the {excluded} near-chance trials included, rho would be {_fmt(full)}: "
                     "an artefact of untrained networks being trivially flat, not evidence.")
        else:
            text += f" ({excluded} near-chance trials were left out; including them does not change this.)"
    return text.strip()
