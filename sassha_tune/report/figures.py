"""The figures of a one-study report, and saving figures as PNG files.

Figures are built on :class:`matplotlib.figure.Figure` directly (Agg canvas, no pyplot global
state), so :func:`build_figures` is a pure function whose figures tests can inspect. Seed re-runs
are left out of every figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib.cm as cm
import numpy as np
import optuna
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

from sassha_tune.study.records import TrialRecord, val_acc_of

from .curves import study_epochs, training_curve
from .files import replaced
from .health import near_chance_rows, pareto_numbers, trained_rows
from .rows import (
    SEED_RERUN_ATTR,
    as_float,
    complete_rows,
    load_rows,
    ranked_rows,
    sampled_study,
    search_rows,
)

__all__ = ["GAP_LABEL", "IMPORTANCE_TRIALS", "LAMBDA_LABEL", "N_CURVES", "SLICE_PARAMS", "Importances", "build_figures",
           "curve_rows", "history_series", "maybe_log", "param_importances", "save_figures", "tracked_rows"]

#: Parameters that get a slice plot when the study searched them.
SLICE_PARAMS = ("lr", "rho", "lazy_hessian", "eps")
#: Axis labels shared with the comparison's figures.
GAP_LABEL = "generalization gap (gen_gap_acc, + = overfitting)"
LAMBDA_LABEL = "lambda_max (top Hessian eigenvalue)"
_VAL_LABEL = "validation accuracy"
#: How many of the best trials get their learning curves drawn.
N_CURVES = 5
#: fANOVA's cost grows faster than the number of trials: over more complete trials than this, the
#: importances are those of a seeded random sample of this many.
IMPORTANCE_TRIALS = 200
_CHANCE_STYLE = {"marker": "x", "color": "tab:red", "linewidths": 1.0}
_CHANCE_LABEL = "near chance (left out of statistics)"


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


def finite_points(rows: Sequence[TrialRecord], x_key: str, y_key: str) -> list[tuple[float, float, float, int]]:
    """(x, y, val_acc, trial number) of the rows whose x and y are finite: a scatter's points."""
    pts = [(r.metric(x_key), r.val_acc if y_key == "val_acc" else r.metric(y_key), r.val_acc,
            r.number) for r in rows]
    return [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]


def _gap_scatter(rows: Sequence[TrialRecord], x_key: str, x_label: str, title: str) -> Figure:
    """Generalization gap vs a sharpness measure: one point per trained trial, coloured by val
    acc; near-chance trials drawn apart (red x), never in the statistics."""
    pts = finite_points(trained_rows(rows), x_key, "gen_gap_acc")
    chance = finite_points(near_chance_rows(rows), x_key, "gen_gap_acc")
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    xs, ys, cs = ([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts])
    sc = ax.scatter(xs, ys, c=cs, cmap="viridis", edgecolors="k", linewidths=0.3, label="trained trials")
    if pts:
        fig.colorbar(sc, ax=ax, label=_VAL_LABEL)
    if chance:
        ax.scatter([p[0] for p in chance], [p[1] for p in chance], label=_CHANCE_LABEL, **_CHANCE_STYLE)
    ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    maybe_log(ax, "x", xs + [p[0] for p in chance])
    ax.set_xlabel(x_label)
    ax.set_ylabel(GAP_LABEL)
    ax.set_title(f"{title} ({len(pts)} trained, {len(chance)} near chance)")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return fig


def _pareto_figure(rows: Sequence[TrialRecord]) -> Figure:
    pts = finite_points(trained_rows(rows), "lambda_max", "val_acc")
    chance = finite_points(near_chance_rows(rows), "lambda_max", "val_acc")
    front = pareto_numbers(rows)
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", alpha=0.6, label="trained trials")
    if chance:
        ax.scatter([p[0] for p in chance], [p[1] for p in chance], label=_CHANCE_LABEL, **_CHANCE_STYLE)
    fpts = sorted((p for p in pts if p[3] in front), key=lambda p: p[0])
    ax.plot([p[0] for p in fpts], [p[1] for p in fpts], color="tab:orange", marker="o", drawstyle="steps-post",
            label="Pareto front (trained trials only)")
    maybe_log(ax, "x", [p[0] for p in pts + chance])
    ax.set_xlabel(LAMBDA_LABEL)
    ax.set_ylabel(_VAL_LABEL)
    ax.set_title("Pareto front: validation accuracy (up) vs lambda_max (down)")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return fig


def history_series(row: TrialRecord, key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of one per-epoch metric from a trial's ``history`` attribute."""
    history = row.history
    pts = [(int(h.get("epoch") or i + 1), as_float(h.get(key))) for i, h in enumerate(history) if isinstance(h, dict)]
    pts = [p for p in pts if math.isfinite(p[1])]
    return [p[0] for p in pts], [p[1] for p in pts]


def curve_rows(rows: Sequence[TrialRecord], n: int = N_CURVES) -> list[TrialRecord]:
    """The best ``n`` trained trials that stored a per-epoch history (for the learning curves)."""
    return [r for r in ranked_rows(trained_rows(rows)) if r.history][:n]


def _curves_figure(rows: Sequence[TrialRecord]) -> Figure:
    best = curve_rows(rows)
    title = f"Learning curves of the {len(best)} best trained trials"
    if not best:
        return _message_figure(title, "no trial stored a per-epoch history")
    fig = Figure(figsize=(11, 4.4))
    ax_acc, ax_loss = fig.subplots(1, 2)
    for i, r in enumerate(best):
        color = f"C{i}"
        for ax, metric in ((ax_acc, "acc"), (ax_loss, "loss")):
            for split, style in (("train", "--"), ("val", "-")):
                xs, ys = history_series(r, f"{split}_{metric}")
                if xs:
                    ax.plot(xs, ys, linestyle=style, color=color, marker=".",
                            label=f"trial {r.number}" if split == "val" else None)
    ax_acc.set_ylabel("accuracy (solid: validation, dashed: training)")
    ax_loss.set_ylabel("loss (solid: validation, dashed: training)")
    for ax in (ax_acc, ax_loss):
        ax.set_xlabel("epoch")
    ax_acc.legend(loc="best", fontsize="small")
    fig.suptitle(title + " (training values: running average over the epoch)")
    fig.tight_layout()
    return fig


def tracked_rows(rows: Sequence[TrialRecord], n: int = N_CURVES) -> list[TrialRecord]:
    """The best ``n`` trained trials whose history holds sharpness measured during training."""
    return [r for r in ranked_rows(trained_rows(rows)) if history_series(r, "track_lambda_max")[0]][:n]


def _tracked_figure(rows: Sequence[TrialRecord]) -> Figure:
    """``lambda_max`` and the Hessian trace over training (``metrics.track_every``), best trials."""
    best = tracked_rows(rows)
    fig = Figure(figsize=(11, 4.4))
    ax_lambda, ax_trace = fig.subplots(1, 2)
    for i, r in enumerate(best):
        for ax, key in ((ax_lambda, "track_lambda_max"), (ax_trace, "track_hessian_trace")):
            xs, ys = history_series(r, key)
            ax.plot(xs, ys, color=f"C{i}", marker=".", label=f"trial {r.number}")
    for ax, label in ((ax_lambda, LAMBDA_LABEL), (ax_trace, "Hessian trace")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        maybe_log(ax, "y", [y for line in ax.get_lines() for y in line.get_ydata()])
    ax_lambda.legend(loc="best", fontsize="small")
    fig.suptitle(f"Sharpness during training of the {len(best)} best trained trials "
                 "(cheap budget: not comparable with the final values)")
    fig.tight_layout()
    return fig


def _is_log_values(values: Sequence[float]) -> bool:
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 100


def _param_panel(ax: Any, study: optuna.Study, name: str, trained: Sequence[TrialRecord],
                 chance: Sequence[TrialRecord]) -> None:
    """One panel of :func:`_params_vs_lambda_figure`: parameter ``name`` against lambda_max."""
    for group, kwargs in ((trained, {"c": "tab:blue", "edgecolors": "k", "linewidths": 0.3, "label": "trained"}),
                          (chance, {**_CHANCE_STYLE, "label": "near chance"})):
        pts = [(as_float(r.params.get(name)), r.metric("lambda_max")) for r in group if name in r.params]
        pts = [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], **kwargs)
    if _is_log_param(study, name):
        ax.set_xscale("log")
    maybe_log(ax, "y", [r.metric("lambda_max") for r in [*trained, *chance]])
    ax.set_xlabel(name)
    ax.set_ylabel("lambda_max")


def _params_vs_lambda_figure(study: optuna.Study, rows: Sequence[TrialRecord], names: Sequence[str]) -> Figure:
    trained, chance = trained_rows(rows), near_chance_rows(rows)
    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):
        _param_panel(ax, study, name, trained, chance)
    for ax in axes[len(names):]:
        ax.set_axis_off()
    if len(axes) and axes[0].get_legend_handles_labels()[0]:  # no legend over an empty first panel
        axes[0].legend(loc="best", fontsize="small")
    fig.suptitle("Each searched parameter vs lambda_max (red x: near chance)")
    fig.tight_layout()
    return fig


def _scaled_axis(col: np.ndarray, name: str, log: bool) -> tuple[np.ndarray, str]:
    """One axis of the parallel coordinates: its values scaled to [0, 1] (log10 first when ``log``;
    all 0.5 when they are equal) and its label with the range."""
    col = np.log10(col) if log else col
    finite = col[np.isfinite(col)]
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    scaled = (col - lo) / (hi - lo) if hi > lo else 0.5
    fmt = (lambda v: f"{10 ** v:.2g}") if log else (lambda v: f"{v:.3g}")
    return scaled, f"{name}\n[{fmt(lo)}, {fmt(hi)}]" + ("\n(log)" if log else "")


def _parallel_figure(study: optuna.Study, rows: Sequence[TrialRecord], names: Sequence[str]) -> Figure:
    """Parallel coordinates: one line per trained trial through its (normalized) parameters and
    lambda_max to its val_acc, coloured by val_acc."""
    trained = [r for r in trained_rows(rows) if all(name in r.params for name in names)]
    axes_names = [*names, "lambda_max", "val_acc"]

    def raw(r: TrialRecord, name: str) -> float:
        if name == "val_acc":
            return r.val_acc
        if name == "lambda_max":
            return r.metric(name)
        return as_float(r.params.get(name))

    fig = Figure(figsize=(max(6.4, 1.4 * len(axes_names)), 4.8))
    ax = fig.add_subplot()
    table = np.array([[raw(r, a) for a in axes_names] for r in trained], dtype=float).reshape(-1, len(axes_names))
    scaled = np.full_like(table, np.nan)
    labels = []
    for j, name in enumerate(axes_names):
        col = table[:, j]
        log = (_is_log_param(study, name) if name in names else _is_log_values(col)) and np.all(col[np.isfinite(col)] > 0)
        scaled[:, j], label = _scaled_axis(col, name, bool(log))
        labels.append(label)
    accs = table[:, -1] if len(table) else np.zeros(0)
    norm = Normalize(vmin=float(np.nanmin(accs)) if len(accs) else 0, vmax=float(np.nanmax(accs)) if len(accs) else 1)
    order = np.argsort(accs)  # the best drawn last, on top; one collection: thousands of trials draw fast
    xs = np.arange(len(axes_names), dtype=float)
    ax.add_collection(LineCollection([np.column_stack([xs, scaled[k]]) for k in order],
                                     colors=cm.viridis(norm(accs[order])), alpha=0.8, linewidths=1.2))
    ax.set_xlim(-0.2, len(axes_names) - 0.8)
    ax.set_ylim(-0.05, 1.05)
    for j in range(len(axes_names)):
        ax.axvline(j, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(axes_names)), labels, fontsize="small")
    ax.set_yticks([0, 1], ["min", "max"])
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label=_VAL_LABEL)
    ax.set_title(f"Parallel coordinates of the {len(trained)} trained trials (near-chance trials left out)")
    fig.tight_layout()
    return fig


def _history_figure(rows: Sequence[TrialRecord]) -> Figure:
    done = complete_rows(rows)
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    ax.scatter([r.number for r in done], [r.val_acc for r in done], color="tab:blue", label="trial val_acc")
    best, xs, ys = -math.inf, [], []
    for r in done:
        best = max(best, r.val_acc)
        xs.append(r.number)
        ys.append(best)
    ax.plot(xs, ys, color="tab:red", drawstyle="steps-post", label="best so far")
    failed = [r.number for r in rows if r.state == "FAIL"]
    pruned = [r.number for r in rows if r.state == "PRUNED"]
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


#: How each outcome of a trial is drawn in the training figures (colour, marker).
OUTCOME_STYLE = {"completed": ("tab:blue", "o"), "near_chance": ("tab:red", "x"), "pruned": ("tab:grey", "|"),
                 "diverged": ("tab:orange", "v"), "failed": ("black", "x")}
TRAINING_LABEL = "training spent (run-equivalents: epochs trained / epochs of one run)"


def _training_figure(rows: Sequence[TrialRecord], epochs: int) -> Figure:
    """Best validation accuracy so far against the training spent, each trial at the
    run-equivalents spent when it ended, drawn by how it ended (:data:`OUTCOME_STYLE`)."""
    curve = training_curve(rows, epochs)
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    ax.plot([0.0, *curve["cost"]], [math.nan, *curve["best"]], color="tab:red", drawstyle="steps-post",
            label="best complete trial so far")
    for kind, (color, marker) in OUTCOME_STYLE.items():
        pts = [(c, v) for c, v, o in zip(curve["cost"], curve["value"], curve["outcome"], strict=True)
               if o == kind and not math.isnan(v)]
        if pts:
            ax.scatter(*zip(*pts, strict=True), color=color, marker=marker, label=kind.replace("_", " "), s=18)
    ax.set_xlabel(TRAINING_LABEL)
    ax.set_ylabel(_VAL_LABEL)
    total = curve["cost"][-1] if curve["cost"] else 0.0
    ax.set_title(f"Best so far vs training spent ({total:.1f} run-equivalents, {len(curve['cost'])} trials)")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return fig


class Importances(NamedTuple):
    """fANOVA importances of the parameters for val_acc (``values``, None when they cannot be
    computed: ``reason`` says why), over ``used`` of the study's ``complete`` search trials."""

    values: dict[str, float] | None
    reason: str
    used: int
    complete: int

    def note(self) -> str:
        """``""``, or what the importances were computed over when it was a sample."""
        return f"over a random {self.used} of the {self.complete} complete trials" if self.used < self.complete else ""


def param_importances(study: optuna.Study) -> Importances:
    """Importances of the parameters for val_acc (fANOVA, seed 0) over the complete search trials,
    a seeded random :data:`IMPORTANCE_TRIALS` of them when there are more; or why not."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.user_attrs.get(SEED_RERUN_ATTR) is None]
    used = min(len(complete), IMPORTANCE_TRIALS)
    if len(complete) < 2:
        return Importances(None, "needs at least 2 complete trials", used, len(complete))
    if not any(t.params for t in complete):
        return Importances(None, "no searched parameters", used, len(complete))

    def target(t: FrozenTrial) -> float:
        return val_acc_of(t.values, t.user_attrs)

    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        result = optuna.importance.get_param_importances(sampled_study(study, complete, IMPORTANCE_TRIALS),
                                                         evaluator=evaluator, target=target)
    except Exception as exc:  # too few / degenerate trials: the report says why and goes on
        return Importances(None, f"not computable: {exc}", used, len(complete))
    result = {k: v for k, v in result.items() if math.isfinite(v)}
    if not result:
        return Importances(None, "not computable: no finite importances", used, len(complete))
    return Importances(result, "", used, len(complete))


def _importance_figure(importances: Importances) -> Figure:
    title = "Parameter importances for validation accuracy (fANOVA)"
    if importances.values is None:
        return _message_figure(title, importances.reason)
    names = list(importances.values)[::-1]
    fig = Figure(figsize=(6.4, 0.6 * len(names) + 1.8))
    ax = fig.add_subplot()
    ax.barh(names, [importances.values[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (normalized, sums to 1)")
    ax.set_ylabel("parameter")
    ax.set_title(title + (f"\n{importances.note()}" if importances.note() else ""))
    fig.tight_layout()
    return fig


def _is_log_param(study: optuna.Study, name: str) -> bool:
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        dist = t.distributions.get(name)
        if dist is not None:
            return bool(getattr(dist, "log", False))
    return False


def _slice_figure(study: optuna.Study, rows: Sequence[TrialRecord], name: str) -> Figure:
    done = [r for r in complete_rows(rows) if name in r.params]
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    xs = [r.params[name] for r in done]
    ax.scatter(xs, [r.val_acc for r in done], c=[r.number for r in done], cmap="Blues",
               edgecolors="k", linewidths=0.3, label="trials")
    if _is_log_param(study, name):
        ax.set_xscale("log")
    ax.set_xlabel(name)
    ax.set_ylabel(_VAL_LABEL)
    ax.set_title(f"Slice: validation accuracy vs {name} (darker = later trial)")
    fig.tight_layout()
    return fig


def build_figures(study: optuna.Study, rows: Sequence[TrialRecord] | None = None,
                  importances: Importances | None = None) -> dict[str, Figure]:
    """All figures of a one-study report, keyed by file stem (``<key>.png``).

    Keys: ``gap_vs_lambda_max``, ``gap_vs_adaptive_sharpness``, ``pareto``, ``history``,
    ``best_vs_training`` (the anytime curve: best so far against run-equivalents spent), ``importances``, ``learning_curves`` (the :data:`N_CURVES` best trained trials),
    ``params_vs_lambda_max`` and ``parallel_coordinates`` (when parameters were searched) and
    ``slice_<param>`` for each of :data:`SLICE_PARAMS` that was searched, and
    ``sharpness_during_training`` when trials measured it (``metrics.track_every``). Scatter plots hold one
    point per complete trial with the plotted metrics, near-chance trials drawn apart (red x) and
    never on the Pareto front; seed re-runs are left out. Empty dict when the study has no complete trial.
    ``rows`` (the study's :func:`~sassha_tune.report.rows.load_rows`) and ``importances``
    (:func:`param_importances`): what the caller already read or computed.
    """
    rows = search_rows(load_rows(study) if rows is None else rows)
    if not complete_rows(rows):
        return {}
    figures = {
        "gap_vs_lambda_max": _gap_scatter(rows, "lambda_max", LAMBDA_LABEL,
                                          "Generalization gap vs lambda_max"),
        "gap_vs_adaptive_sharpness": _gap_scatter(rows, "adaptive_sharpness", "adaptive sharpness",
                                                  "Generalization gap vs adaptive sharpness"),
        "pareto": _pareto_figure(rows),
        "history": _history_figure(rows),
        "best_vs_training": _training_figure(rows, study_epochs(study)),
        "importances": _importance_figure(param_importances(study) if importances is None else importances),
    }
    searched = sorted({p for r in rows for p in r.params})
    figures["learning_curves"] = _curves_figure(rows)
    if tracked_rows(rows):
        figures["sharpness_during_training"] = _tracked_figure(rows)
    if searched:
        figures["params_vs_lambda_max"] = _params_vs_lambda_figure(study, rows, searched)
        figures["parallel_coordinates"] = _parallel_figure(study, rows, searched)
    for name in SLICE_PARAMS:
        if name in searched:
            figures[f"slice_{name}"] = _slice_figure(study, rows, name)
    return figures


def save_figures(figures: dict[str, Figure], out_dir: Path) -> dict[str, Path]:
    """Write each figure to ``out_dir / "<key>.png"``, then clear it (frees its memory); the paths by key."""
    paths = {}
    for key, fig in figures.items():
        path = out_dir / f"{key}.png"
        with replaced(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        paths[key] = path
    for fig in figures.values():
        fig.clf()
    return paths
