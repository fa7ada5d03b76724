"""``report.html``: one self-contained interactive page per study (plotly, its JavaScript inlined
once, so the file opens without a network).

It holds Optuna's own visualizations (history, intermediate values, parallel coordinate,
importances, slice, contour; over every complete trial, as optuna-dashboard shows them, but over a
sample in a larger study: :data:`OPTUNA_PLOT_TRIALS`, :data:`CONTOUR_TRIALS`) and ours
(generalization gap vs sharpness, the Pareto front, learning curves, sharpness during training
where measured; trained trials, near-chance ones drawn apart), with the verdict, the correlation table and the best trials.
"""

from __future__ import annotations

import html
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState
from plotly.offline import get_plotlyjs
from tabulate import tabulate

from sassha_tune.study.records import TrialRecord, val_acc_of

from .curves import study_epochs, training_curve
from .figures import (
    GAP_LABEL,
    LAMBDA_LABEL,
    OUTCOME_STYLE,
    TRAINING_LABEL,
    Importances,
    curve_rows,
    finite_points,
    history_series,
    param_importances,
    tracked_rows,
)
from .files import write_text
from .health import near_chance_rows, pareto_numbers, trained_rows
from .rows import load_rows, sampled_study, search_rows
from .summary import correlation_table

__all__ = ["CONTOUR_TRIALS", "OPTUNA_PLOT_TRIALS", "html_figures", "write_html", "write_tables_page"]


def _target(t: FrozenTrial) -> float:
    return val_acc_of(t.values, t.user_attrs)


#: Optuna's plots are drawn over at most this many finished trials (a seeded random sample of a
#: larger study): their cost and page size grow with every trial; the contour plot's with the
#: square of them (a grid of every pair of parameter values), so it gets fewer.
OPTUNA_PLOT_TRIALS = 1000
CONTOUR_TRIALS = 200


def _optuna_figures(study: optuna.Study, importances: Importances) -> tuple[dict[str, go.Figure | str], str]:
    """Optuna's plots (on val_acc), or why one could not be drawn; and over what, when a sample."""
    vis = optuna.visualization
    kw = {"target": _target, "target_name": "val_acc"}
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    samples: dict[int, optuna.Study] = {}

    def over(limit: int) -> optuna.Study:
        if len(finished) <= limit:
            return study
        if limit not in samples:
            samples[limit] = sampled_study(study, finished, limit)
        return samples[limit]

    makers: dict[str, Callable[[], go.Figure | str]] = {
        "Optimization history (Optuna)": lambda: vis.plot_optimization_history(over(OPTUNA_PLOT_TRIALS), **kw),
        "Intermediate values: the per-epoch objective (Optuna)": lambda: vis.plot_intermediate_values(
            over(OPTUNA_PLOT_TRIALS)),
        "Parallel coordinate (Optuna)": lambda: vis.plot_parallel_coordinate(over(OPTUNA_PLOT_TRIALS), **kw),
        "Parameter importances (Optuna, fANOVA)": lambda: _importance_bars(importances),
        "Slice (Optuna)": lambda: vis.plot_slice(over(OPTUNA_PLOT_TRIALS), **kw),
        "Contour (Optuna)": lambda: vis.plot_contour(over(CONTOUR_TRIALS), **kw),
    }
    out: dict[str, go.Figure | str] = {}
    for title, make in makers.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[title] = make()
        except Exception as exc:  # too few trials, no parameters, several objectives: say why
            out[title] = f"not available: {exc}".splitlines()[0]
    drawn = [f"{what} over a random {limit}" for what, limit in (("Optuna's plots", OPTUNA_PLOT_TRIALS),
                                                                    ("the contour", CONTOUR_TRIALS)) if limit in samples]
    note = (f"Of the {len(finished)} finished trials, {' and '.join(drawn)} are drawn "
            "(history.png of report.md shows every trial)." if drawn else "")
    return out, note


def _importance_bars(importances: Importances) -> go.Figure | str:
    """The report's fANOVA importances (:func:`~.figures.param_importances`) as Optuna draws them."""
    if importances.values is None:
        return f"not available: {importances.reason}"
    names = list(importances.values)[::-1]
    fig = go.Figure(go.Bar(x=[importances.values[n] for n in names], y=names, orientation="h"))
    fig.update_layout(title="Hyperparameter importances for val_acc" + (
        f" ({importances.note()})" if importances.note() else ""), xaxis_title="importance (fANOVA, sums to 1)",
        yaxis_title="hyperparameter")
    return fig


def _scatter(rows: list[TrialRecord], x_key: str, y_key: str, x_label: str, y_label: str,
             title: str, front: set[int] | None = None) -> go.Figure:
    fig = go.Figure()
    trained = finite_points(trained_rows(rows), x_key, y_key)
    chance = finite_points(near_chance_rows(rows), x_key, y_key)
    fig.add_trace(go.Scatter(
        x=[p[0] for p in trained], y=[p[1] for p in trained], mode="markers", name="trained trials",
        text=[f"trial {p[3]}, val_acc {p[2]:.4g}" for p in trained],
        marker={"color": [p[2] for p in trained], "colorscale": "Viridis", "showscale": True,
                "colorbar": {"title": "val_acc"}, "line": {"width": 0.5, "color": "black"}}))
    if chance:
        fig.add_trace(_chance_trace(chance))
    if front is not None:
        fig.add_trace(_front_trace([p for p in trained if p[3] in front]))
    xs = [p[0] for p in trained + chance]
    if xs and min(xs) > 0 and max(xs) / min(xs) > 100:
        fig.update_xaxes(type="log")
    fig.update_layout(title=title, xaxis_title=x_label, yaxis_title=y_label,
                      legend={"orientation": "h", "y": -0.2})
    return fig


def _chance_trace(points: list[tuple[float, float, float, int]]) -> go.Scatter:
    """The near-chance trials, drawn apart (red x)."""
    return go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="markers",
                      name="near chance (left out)", text=[f"trial {p[3]}" for p in points],
                      marker={"symbol": "x", "color": "red", "size": 9})


def _front_trace(points: list[tuple[float, float, float, int]]) -> go.Scatter:
    """The Pareto front through its points, as a step line."""
    points = sorted(points, key=lambda p: p[0])
    return go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers",
                      line={"shape": "hv", "color": "orange"}, name="Pareto front (trained)")


def _curves(rows: list[TrialRecord]) -> go.Figure:
    fig = go.Figure()
    for i, r in enumerate(curve_rows(rows)):
        color = f"hsl({(i * 67) % 360}, 70%, 45%)"
        for split, dash in (("val", "solid"), ("train", "dash")):
            xs, ys = history_series(r, f"{split}_acc")
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=f"trial {r.number} {split}",
                                     line={"color": color, "dash": dash}))
    fig.update_layout(title="Learning curves of the best trained trials (solid: validation, dashed: training)",
                      xaxis_title="epoch", yaxis_title="accuracy")
    return fig


def _tracked(rows: list[TrialRecord]) -> go.Figure:
    """lambda_max over training (``metrics.track_every``) of the best trained trials that measured it."""
    fig = go.Figure()
    for r in tracked_rows(rows):
        xs, ys = history_series(r, "track_lambda_max")
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=f"trial {r.number}"))
    fig.update_layout(title="lambda_max during training (cheap budget: not comparable with the final values)",
                      xaxis_title="epoch", yaxis_title=LAMBDA_LABEL)
    return fig


def _training(rows: list[TrialRecord], epochs: int) -> go.Figure:
    """The anytime curve: best so far against run-equivalents spent, each trial where it ended."""
    curve = training_curve(rows, epochs)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0.0, *curve["cost"]], y=[None, *[None if math.isnan(b) else b for b in curve["best"]]],
                             mode="lines", line={"shape": "hv", "color": "firebrick"}, name="best complete trial so far"))
    for kind, (color, _) in OUTCOME_STYLE.items():
        pts = [(c, v, n) for c, v, o, n in zip(curve["cost"], curve["value"], curve["outcome"], curve["number"],
                                               strict=True) if o == kind and not math.isnan(v)]
        if pts:
            xs, ys, numbers = zip(*pts, strict=True)
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name=kind.replace("_", " "),
                                     marker={"color": color.removeprefix("tab:")},
                                     text=[f"trial {n}" for n in numbers]))
    fig.update_layout(title="Best so far vs training spent", xaxis_title=TRAINING_LABEL,
                      yaxis_title="validation accuracy")
    return fig


def html_figures(study: optuna.Study, rows: list[TrialRecord] | None = None,
                 importances: Importances | None = None) -> dict[str, go.Figure | str]:
    """Every figure of ``report.html`` by title: ours first, then Optuna's (a string says why a
    figure is missing). ``rows`` and ``importances``: what the caller already read or computed."""
    return _figures(study, rows, importances)[0]


def _figures(study: optuna.Study, rows: list[TrialRecord] | None,
             importances: Importances | None) -> tuple[dict[str, go.Figure | str], str]:
    """:func:`html_figures`, and a note when Optuna's were drawn over a sample of the trials."""
    rows = search_rows(load_rows(study) if rows is None else rows)
    ours: dict[str, go.Figure | str] = {
        "Generalization gap vs lambda_max": _scatter(rows, "lambda_max", "gen_gap_acc", LAMBDA_LABEL, GAP_LABEL,
                                                     "Generalization gap vs lambda_max"),
        "Generalization gap vs adaptive sharpness": _scatter(rows, "adaptive_sharpness", "gen_gap_acc",
                                                             "adaptive sharpness", GAP_LABEL,
                                                             "Generalization gap vs adaptive sharpness"),
        "Pareto front": _scatter(rows, "lambda_max", "val_acc", LAMBDA_LABEL, "validation accuracy",
                                 "Validation accuracy vs lambda_max", front=pareto_numbers(rows)),
        "Learning curves": _curves(rows),
        "Best so far vs training spent": _training(rows, study_epochs(study)),
    }
    if tracked_rows(rows):
        ours["Sharpness during training"] = _tracked(rows)
    theirs, note = _optuna_figures(study, param_importances(study) if importances is None else importances)
    return {**ours, **theirs}, note


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; margin: 1em 0; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f0f0f0; }
.verdict { background: #fff8e0; border-left: 4px solid #e0a000; padding: 0.6em 1em; }
.missing { color: #777; font-style: italic; }
"""


def write_html(study: optuna.Study, path: Path, summary: dict[str, Any],
               tables: dict[str, tuple[list[str], list[list[str]]]], rows: list[TrialRecord] | None = None,
               importances: Importances | None = None) -> Path:
    """Write ``report.html`` (self-contained: plotly's JavaScript inlined once) and return its path.
    ``tables``: further tables (headers, rows of text cells) by title, e.g. the best trials;
    ``rows``, ``importances``: as for :func:`html_figures`."""
    figures, note = _figures(study, rows, importances)
    c = summary["counts"]
    parts = [f"<h1>Study report: {html.escape(study.study_name)}</h1>",
             f"<p>optimizer <code>{html.escape(summary['optimizer'])}</code>; {c['trials']} search trials: "
             f"{c['trained']} trained, {c['near_chance'] if c['near_chance'] is not None else 'unknown'} near chance "
             f"({html.escape(summary['near_chance_rule'])}), "
             f"{c['failed']} failed, {c['pruned']} pruned. Pareto front (trained trials): "
             f"{html.escape(str(summary['pareto'] or 'none'))}.</p>",
             "<h2>Does flatness predict generalization here?</h2>",
             f"<p class='verdict'>{html.escape(summary['verdict'])}</p>",
             tabulate(correlation_table(summary)[1], headers=correlation_table(summary)[0], tablefmt="html",
                      disable_numparse=True),
             "<p>Brackets: bootstrap interval; computed over the trained trials only.</p>"]
    for title, (headers, table) in tables.items():
        if table:
            parts += [f"<h2>{html.escape(title)}</h2>",
                      tabulate(table, headers=headers, tablefmt="html", disable_numparse=True)]
    parts.append("<h2>Figures</h2><p>Ours (near-chance trials drawn apart), then Optuna's own "
                 f"(over every complete trial, as optuna-dashboard shows them). {html.escape(note)}</p>")
    for title, fig in figures.items():
        parts.append(f"<h3>{html.escape(title)}</h3>")
        if isinstance(fig, str):
            parts.append(f"<p class='missing'>{html.escape(fig)}</p>")
        else:
            parts.append(fig.to_html(full_html=False, include_plotlyjs=False))
    page = ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
            f"<title>{html.escape(study.study_name)}: sassha-tune report</title><style>{_STYLE}</style>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
    write_text(path, page)
    return path


def write_tables_page(path: Path, title: str, intro: str, tables: dict[str, tuple[list[str], list[list[str]]]],
                      images: dict[str, Path], notes: list[str] | None = None) -> Path:
    """A self-contained page of tables (headers, rows of text cells, by title) and PNG figures
    (inlined as data URIs, so the file opens alone): ``compare.html``."""
    import base64

    parts = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>"]
    parts += [f"<p class='verdict'>{html.escape(note)}</p>" for note in notes or []]
    for heading, (headers, table) in tables.items():
        if table:
            parts += [f"<h2>{html.escape(heading)}</h2>",
                      tabulate(table, headers=headers, tablefmt="html", disable_numparse=True)]
    if images:
        parts.append("<h2>Figures</h2>")
    for key, image in images.items():
        data = base64.b64encode(Path(image).read_bytes()).decode("ascii")
        parts.append(f"<h3>{html.escape(key)}</h3><img alt='{html.escape(key)}' src='data:image/png;base64,{data}'>")
    page = ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_STYLE} img {{max-width: 100%;}}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
    write_text(path, page)
    return path
