"""Reports: tables, plots and markdown built from a study's storage (read only).

Two entry points back the CLI verbs:

* :func:`run_report` -- one study: terminal table of the best trials, PNG plots
  (generalization gap vs sharpness, Pareto front, history, importances, slices) and ``report.md``.
* :func:`run_compare` -- several studies (typically one per optimizer, same budget): best
  validation accuracy vs number of trials and vs train-seconds with bootstrap bands, final
  sharpness per optimizer, a ranking table, seed re-runs of the best configs and ``compare.md``.

Everything here only reads the storage: it is opened and studies are loaded with
:func:`sassha_tune.study.storage.open_storage` (``create=False``) and
:func:`sassha_tune.study.storage.load_study`, no attribute is ever set, RUNNING/WAITING trials are
ignored. Figures are built on
:class:`matplotlib.figure.Figure` directly (Agg canvas, no pyplot global state), so the pure
functions :func:`build_figures` and :func:`compare_figures` can be inspected by tests.

Selection rule everywhere: the best trial is chosen on **validation** accuracy; test accuracy is
reported for that trial only, never used to choose. Failed and pruned trials count toward the
budget (they spent trials and seconds) but never improve the best-so-far curve.

Budget health: a COMPLETE trial whose validation accuracy is at most
:func:`near_chance_threshold` (1.5x chance, never more than 5 points above chance) is
"near chance" (:func:`near_chance`, the one definition every command uses): a collapsed or
untrained network, finished but of no use. ``status``, ``report`` and ``compare`` count them next
to the failures by reason (:func:`budget_health`).

Seed re-runs (see ``docs/reports.md``): a trial with user attribute ``seed_rerun_of`` (the number
of the trial whose config it repeats) is a re-run, not a search trial; so is every trial of a study
named ``<study>-seeds``, which holds the re-runs of the best config of ``<study>``.
"""

from __future__ import annotations

import math
import platform
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState
from tabulate import tabulate

from sassha_tune.errors import StorageError
from sassha_tune.provenance import git_commit, package_version
from sassha_tune.study.storage import load_study, mask_url, open_storage

__all__ = [
    "NEAR_CHANCE_RULE",
    "SEED_STUDY_SUFFIX",
    "best_trials_table",
    "budget_health",
    "build_figures",
    "compare_figures",
    "failure_kind",
    "load_rows",
    "near_chance",
    "near_chance_threshold",
    "run_compare",
    "run_report",
]

#: A study named ``<base>{SEED_STUDY_SUFFIX}`` holds the seed re-runs of ``<base>``'s best config.
SEED_STUDY_SUFFIX = "-seeds"
#: Trial user attribute marking a seed re-run; its value is the number of the trial re-run.
SEED_RERUN_ATTR = "seed_rerun_of"
#: Parameters that get a slice plot when the study searched them.
SLICE_PARAMS = ("lr", "rho", "lazy_hessian", "eps")
#: The near-chance rule in words, for reports (:func:`near_chance_threshold` computes it).
NEAR_CHANCE_RULE = "val_acc <= chance + min(chance / 2, 0.05), chance = 1 / num_classes"
#: Number of bootstrap resamples of the trial order for the budget curves, and their seed.
N_BOOTSTRAP = 200
BOOTSTRAP_SEED = 0

# (row key, column header) of the metric columns shared by the tables.
_METRIC_COLUMNS = (
    ("val_acc", "val_acc"),
    ("test_acc", "test_acc"),
    ("gen_gap_acc", "gen_gap"),
    ("lambda_max", "lambda_max"),
    ("hessian_trace", "trace"),
    ("sam_sharpness", "sam_sharp"),
    ("adaptive_sharpness", "adapt_sharp"),
    ("train_seconds", "seconds"),
)
_GAP_LABEL = "generalization gap (gen_gap_acc, + = overfitting)"
_VAL_LABEL = "validation accuracy"
_LAMBDA_LABEL = "lambda_max (top Hessian eigenvalue)"


# --------------------------------------------------------------------------------------------
# storage access (read only)


# Storage URLs, opening and loading are study.storage's (one implementation, one set of messages):
# opened with ``create=False``, so a report never creates a database file or a table.
_mask_url = mask_url


def _open_storage(storage: str | optuna.storages.BaseStorage) -> optuna.storages.BaseStorage:
    """Open ``storage`` for reading without creating anything that is not there."""
    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    return open_storage(str(storage), create=False)


def _load_study(study_name: str, backend: optuna.storages.BaseStorage,
                shown_as: str | optuna.storages.BaseStorage) -> optuna.Study:
    """Load a study for reading; a missing one is a :class:`StorageError` naming the others."""
    return load_study(study_name, shown_as if isinstance(shown_as, str) else None, storage=backend)


# --------------------------------------------------------------------------------------------
# rows


def _float(value: Any) -> float:
    """``value`` as a float, NaN when missing or not a number."""
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _row(trial: FrozenTrial) -> dict[str, Any]:
    duration = None
    if trial.datetime_start is not None and trial.datetime_complete is not None:
        duration = (trial.datetime_complete - trial.datetime_start).total_seconds()
    return {
        "number": trial.number,
        "state": trial.state.name,
        "params": dict(trial.params),
        "values": list(trial.values) if trial.values is not None else None,
        "user_attrs": dict(trial.user_attrs),
        "duration_s": duration,
    }


def load_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per finished trial (COMPLETE, PRUNED or FAIL), in trial-number order.

    Each row: ``number``, ``state`` (name), ``params``, ``values`` (``None`` unless complete),
    ``user_attrs`` and ``duration_s`` (wall clock of the trial). RUNNING and WAITING trials are
    left out, so a report works while the study is still running.
    """
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    return [_row(t) for t in sorted(trials, key=lambda t: t.number)]


def _attr(row: dict[str, Any], key: str) -> float:
    return _float(row["user_attrs"].get(key))


def _val_acc(row: dict[str, Any]) -> float:
    """Validation accuracy: the stored attribute, else the first objective value."""
    value = _attr(row, "val_acc")
    if math.isnan(value) and row["values"]:
        value = _float(row["values"][0])
    return value


def near_chance_threshold(num_classes: int) -> float:
    """The highest validation accuracy still "near chance" for ``num_classes`` classes.

    1.5x chance leaves room for the noise of a small validation split around an untrained
    network's 1/C (0.15 for 10 classes, 0.015 for 100); capped at 5 points above chance so that
    a binary task does not call a 74 %-accurate model collapsed (0.55 for 2 classes).
    """
    chance = 1.0 / num_classes
    return chance + min(chance / 2, 0.05)


def near_chance(state: str | TrialState, user_attrs: dict[str, Any]) -> bool | None:
    """Whether a trial finished near chance accuracy: COMPLETE and
    ``val_acc <= near_chance_threshold(num_classes)`` (a collapsed or untrained network).

    ``None`` (unknown) when the trial does not store ``num_classes`` or ``val_acc`` (studies from
    before ``num_classes`` was stored): the number of classes is never guessed, and the first
    objective value is not taken for ``val_acc`` (it may be another metric). ``False`` for trials
    that are not COMPLETE: they are failed or pruned, not near chance.
    """
    name = state.name if isinstance(state, TrialState) else str(state)
    if name != "COMPLETE":
        return False
    classes = user_attrs.get("num_classes")
    if isinstance(classes, bool) or not isinstance(classes, int | float) or not classes >= 2:
        return None
    acc = _float(user_attrs.get("val_acc"))
    if math.isnan(acc):
        return None
    return acc <= near_chance_threshold(int(classes))


def failure_kind(reason: Any) -> str:
    """The kind of a ``failure_reason``: ``diverged``, ``out_of_memory``, ``lost``, ... as stored;
    ``error: <message>`` and ``rank_failed: <why>`` by their prefix, so that counts stay short;
    ``unknown`` when the trial stores none."""
    if reason is None or str(reason).strip() == "":
        return "unknown"
    return str(reason).split(":", 1)[0].strip() or "unknown"


def budget_health(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Where a study's trials went, from :func:`load_rows` rows.

    ``complete``, ``pruned`` and ``failed`` (counts); ``near_chance``: complete trials near chance
    among the ``near_chance_known`` complete trials that store ``num_classes`` and ``val_acc``
    (both 0 for an older study: unknown, not zero); ``failures``: FAIL trials by
    :func:`failure_kind`, most frequent first, and ``failures_known``: how many of them store a
    ``failure_reason`` at all.
    """
    rows = list(rows)
    states = Counter(r["state"] for r in rows)
    verdicts = [near_chance(r["state"], r["user_attrs"]) for r in rows if r["state"] == "COMPLETE"]
    failed = [r for r in rows if r["state"] == "FAIL"]
    kinds = Counter(failure_kind(r["user_attrs"].get("failure_reason")) for r in failed)
    return {
        "complete": states["COMPLETE"],
        "pruned": states["PRUNED"],
        "failed": states["FAIL"],
        "near_chance": sum(v is True for v in verdicts),
        "near_chance_known": sum(v is not None for v in verdicts),
        "failures": dict(sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))),
        "failures_known": sum(r["user_attrs"].get("failure_reason") is not None for r in failed),
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


def _complete(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["state"] == "COMPLETE" and not math.isnan(_val_acc(r))]


def _is_rerun(row: dict[str, Any]) -> bool:
    return row["user_attrs"].get(SEED_RERUN_ATTR) is not None


def _search_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that are part of the search (seed re-runs excluded)."""
    return [r for r in rows if not _is_rerun(r)]


def _ranked(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Complete trials, best validation accuracy first (ties: lower trial number first)."""
    return sorted(_complete(rows), key=lambda r: (-_val_acc(r), r["number"]))


def _pareto_numbers(rows: Sequence[dict[str, Any]]) -> set[int]:
    """Trial numbers on the front of (val_acc up, lambda_max down) among complete trials."""
    points = [(r["number"], _val_acc(r), _attr(r, "lambda_max")) for r in _complete(rows)]
    points = [p for p in points if not math.isnan(p[2])]
    front = set()
    for number, acc, lam in points:
        dominated = any(
            (a >= acc and m <= lam) and (a > acc or m < lam) for _, a, m in points
        )
        if not dominated:
            front.add(number)
    return front


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    if value is None:
        return "-"
    return str(value)


# --------------------------------------------------------------------------------------------
# tables


def _best_trials_rows(study: optuna.Study, n: int) -> tuple[list[str], list[list[str]]]:
    rows = load_rows(study)
    ranked = _ranked(_search_rows(rows))[:n]
    param_names = sorted({p for r in ranked for p in r["params"]})
    multi = len(study.directions) > 1
    front = _pareto_numbers(rows) if multi else set()
    # The column appears only when a shown trial is near chance: a best-10 of an older study (no
    # num_classes) or of a healthy one looks as before.
    chance = {r["number"] for r in ranked if near_chance(r["state"], r["user_attrs"])}
    headers = ["trial", *param_names, *(h for _, h in _METRIC_COLUMNS)]
    if multi:
        headers.append("pareto")
    if chance:
        headers.append("near_chance")
    table = []
    for r in ranked:
        line = [str(r["number"])]
        line += [_fmt(r["params"].get(p)) for p in param_names]
        line += [_fmt(_val_acc(r) if key == "val_acc" else _attr(r, key)) for key, _ in _METRIC_COLUMNS]
        if multi:
            line.append("*" if r["number"] in front else "")
        if chance:
            line.append("yes" if r["number"] in chance else "")
        table.append(line)
    return headers, table


def best_trials_table(study: optuna.Study, n: int = 10, tablefmt: str = "simple") -> str:
    """The ``n`` best complete trials (selected on validation accuracy) as a tabulate table.

    Columns: trial number, every searched parameter, then val_acc, test_acc, gen_gap, lambda_max,
    trace, sam_sharp, adapt_sharp, seconds (and ``pareto`` for a two-objective study, and
    ``near_chance`` = ``yes`` on the trials :func:`near_chance` when one of the shown trials is).
    """
    headers, table = _best_trials_rows(study, n)
    if not table:
        return f"study '{study.study_name}' has no complete trials yet"
    return tabulate(table, headers=headers, tablefmt=tablefmt, disable_numparse=True)


# --------------------------------------------------------------------------------------------
# figures for one study


def _message_figure(title: str, message: str) -> Figure:
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_axis_off()
    return fig


def _maybe_log(ax: Any, axis: str, values: Sequence[float]) -> None:
    """Log scale when all values are positive and span more than two decades."""
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 100:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def _gap_scatter(rows: Sequence[dict[str, Any]], x_key: str, x_label: str, title: str) -> Figure:
    """Generalization gap vs a sharpness measure, one point per complete trial, coloured by val acc."""
    pts = [(_attr(r, x_key), _attr(r, "gen_gap_acc"), _val_acc(r)) for r in _complete(rows)]
    pts = [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    xs, ys, cs = (list(v) for v in zip(*pts, strict=True)) if pts else ([], [], [])
    sc = ax.scatter(xs, ys, c=cs, cmap="viridis", edgecolors="k", linewidths=0.3, label="trials")
    if pts:
        fig.colorbar(sc, ax=ax, label=_VAL_LABEL)
    ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    _maybe_log(ax, "x", xs)
    ax.set_xlabel(x_label)
    ax.set_ylabel(_GAP_LABEL)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _pareto_figure(rows: Sequence[dict[str, Any]]) -> Figure:
    pts = [(r["number"], _attr(r, "lambda_max"), _val_acc(r)) for r in _complete(rows)]
    pts = [p for p in pts if math.isfinite(p[1])]
    front = _pareto_numbers(rows)
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    ax.scatter([p[1] for p in pts], [p[2] for p in pts], color="tab:blue", alpha=0.6, label="trials")
    fpts = sorted((p for p in pts if p[0] in front), key=lambda p: p[1])
    ax.plot([p[1] for p in fpts], [p[2] for p in fpts], color="tab:red", marker="o", drawstyle="steps-post",
            label="Pareto front")
    _maybe_log(ax, "x", [p[1] for p in pts])
    ax.set_xlabel(_LAMBDA_LABEL)
    ax.set_ylabel(_VAL_LABEL)
    ax.set_title("Pareto front: validation accuracy (up) vs lambda_max (down)")
    ax.legend(loc="best")
    fig.tight_layout()
    return fig


def _history_figure(rows: Sequence[dict[str, Any]]) -> Figure:
    done = _complete(rows)
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    ax.scatter([r["number"] for r in done], [_val_acc(r) for r in done], color="tab:blue", label="trial val_acc")
    best, xs, ys = -math.inf, [], []
    for r in done:
        best = max(best, _val_acc(r))
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
        value = _float(t.user_attrs.get("val_acc"))
        return _float(t.values[0]) if math.isnan(value) and t.values else value

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
    done = [r for r in _complete(rows) if name in r["params"]]
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    xs = [r["params"][name] for r in done]
    ax.scatter(xs, [_val_acc(r) for r in done], c=[r["number"] for r in done], cmap="Blues",
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
    rows = _search_rows(load_rows(study))
    if not _complete(rows):
        return {}
    figures = {
        "gap_vs_lambda_max": _gap_scatter(rows, "lambda_max", _LAMBDA_LABEL,
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


def _save_figures(figures: dict[str, Figure], out_dir: Path) -> dict[str, Path]:
    paths = {}
    for key, fig in figures.items():
        path = out_dir / f"{key}.png"
        fig.savefig(path, dpi=110)
        paths[key] = path
    return paths


# --------------------------------------------------------------------------------------------
# provenance




def _study_commit(study: optuna.Study, rows: Sequence[dict[str, Any]]) -> str | None:
    """The commit the study's trials ran with, when the study or its trials recorded one."""
    config = study.user_attrs.get("config") or {}
    sources: list[dict[str, Any]] = [study.user_attrs, config if isinstance(config, dict) else {}]
    sources += [r["user_attrs"] for r in rows]
    for source in sources:
        for key in ("git_commit", "code_commit", "commit"):
            if source.get(key):
                return str(source[key])
    return None


def _mask_secrets(value: Any) -> Any:
    """A copy of a config with the password of every URL-looking string hidden."""
    if isinstance(value, dict):
        return {k: _mask_secrets(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask_secrets(v) for v in value]
    if isinstance(value, str) and "://" in value:
        return _mask_url(value)
    return value


def _provenance(study: optuna.Study, rows: Sequence[dict[str, Any]], storage: str | None) -> list[list[str]]:
    devices = sorted({str(r["user_attrs"]["device"]) for r in rows if r["user_attrs"].get("device")})
    lines = [
        ["sassha_tune (report)", package_version("sassha-tune")],
        ["sassha_tune (study created with)", str(study.user_attrs.get("sassha_tune_version", "unknown"))],
        ["torch", package_version("torch")],
        ["optuna", package_version("optuna")],
        ["python", platform.python_version()],
        ["device(s)", ", ".join(devices) or "unknown"],
        ["study commit", _study_commit(study, rows) or "unknown"],
        ["report generated at commit", git_commit() or "unknown"],
    ]
    if storage is not None:
        lines.append(["storage", _mask_url(storage)])
    return lines


def _yaml_block(value: Any) -> str:
    text = yaml.safe_dump(_mask_secrets(value), sort_keys=False, default_flow_style=False)
    return f"```yaml\n{text}```\n"


# --------------------------------------------------------------------------------------------
# one-study report


def _state_counts(rows: Sequence[dict[str, Any]]) -> str:
    counts = Counter(r["state"] for r in rows)
    return ", ".join(f"{counts.get(s, 0)} {s.lower()}" for s in ("COMPLETE", "PRUNED", "FAIL"))


def _failure_counts(rows: Sequence[dict[str, Any]]) -> Counter[str]:
    return Counter(str(r["user_attrs"].get("failure_reason", "unknown")) for r in rows if r["state"] == "FAIL")


def _health_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The "Budget health" section of report.md: where the search trials went, with counts."""
    if not rows:
        return []
    health = budget_health(rows)
    table = [["complete", str(health["complete"])]]
    chance = near_chance_count(health)
    if chance is not None:
        table.append([f"near chance (of complete; {NEAR_CHANCE_RULE})", chance])
    table.append(["pruned", str(health["pruned"])])
    table.append(["failed", str(health["failed"])])
    if health["failures_known"]:
        table += [[f"failed: {kind}", str(n)] for kind, n in health["failures"].items()]
    out = ["## Budget health\n"]
    text = "Where the search trials went (seed re-runs not counted)."
    if chance is not None:  # an older study stores no num_classes: nothing is said about chance
        text += (" A complete trial is *near chance* when its validation accuracy is at most 1.5x "
                 "chance (never more than 5 points above chance): it finished, but the network collapsed or "
                 "never trained. Many such trials, or many diverged ones, mean a large part of the search "
                 "space is unusable for this task.")
    out.append(text + "\n")
    out.append(tabulate(table, headers=["trials", "count"], tablefmt="github", disable_numparse=True,
                        colalign=("left", "right")) + "\n")
    return out


_FIGURE_CAPTIONS = {
    "gap_vs_lambda_max": "Generalization gap vs lambda_max, one point per complete trial, colour = "
    "validation accuracy. A positive gap is overfitting. A rising trend says sharper minima "
    "generalize worse in this study.",
    "gap_vs_adaptive_sharpness": "Generalization gap vs adaptive (scale-invariant) sharpness.",
    "pareto": "Validation accuracy vs lambda_max; the red line is the Pareto front (no other trial "
    "is both more accurate and flatter).",
    "history": "Validation accuracy per trial and the best so far; failed (x) and pruned (|) "
    "trials are marked on the bottom edge.",
    "importances": "fANOVA importance of each parameter for validation accuracy (needs several "
    "complete trials to mean anything).",
}


def _report_markdown(study: optuna.Study, storage: str | None, figure_paths: dict[str, Path],
                     reruns: tuple[list[str], list[list[str]]]) -> str:
    rows = load_rows(study)
    search = _search_rows(rows)
    running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)))
    optimizer = study.user_attrs.get("optimizer", "unknown")
    objectives = study.user_attrs.get("objectives")
    if isinstance(objectives, list) and objectives:
        directions = ", ".join(str(o) for o in objectives)
    else:
        directions = ", ".join(d.name.lower() for d in study.directions)
    out = [f"# Study report: {study.study_name}\n"]
    out.append(f"- optimizer: `{optimizer}`")
    out.append(f"- objectives: {directions}; the best trial is selected on val_acc"
               + (", the Pareto front is val_acc up / lambda_max down" if len(study.directions) > 1 else ""))
    out.append(f"- trials: {_state_counts(rows)}, {running} running or waiting (ignored)")
    failures = _failure_counts(rows)
    if failures:
        out.append("- failure reasons: " + ", ".join(f"{k}: {v}" for k, v in sorted(failures.items())))
    rerun_rows = [r for r in rows if _is_rerun(r)]
    if rerun_rows:
        out.append(f"- seed re-runs (not part of the search, left out of plots): {len(rerun_rows)}")
    out.append("")
    out += _health_lines(search)
    ranked = _ranked(search)
    if not ranked:
        out.append("**No finished trials with results yet** - nothing to report. "
                   "Run the study (or wait for running trials) and report again.\n")
    else:
        best = ranked[0]
        out.append("## Best trial (selected on validation accuracy)\n")
        out.append(f"Trial {best['number']}: val_acc {_fmt(_val_acc(best))}, test_acc "
                   f"{_fmt(_attr(best, 'test_acc'))} (test reported once, for this trial only), "
                   f"gen_gap {_fmt(_attr(best, 'gen_gap_acc'))}, lambda_max {_fmt(_attr(best, 'lambda_max'))}.\n")
        out.append("```yaml\n" + yaml.safe_dump(best["params"], sort_keys=True) + "```\n")
        out.append("## Best trials\n")
        out.append(best_trials_table(study, n=10, tablefmt="github") + "\n")
        out.append("## Figures\n")
        for key, path in figure_paths.items():
            caption = _FIGURE_CAPTIONS.get(key)
            if caption is None and key.startswith("slice_"):
                caption = f"Validation accuracy vs `{key[6:]}` (sensitivity; darker = later trial)."
            out.append(f"### {key}\n\n{caption or ''}\n\n![{key}]({path.name})\n")
    if reruns[1]:
        out.append("## Best config re-run over seeds\n")
        out.append(tabulate(reruns[1], headers=reruns[0], tablefmt="github", disable_numparse=True) + "\n")
    out.append("## Config\n")
    config = study.user_attrs.get("config")
    out.append(_yaml_block(config) if config else "No config stored in the study.\n")
    space = study.user_attrs.get("search_space")
    if space:
        out.append("## Search space\n")
        out.append(_yaml_block(space))
    out.append("## Provenance\n")
    out.append(tabulate(_provenance(study, rows, storage), headers=["item", "value"], tablefmt="github") + "\n")
    return "\n".join(out)


def run_report(study_name: str, storage: str, out_dir: Path) -> None:
    """Print the best-trials table and write PNG plots and ``report.md`` to ``out_dir``.

    Reads the storage only. A missing study raises :class:`StorageError` listing the available
    names; a study without finished trials prints a message and writes a ``report.md`` saying so.
    """
    backend = _open_storage(storage)
    study = _load_study(study_name, backend, shown_as=storage)
    reruns = _rerun_table([study], backend, set(optuna.study.get_all_study_names(backend)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = build_figures(study)
    paths = _save_figures(figures, out_dir)
    for fig in figures.values():
        fig.clf()
    text = _report_markdown(study, storage if isinstance(storage, str) else None, paths, reruns)
    (out_dir / "report.md").write_text(text, encoding="utf-8")
    rows = load_rows(study)
    chance = near_chance_count(budget_health(_search_rows(rows)))
    print(f"study {study.study_name} ({study.user_attrs.get('optimizer', 'unknown')}): {_state_counts(rows)}"
          + (f"; near chance (of complete search trials): {chance}" if chance is not None else ""))
    if not figures:
        print(f"study '{study.study_name}' has no finished trials with results yet; "
              f"wrote {out_dir / 'report.md'}")
        return
    print(best_trials_table(study))
    print(f"wrote {out_dir / 'report.md'} and {len(paths)} plots to {out_dir}")


# --------------------------------------------------------------------------------------------
# comparison across studies


def _optimizer_name(study: optuna.Study) -> str:
    return str(study.user_attrs.get("optimizer") or study.study_name)


def _trial_cost(row: dict[str, Any]) -> float:
    """Seconds a trial spent: train_seconds, else its wall-clock duration, else 0."""
    cost = _attr(row, "train_seconds")
    if math.isnan(cost):
        cost = _float(row.get("duration_s"))
    return 0.0 if math.isnan(cost) else max(cost, 0.0)


def _budget_arrays(rows: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Per search trial (in trial order): val_acc (-inf unless complete) and its cost in seconds."""
    search = _search_rows(rows)
    accs = np.array([_val_acc(r) if r["state"] == "COMPLETE" else -np.inf for r in search], dtype=float)
    accs[np.isnan(accs)] = -np.inf
    costs = np.array([_trial_cost(r) for r in search], dtype=float)
    return accs, costs


def _bootstrap_orders(n: int, n_boot: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """``n_boot`` permutations of the trial order (first one = the observed order)."""
    rng = np.random.default_rng(seed)
    orders = [np.arange(n)] + [rng.permutation(n) for _ in range(n_boot - 1)]
    return np.stack(orders) if n else np.zeros((n_boot, 0), dtype=int)


def _best_so_far_by_trials(accs: np.ndarray) -> np.ndarray:
    """Best-so-far curves, one row per bootstrap order; NaN before the first complete trial."""
    orders = _bootstrap_orders(len(accs))
    curves = np.maximum.accumulate(accs[orders], axis=1)
    curves[~np.isfinite(curves)] = np.nan
    return curves


def _best_so_far_by_seconds(accs: np.ndarray, costs: np.ndarray, grid: np.ndarray) -> np.ndarray:
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


def _band(ax: Any, x: np.ndarray, curves: np.ndarray, label: str, color: Any) -> None:
    """Observed curve (solid) and the 10-90 % bootstrap band over trial orders (shaded)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns before any result
        lo = np.nanpercentile(curves, 10, axis=0)
        hi = np.nanpercentile(curves, 90, axis=0)
    ax.plot(x, curves[0], color=color, drawstyle="steps-post", label=label)
    ax.fill_between(x, lo, hi, color=color, alpha=0.2, step="post", linewidth=0)


def compare_figures(studies: Sequence[optuna.Study]) -> dict[str, Figure]:
    """Figures comparing studies, keyed by file stem.

    ``best_vs_trials`` and ``best_vs_seconds``: one solid line (observed order) and one shaded
    10-90 % bootstrap band (over :data:`N_BOOTSTRAP` seeded shuffles of the trial order) per study;
    ``final_sharpness``: one bar per study, lambda_max of its best trial (selected on val_acc);
    ``gap_vs_lambda_max``: one scatter per study, one point per complete trial.
    """
    colors = [f"C{i % 10}" for i in range(len(studies))]
    all_rows = [load_rows(s) for s in studies]
    labels = [f"{s.study_name} ({_optimizer_name(s)})" for s in studies]

    fig_n = Figure(figsize=(7, 4.8))
    ax_n = fig_n.add_subplot()
    fig_t = Figure(figsize=(7, 4.8))
    ax_t = fig_t.add_subplot()
    arrays = [_budget_arrays(rows) for rows in all_rows]
    total = max((float(c.sum()) for _, c in arrays), default=0.0)
    grid = np.linspace(0.0, total, 200) if total > 0 else np.zeros(1)
    for (accs, costs), label, color in zip(arrays, labels, colors, strict=True):
        if len(accs) == 0:
            continue
        _band(ax_n, np.arange(1, len(accs) + 1), _best_so_far_by_trials(accs), label, color)
        _band(ax_t, grid, _best_so_far_by_seconds(accs, costs, grid), label, color)
    ax_n.set_xlabel("number of trials (budget)")
    ax_t.set_xlabel("cumulative train seconds (budget)")
    for ax, fig, what in ((ax_n, fig_n, "trials"), (ax_t, fig_t, "train-seconds")):
        ax.set_ylabel("best validation accuracy so far")
        ax.set_title(f"Best val accuracy vs {what} (band: 10-90 % over shuffled trial orders)")
        if ax.lines:
            ax.legend(loc="lower right")
        fig.tight_layout()

    fig_s = Figure(figsize=(7, 4.8))
    ax_s = fig_s.add_subplot()
    lambdas = []
    for rows in all_rows:
        ranked = _ranked(_search_rows(rows))
        lambdas.append(_attr(ranked[0], "lambda_max") if ranked else math.nan)
    ax_s.bar(range(len(studies)), [0.0 if math.isnan(v) else v for v in lambdas], color=colors)
    ax_s.set_xticks(range(len(studies)), labels, rotation=20, ha="right")
    _maybe_log(ax_s, "y", lambdas)
    ax_s.set_xlabel("study (optimizer)")
    ax_s.set_ylabel("lambda_max of the best trial")
    ax_s.set_title("Final sharpness of each study's best trial (selected on val_acc)")
    fig_s.tight_layout()

    fig_g = Figure(figsize=(7, 4.8))
    ax_g = fig_g.add_subplot()
    xs_all = []
    for rows, label, color in zip(all_rows, labels, colors, strict=True):
        pts = [(_attr(r, "lambda_max"), _attr(r, "gen_gap_acc")) for r in _complete(_search_rows(rows))]
        pts = [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]
        xs_all += [p[0] for p in pts]
        ax_g.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, label=label, alpha=0.7)
    ax_g.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    _maybe_log(ax_g, "x", xs_all)
    ax_g.set_xlabel(_LAMBDA_LABEL)
    ax_g.set_ylabel(_GAP_LABEL)
    ax_g.set_title("Generalization gap vs lambda_max, all trials, by study")
    if studies:
        ax_g.legend(loc="best")
    fig_g.tight_layout()
    return {
        "best_vs_trials": fig_n,
        "best_vs_seconds": fig_t,
        "final_sharpness": fig_s,
        "gap_vs_lambda_max": fig_g,
    }


def _diverged_count(health: dict[str, Any]) -> str:
    """Diverged trials; ``-`` when the study failed trials but none stores a ``failure_reason``."""
    if health["failed"] and not health["failures_known"]:
        return "-"
    return str(health["failures"].get("diverged", 0))


def _ranking(studies: Sequence[optuna.Study]) -> tuple[list[str], list[list[str]]]:
    # near_chance and diverged: how much of the searched space is unusable (robustness to the
    # search space); near_chance is "-" for a study whose trials do not store num_classes.
    headers = ["rank", "study", "optimizer", "trials", "complete", "near_chance", "failed", "diverged",
               "pruned", "fail_rate", "best_val_acc", "test_acc", "best_trial", "lambda_max", "train_seconds"]
    entries = []
    for study in studies:
        rows = _search_rows(load_rows(study))
        counts = Counter(r["state"] for r in rows)
        health = budget_health(rows)
        ranked = _ranked(rows)
        best = ranked[0] if ranked else None
        entries.append((
            _val_acc(best) if best else -math.inf,
            [study.study_name, _optimizer_name(study), str(len(rows)), str(counts["COMPLETE"]),
             near_chance_count(health) or "-", str(counts["FAIL"]), _diverged_count(health),
             str(counts["PRUNED"]),
             f"{counts['FAIL'] / len(rows):.0%}" if rows else "-",
             _fmt(_val_acc(best)) if best else "-",
             _fmt(_attr(best, "test_acc")) if best else "-",
             str(best["number"]) if best else "-",
             _fmt(_attr(best, "lambda_max")) if best else "-",
             _fmt(sum(_trial_cost(r) for r in rows))],
        ))
    entries.sort(key=lambda e: -e[0])
    return headers, [[str(i + 1), *line] for i, (_, line) in enumerate(entries)]


def _by_optimizer(studies: Sequence[optuna.Study]) -> tuple[list[str], list[list[str]]] | None:
    """Median and IQR of best val_acc over the independent studies of each optimizer (>= 2)."""
    groups: dict[str, list[float]] = {}
    for study in studies:
        ranked = _ranked(_search_rows(load_rows(study)))
        groups.setdefault(_optimizer_name(study), []).append(_val_acc(ranked[0]) if ranked else math.nan)
    if not any(len(v) >= 2 for v in groups.values()):
        return None
    table = []
    for name, values in sorted(groups.items()):
        arr = np.array(values, dtype=float)
        finite = arr[np.isfinite(arr)]
        q1, med, q3 = np.percentile(finite, [25, 50, 75]) if len(finite) else (math.nan,) * 3
        table.append([name, str(len(values)), str(int(np.sum(~np.isfinite(arr)))), _fmt(float(med)),
                      f"{_fmt(float(q1))} - {_fmt(float(q3))}"])
    return ["optimizer", "studies", "studies without result", "median best_val_acc", "IQR"], table


def _seed_rerun_rows(study: optuna.Study, storage: str | optuna.storages.BaseStorage | None,
                     names_in_storage: set[str]) -> list[dict[str, Any]]:
    """Re-run rows for ``study``: its trials marked ``seed_rerun_of`` and the trials of ``<name>-seeds``."""
    rows = [r for r in load_rows(study) if _is_rerun(r)]
    companion = study.study_name + SEED_STUDY_SUFFIX
    if storage is not None and companion in names_in_storage:
        backend = _open_storage(storage)
        rows += load_rows(_load_study(companion, backend, shown_as=storage))
    return rows


def _mean_std(values: Sequence[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "-"
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
    return f"{np.mean(finite):.4g} ± {std:.2g}"


def _rerun_table(studies: Sequence[optuna.Study], storage: Any,
                 names_in_storage: set[str]) -> tuple[list[str], list[list[str]]]:
    headers = ["study", "optimizer", "rerun_of", "seeds", "failed", "val_acc", "test_acc", "lambda_max"]
    table = []
    for study in studies:
        rows = _seed_rerun_rows(study, storage, names_in_storage)
        if not rows:
            continue
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault(str(r["user_attrs"].get(SEED_RERUN_ATTR, "best")), []).append(r)
        for rerun_of, group in sorted(groups.items()):
            done = [r for r in group if r["state"] == "COMPLETE"]
            table.append([
                study.study_name, _optimizer_name(study), rerun_of, str(len(group)),
                str(sum(r["state"] == "FAIL" for r in group)),
                _mean_std([_val_acc(r) for r in done]),
                _mean_std([_attr(r, "test_acc") for r in done]),
                _mean_std([_attr(r, "lambda_max") for r in done]),
            ])
    return headers, table


_COMPARE_METHOD = """\
## Methodology

- Each study is one tuning run of one optimizer under its own declared search space; compare
  studies that share the budget (trials and train-seconds), sampler and pruner settings.
- **Selection on validation, test reported once**: a study's best trial is the complete trial
  with the highest `val_acc`; its `test_acc` is shown next to it and never used to choose.
- **Failures count**: failed and pruned trials spend a trial (and their seconds) of the budget
  and never improve the best-so-far curve; the fail rate is in the ranking table.
- **Robustness to the search space**: `near_chance` counts complete trials with
  {rule} (a collapsed or untrained network; `-` when the study's
  trials do not store `num_classes`), `diverged` the trials that failed on a non-finite loss
  (`-` when no failed trial stores a `failure_reason`).
  Neither improves the best, but both spend budget.
- **Budget curves**: best validation accuracy so far vs number of trials and vs cumulative
  `train_seconds` (the trial's wall-clock time when not stored). The solid line is the observed
  trial order; the band is the 10-90 % range over {n_boot} shuffles of the trial order (numpy seed
  {seed}), i.e. how lucky the observed order was. Equal train-seconds is the primary comparison
  (SASSHA and SAM cost about 2x per step); equal trials is secondary.
- **Seed re-runs**: trials with user attribute `seed_rerun_of` and all trials of a study named
  `<study>{suffix}` are re-runs of a chosen config over training seeds; they are left out of the
  search statistics and summarised as mean ± std (sample std).
"""


def _compare_markdown(studies: Sequence[optuna.Study], figure_paths: dict[str, Path], ranking: Any,
                      by_opt: Any, reruns: Any, storage: str | None) -> str:
    out = ["# Optimizer comparison\n"]
    out.append("Studies: " + ", ".join(f"`{s.study_name}` ({_optimizer_name(s)})" for s in studies) + "\n")
    out.append(_COMPARE_METHOD.format(n_boot=N_BOOTSTRAP, seed=BOOTSTRAP_SEED, suffix=SEED_STUDY_SUFFIX,
                                      rule=NEAR_CHANCE_RULE))
    out.append("## Ranking by best validation accuracy\n")
    out.append(tabulate(ranking[1], headers=ranking[0], tablefmt="github", disable_numparse=True) + "\n")
    if by_opt is not None:
        out.append("## Per optimizer over independent studies\n")
        out.append(tabulate(by_opt[1], headers=by_opt[0], tablefmt="github", disable_numparse=True) + "\n")
    out.append("## Best configs re-run over seeds\n")
    if reruns[1]:
        out.append(tabulate(reruns[1], headers=reruns[0], tablefmt="github", disable_numparse=True) + "\n")
    else:
        out.append(f"No seed re-runs found (no `{SEED_RERUN_ATTR}` trials, no `<study>{SEED_STUDY_SUFFIX}` "
                   "studies). Single-seed results overstate differences; re-run the best configs.\n")
    out.append("## Figures\n")
    captions = {
        "best_vs_trials": "Best validation accuracy vs number of trials.",
        "best_vs_seconds": "Best validation accuracy vs cumulative train-seconds (equal-cost view).",
        "final_sharpness": "lambda_max of each study's best trial (lower = flatter).",
        "gap_vs_lambda_max": "Generalization gap vs lambda_max over all complete trials, by study.",
    }
    for key, path in figure_paths.items():
        out.append(f"### {key}\n\n{captions.get(key, '')}\n\n![{key}]({path.name})\n")
    out.append("## Provenance\n")
    rows = [r for s in studies for r in load_rows(s)]
    prov = _provenance(studies[0], rows, storage) if studies else []
    out.append(tabulate(prov, headers=["item", "value"], tablefmt="github") + "\n")
    return "\n".join(out)


def run_compare(study_names: list[str], storage: str, out_dir: Path) -> None:
    """Compare studies under the same budget: print the ranking, write plots and ``compare.md``.

    Studies named ``<base>-seeds`` whose base is also listed are treated as seed re-runs of that
    base, not as competitors. Reads the storage only.
    """
    if not study_names:
        raise StorageError("compare needs at least one study name")
    backend = _open_storage(storage)
    names_in_storage = set(optuna.study.get_all_study_names(backend))
    competitors = [n for n in dict.fromkeys(study_names)
                   if not (n.endswith(SEED_STUDY_SUFFIX) and n[: -len(SEED_STUDY_SUFFIX)] in study_names)]
    studies = [_load_study(name, backend, shown_as=storage) for name in competitors]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = compare_figures(studies)
    paths = _save_figures(figures, out_dir)
    for fig in figures.values():
        fig.clf()
    ranking = _ranking(studies)
    by_opt = _by_optimizer(studies)
    reruns = _rerun_table(studies, backend, names_in_storage)
    text = _compare_markdown(studies, paths, ranking, by_opt, reruns,
                             storage if isinstance(storage, str) else None)
    (out_dir / "compare.md").write_text(text, encoding="utf-8")
    print(tabulate(ranking[1], headers=ranking[0], disable_numparse=True))
    if reruns[1]:
        print()
        print(tabulate(reruns[1], headers=reruns[0], disable_numparse=True))
    print(f"wrote {out_dir / 'compare.md'} and {len(paths)} plots to {out_dir}")

