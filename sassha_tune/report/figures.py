"""The figures of a one-study report, and saving figures as PNG files.

Figures are built on :class:`matplotlib.figure.Figure` directly (Agg canvas, no pyplot global
state), so :func:`build_figures` is a pure function whose figures tests can inspect. Seed re-runs
are left out of every figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

from .rows import (
    SEED_RERUN_ATTR,
    as_float,
    complete_rows,
    load_rows,
    pareto_numbers,
    row_attr,
    row_val_acc,
    search_rows,
)

__all__ = ["GAP_LABEL", "LAMBDA_LABEL", "SLICE_PARAMS", "build_figures", "maybe_log", "save_figures"]

#: Parameters that get a slice plot when the study searched them.
SLICE_PARAMS = ("lr", "rho", "lazy_hessian", "eps")
#: Axis labels shared with the comparison's figures.
GAP_LABEL = "generalization gap (gen_gap_acc, + = overfitting)"
LAMBDA_LABEL = "lambda_max (top Hessian eigenvalue)"
_VAL_LABEL = "validation accuracy"


def _message_figure(title: str, message: str) -> Figure:
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_axis_off()
    return fig


def maybe_log(ax: Any, axis: str, values: Sequence[float]) -> None:
    """Log scale when all values are positive and span more than two decades."""
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 100:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def _gap_scatter(rows: Sequence[dict[str, Any]], x_key: str, x_label: str, title: str) -> Figure:
    """Generalization gap vs a sharpness measure, one point per complete trial, coloured by val acc."""
    pts = [(row_attr(r, x_key), row_attr(r, "gen_gap_acc"), row_val_acc(r)) for r in complete_rows(rows)]
    pts = [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    xs, ys, cs = (list(v) for v in zip(*pts, strict=True)) if pts else ([], [], [])
    sc = ax.scatter(xs, ys, c=cs, cmap="viridis", edgecolors="k", linewidths=0.3, label="trials")
    if pts:
        fig.colorbar(sc, ax=ax, label=_VAL_LABEL)
    ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    maybe_log(ax, "x", xs)
    ax.set_xlabel(x_label)
    ax.set_ylabel(GAP_LABEL)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _pareto_figure(rows: Sequence[dict[str, Any]]) -> Figure:
    pts = [(r["number"], row_attr(r, "lambda_max"), row_val_acc(r)) for r in complete_rows(rows)]
    pts = [p for p in pts if math.isfinite(p[1])]
    front = pareto_numbers(rows)
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    ax.scatter([p[1] for p in pts], [p[2] for p in pts], color="tab:blue", alpha=0.6, label="trials")
    fpts = sorted((p for p in pts if p[0] in front), key=lambda p: p[1])
    ax.plot([p[1] for p in fpts], [p[2] for p in fpts], color="tab:red", marker="o", drawstyle="steps-post",
            label="Pareto front")
    maybe_log(ax, "x", [p[1] for p in pts])
    ax.set_xlabel(LAMBDA_LABEL)
    ax.set_ylabel(_VAL_LABEL)
    ax.set_title("Pareto front: validation accuracy (up) vs lambda_max (down)")
    ax.legend(loc="best")
    fig.tight_layout()
    return fig


def _history_figure(rows: Sequence[dict[str, Any]]) -> Figure:
    done = complete_rows(rows)
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    ax.scatter([r["number"] for r in done], [row_val_acc(r) for r in done], color="tab:blue", label="trial val_acc")
    best, xs, ys = -math.inf, [], []
    for r in done:
        best = max(best, row_val_acc(r))
        xs.append(r["number"])
        ys.append(best)
    ax.plot(xs, ys, color="tab:red", drawstyle="steps-post", label="best so far")
    failed = [r["number"] for r in rows if r["state"] == "FAIL"]
    pruned = [r["number"] for r in rows if r["state"] == "PRUNED"]
    for numbers, marker, label in ((failed, "x", "failed"), (pruned, "|", "pruned")):
        if numbers:
            # Plotted on the bottom edge: they spent budget but have no final accuracy.
            ax.scatter(numbers, [0.0] * len(numbers), marker=marker, color="grey", label=label,
                       transform=ax.get_xaxis_transform(), clip_on=False)
    ax.set_xlabel("trial number")
    ax.set_ylabel(_VAL_LABEL)
    ax.set_title(f"Optimization history ({len(done)} complete, {len(failed)} failed, {len(pruned)} pruned)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def _param_importances(study: optuna.Study) -> dict[str, float] | str:
    """Importances of the parameters for val_acc, or the reason they cannot be computed."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.user_attrs.get(SEED_RERUN_ATTR) is None]
    if len(complete) < 2:
        return "needs at least 2 complete trials"
    if not any(t.params for t in complete):
        return "no searched parameters"

    def target(t: FrozenTrial) -> float:
        value = as_float(t.user_attrs.get("val_acc"))
        return as_float(t.values[0]) if math.isnan(value) and t.values else value

    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        result = optuna.importance.get_param_importances(study, evaluator=evaluator, target=target)
    except Exception as exc:  # too few / degenerate trials: the report says why and goes on
        return f"not computable: {exc}"
    result = {k: v for k, v in result.items() if math.isfinite(v)}
    return result or "not computable: no finite importances"


def _importance_figure(study: optuna.Study) -> Figure:
    title = "Parameter importances for validation accuracy (fANOVA)"
    importances = _param_importances(study)
    if isinstance(importances, str):
        return _message_figure(title, importances)
    names = list(importances)[::-1]
    fig = Figure(figsize=(6.4, 0.6 * len(names) + 1.8))
    ax = fig.add_subplot()
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (normalized, sums to 1)")
    ax.set_ylabel("parameter")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _is_log_param(study: optuna.Study, name: str) -> bool:
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        dist = t.distributions.get(name)
        if dist is not None:
            return bool(getattr(dist, "log", False))
    return False


def _slice_figure(study: optuna.Study, rows: Sequence[dict[str, Any]], name: str) -> Figure:
    done = [r for r in complete_rows(rows) if name in r["params"]]
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    xs = [r["params"][name] for r in done]
    ax.scatter(xs, [row_val_acc(r) for r in done], c=[r["number"] for r in done], cmap="Blues",
               edgecolors="k", linewidths=0.3, label="trials")
    if _is_log_param(study, name):
        ax.set_xscale("log")
    ax.set_xlabel(name)
    ax.set_ylabel(_VAL_LABEL)
    ax.set_title(f"Slice: validation accuracy vs {name} (darker = later trial)")
    fig.tight_layout()
    return fig


def build_figures(study: optuna.Study) -> dict[str, Figure]:
    """All figures of a one-study report, keyed by file stem (``<key>.png``).

    Keys: ``gap_vs_lambda_max``, ``gap_vs_adaptive_sharpness``, ``pareto``, ``history``,
    ``importances`` and ``slice_<param>`` for each of :data:`SLICE_PARAMS` that was searched.
    Scatter plots hold one point per complete trial with the plotted metrics; seed re-runs are
    left out. Empty dict when the study has no complete trial.
    """
    rows = search_rows(load_rows(study))
    if not complete_rows(rows):
        return {}
    figures = {
        "gap_vs_lambda_max": _gap_scatter(rows, "lambda_max", LAMBDA_LABEL,
                                          "Generalization gap vs lambda_max"),
        "gap_vs_adaptive_sharpness": _gap_scatter(rows, "adaptive_sharpness", "adaptive sharpness",
                                                  "Generalization gap vs adaptive sharpness"),
        "pareto": _pareto_figure(rows),
        "history": _history_figure(rows),
        "importances": _importance_figure(study),
    }
    searched = {p for r in rows for p in r["params"]}
    for name in SLICE_PARAMS:
        if name in searched:
            figures[f"slice_{name}"] = _slice_figure(study, rows, name)
    return figures


def save_figures(figures: dict[str, Figure], out_dir: Path) -> dict[str, Path]:
    """Write each figure to ``out_dir / "<key>.png"``, then clear it (frees its memory); the paths by key."""
    paths = {}
    for key, fig in figures.items():
        path = out_dir / f"{key}.png"
        fig.savefig(path, dpi=110)
        paths[key] = path
    for fig in figures.values():
        fig.clf()
    return paths
