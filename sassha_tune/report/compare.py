"""The comparison of several studies under the same budget: budget-curve figures with bootstrap
bands, the ranking, the per-optimizer table, ``compare.md`` and :func:`run_compare` behind
``sassha-tune compare``."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from matplotlib.figure import Figure

from sassha_tune.errors import StorageError
from sassha_tune.printable import printable
from sassha_tune.study.records import TrialRecord

from .correlation import correlate
from .curves import (
    BOOTSTRAP_SEED,
    N_BOOTSTRAP,
    best_so_far_by_seconds,
    best_so_far_by_trials,
    budget_arrays,
    trial_cost,
)
from .figures import GAP_LABEL, LAMBDA_LABEL, maybe_log, save_figures
from .files import Written, write_text
from .health import NEAR_CHANCE_RULE, budget_health, near_chance_count, trained_rows
from .html import write_tables_page
from .markdown import figure_entry, markdown_table, md_code, md_text, provenance_section, terminal_table
from .reruns import rerun_table
from .rows import (
    SEED_RERUN_ATTR,
    SEED_STUDY_SUFFIX,
    format_value,
    load_rows,
    optimizer_name,
    ranked_rows,
    read_studies,
    search_rows,
)

__all__ = ["compare", "compare_figures", "run_compare"]


def _band(ax: Any, x: np.ndarray, curves: np.ndarray, label: str, color: Any) -> None:
    """Median over trial orders (one line) and the 10-90 % band over them (shaded): one line and
    one band per study, so that seven optimizers stay readable."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns before any result
        lo, med, hi = np.nanpercentile(curves, [10, 50, 90], axis=0)
    ax.plot(x, med, color=color, drawstyle="steps-post", label=label, linewidth=1.6)
    ax.fill_between(x, lo, hi, color=color, alpha=0.2, step="post", linewidth=0)


# Legends of the comparison's figures sit outside the axes (seven optimizers do not fit inside).
_LEGEND = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0, "fontsize": "small"}


def _budget_figures(all_rows: Sequence[list[TrialRecord]], labels: list[str], colors: list[str]
                    ) -> tuple[Figure, Figure]:
    """Best validation accuracy so far against the number of trials and against train seconds."""
    fig_n = Figure(figsize=(9.5, 4.8))
    ax_n = fig_n.add_subplot()
    fig_t = Figure(figsize=(9.5, 4.8))
    ax_t = fig_t.add_subplot()
    arrays = [budget_arrays(rows) for rows in all_rows]
    total = max((float(c.sum()) for _, c in arrays), default=0.0)
    grid = np.linspace(0.0, total, 200) if total > 0 else np.zeros(1)
    for (accs, costs), label, color in zip(arrays, labels, colors, strict=True):
        if len(accs) == 0:
            continue
        _band(ax_n, np.arange(1, len(accs) + 1), best_so_far_by_trials(accs), label, color)
        _band(ax_t, grid, best_so_far_by_seconds(accs, costs, grid), label, color)
    ax_n.set_xlabel("number of trials (budget)")
    ax_t.set_xlabel("cumulative train seconds (budget)")
    for ax, fig, what in ((ax_n, fig_n, "trials"), (ax_t, fig_t, "train-seconds")):
        ax.set_ylabel("best validation accuracy so far")
        ax.set_title(f"Best val accuracy vs {what}\n(line: median, band: 10-90 % over shuffled trial orders)")
        if ax.lines:
            ax.legend(**_LEGEND)
        fig.tight_layout()
    return fig_n, fig_t


def _sharpness_bars(all_rows: Sequence[list[TrialRecord]], labels: list[str], colors: list[str]) -> Figure:
    """lambda_max of each study's best trained trial, one bar per study."""
    fig = Figure(figsize=(7, 4.8))
    ax = fig.add_subplot()
    lambdas = []
    for rows in all_rows:
        ranked = ranked_rows(trained_rows(rows))
        lambdas.append(ranked[0].metric("lambda_max") if ranked else math.nan)
    ax.bar(range(len(labels)), [0.0 if math.isnan(v) else v for v in lambdas], color=colors)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    maybe_log(ax, "y", lambdas)
    ax.set_xlabel("study (optimizer)")
    ax.set_ylabel("lambda_max of the best trial")
    ax.set_title("Final sharpness of each study's best trained trial (selected on val_acc)")
    fig.tight_layout()
    return fig


def _gap_by_study(all_rows: Sequence[list[TrialRecord]], labels: list[str], colors: list[str]) -> Figure:
    """Generalization gap against lambda_max, one scatter of trained trials per study."""
    fig = Figure(figsize=(9.5, 4.8))
    ax = fig.add_subplot()
    xs_all = []
    for rows, label, color in zip(all_rows, labels, colors, strict=True):
        pts = [(r.metric("lambda_max"), r.metric("gen_gap_acc")) for r in trained_rows(rows)]
        pts = [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]
        xs_all += [p[0] for p in pts]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, label=label, alpha=0.7)
    ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    maybe_log(ax, "x", xs_all)
    ax.set_xlabel(LAMBDA_LABEL)
    ax.set_ylabel(GAP_LABEL)
    ax.set_title("Generalization gap vs lambda_max, trained trials (near chance left out), by study")
    if labels:
        ax.legend(**_LEGEND)
    fig.tight_layout()
    return fig


def compare_figures(studies: Sequence[optuna.Study],
                    rows: Sequence[list[TrialRecord]] | None = None) -> dict[str, Figure]:
    """Figures comparing studies, keyed by file stem.

    ``best_vs_trials`` and ``best_vs_seconds``: one line (the median over trial orders) and one shaded
    10-90 % bootstrap band (over :data:`~sassha_tune.report.curves.N_BOOTSTRAP` seeded shuffles of
    the trial order) per study; ``final_sharpness``: one bar per study, lambda_max of its best trial
    (selected on val_acc among the trained trials); ``gap_vs_lambda_max``: one scatter per study, one
    point per trained trial (near-chance trials left out). Legends sit outside the axes. ``rows``:
    each study's rows, when already read.
    """
    colors = [f"C{i % 10}" for i in range(len(studies))]
    all_rows = [load_rows(s) for s in studies] if rows is None else rows
    labels = [printable(f"{s.study_name} ({optimizer_name(s)})") for s in studies]
    fig_n, fig_t = _budget_figures(all_rows, labels, colors)
    fig_s = _sharpness_bars(all_rows, labels, colors)
    fig_g = _gap_by_study(all_rows, labels, colors)
    return {
        "best_vs_trials": fig_n,
        "best_vs_seconds": fig_t,
        "final_sharpness": fig_s,
        "gap_vs_lambda_max": fig_g,
    }


#: A study that ranks on fewer trained trials than this gets a caveat: its best value is mostly luck.
FEW_TRAINED = 5


def thin_evidence(studies: Sequence[optuna.Study], rows: Sequence[list[TrialRecord]]) -> list[tuple[str, str, int]]:
    """(study name, optimizer, trained trials) of each study (``rows``: each one's rows) whose
    ranking rests on fewer than :data:`FEW_TRAINED` trained trials (complete and not near
    chance): a best-of-few says little about an optimizer (:func:`caveat` words it)."""
    thin = []
    for study, study_rows in zip(studies, rows, strict=True):
        n = len(trained_rows(study_rows))
        if n < FEW_TRAINED:
            thin.append((study.study_name, optimizer_name(study), n))
    return thin


def caveat(n: int) -> str:
    """What a study's place in the ranking is worth when it rests on ``n`` trained trials."""
    return (f"ranks on {n} trained trial{'' if n == 1 else 's'} (fewer than {FEW_TRAINED}): its place says little "
            "about the optimizer; give it more trials, or re-run its best configuration over seeds.")


def _diverged_count(health: dict[str, Any]) -> str:
    """Diverged trials (FAIL or, by default, PRUNED); ``-`` when the study failed trials but none
    stores a ``failure_reason``."""
    if health["failed"] and not health["failures_known"]:
        return "-"
    return str(health["diverged"])


def _ranking(studies: Sequence[optuna.Study], all_rows: Sequence[list[TrialRecord]]) -> tuple[list[str], list[list[str]]]:
    # near_chance and diverged: how much of the searched space is unusable (robustness to the
    # search space); near_chance is "-" for a study whose trials do not store num_classes.
    headers = ["rank", "study", "optimizer", "trials", "complete", "near_chance", "failed", "diverged",
               "pruned", "fail_rate", "best_val_acc", "test_acc", "best_trial", "lambda_max", "train_seconds"]
    entries = []
    for study, study_rows in zip(studies, all_rows, strict=True):
        rows = search_rows(study_rows)
        counts = Counter(r.state for r in rows)
        health = budget_health(rows)
        ranked = ranked_rows(rows)
        best = ranked[0] if ranked else None
        entries.append((
            best.val_acc if best else -math.inf,
            [study.study_name, optimizer_name(study), str(len(rows)), str(counts["COMPLETE"]),
             near_chance_count(health) or "-", str(counts["FAIL"]), _diverged_count(health),
             str(counts["PRUNED"]),
             f"{counts['FAIL'] / len(rows):.0%}" if rows else "-",
             format_value(best.val_acc) if best else "-",
             format_value(best.metric("test_acc")) if best else "-",
             str(best.number) if best else "-",
             format_value(best.metric("lambda_max")) if best else "-",
             format_value(sum(trial_cost(r) for r in rows))],
        ))
    entries.sort(key=lambda e: -e[0])
    return headers, [[str(i + 1), *line] for i, (_, line) in enumerate(entries)]


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    arr = np.array([v for v in values if math.isfinite(v)], dtype=float)
    if not len(arr):
        return (math.nan,) * 3
    q1, med, q3 = np.percentile(arr, [25, 50, 75])
    return float(q1), float(med), float(q3)


def _sharpness_entries(studies: Sequence[optuna.Study], all_rows: Sequence[list[TrialRecord]]) -> list[dict[str, Any]]:
    """Per study, over its trained trials only (near chance left out: an untrained network is
    trivially flat): median and quartiles of lambda_max and adaptive sharpness, and the Spearman
    correlation of lambda_max with the generalization gap (bootstrap interval, n)."""
    out = []
    for study, study_rows in zip(studies, all_rows, strict=True):
        rows = search_rows(study_rows)
        trained = trained_rows(rows)
        health = budget_health(rows)
        entry: dict[str, Any] = {"study": study.study_name, "optimizer": optimizer_name(study),
                                 "trained": len(trained),
                                 "near_chance": health["near_chance"] if health["near_chance_known"] else None}
        for key in ("lambda_max", "adaptive_sharpness"):
            q1, med, q3 = _quartiles([r.metric(key) for r in trained])
            entry[key] = {"median": med if math.isfinite(med) else None,
                          "iqr": [q1, q3] if math.isfinite(q1) else None}
        entry["lambda_max_vs_gap"] = correlate("lambda_max", "gen_gap_acc", "spearman", trained)
        out.append(entry)
    return out


def _sharpness_table(entries: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    def quart(d: dict[str, Any]) -> str:
        if d["median"] is None:
            return "-"
        return f"{format_value(d['median'])} [{format_value(d['iqr'][0])}, {format_value(d['iqr'][1])}]"

    table = []
    for e in entries:
        c = e["lambda_max_vs_gap"]
        rho = "-" if c["value"] is None else (
            f"{c['value']:+.2f}" + (f" [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}]" if c["ci"] else ""))
        table.append([e["study"], e["optimizer"], str(e["trained"]),
                      "-" if e["near_chance"] is None else str(e["near_chance"]),
                      quart(e["lambda_max"]), quart(e["adaptive_sharpness"]), rho])
    return (["study", "optimizer", "trained", "near_chance", "lambda_max median [IQR]",
             "adaptive median [IQR]", "rho(lambda_max, gap) [CI]"], table)


def _by_optimizer(studies: Sequence[optuna.Study],
                  all_rows: Sequence[list[TrialRecord]]) -> tuple[list[str], list[list[str]]] | None:
    """Median and IQR of best val_acc over the independent studies of each optimizer (>= 2)."""
    groups: dict[str, list[float]] = {}
    for study, study_rows in zip(studies, all_rows, strict=True):
        ranked = ranked_rows(search_rows(study_rows))
        groups.setdefault(optimizer_name(study), []).append(ranked[0].val_acc if ranked else math.nan)
    if not any(len(v) >= 2 for v in groups.values()):
        return None
    table = []
    for name, values in sorted(groups.items()):
        arr = np.array(values, dtype=float)
        finite = arr[np.isfinite(arr)]
        q1, med, q3 = np.percentile(finite, [25, 50, 75]) if len(finite) else (math.nan,) * 3
        table.append([name, str(len(values)), str(int(np.sum(~np.isfinite(arr)))), format_value(float(med)),
                      f"{format_value(float(q1))} - {format_value(float(q3))}"])
    return ["optimizer", "studies", "studies without result", "median best_val_acc", "IQR"], table


# Left out first when the ranking is too wide for the terminal (all columns stay in compare.md).
_RANKING_DROP = ("train_seconds", "fail_rate", "pruned", "diverged", "best_trial", "test_acc")

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
  `train_seconds` (the trial's wall-clock time when not stored). The line is the median and the
  band the 10-90 % range over {n_boot} orders of the trials (the observed one and shuffles, numpy
  seed {seed}), i.e. how much of a lead is the order the sampler happened to try things in. Equal train-seconds is the primary comparison
  (SASSHA and SAM cost about 2x per step); equal trials is secondary.
- **Seed re-runs**: trials with user attribute `seed_rerun_of` and all trials of a study named
  `<study>{suffix}` are re-runs of a chosen config over training seeds; they are left out of the
  search statistics and summarised as mean ± std (sample std).
"""

_FIGURE_CAPTIONS = {
    "best_vs_trials": "Best validation accuracy vs number of trials.",
    "best_vs_seconds": "Best validation accuracy vs cumulative train-seconds (equal-cost view).",
    "final_sharpness": "lambda_max of each study's best trained trial (lower = flatter).",
    "gap_vs_lambda_max": "Generalization gap vs lambda_max over the trained trials, by study (near-chance "
    "trials left out: untrained networks are trivially flat).",
}


def _compare_markdown(studies: Sequence[optuna.Study], all_rows: Sequence[list[TrialRecord]],
                      figure_paths: dict[str, Path], ranking: Any, by_opt: Any, reruns: Any, storage: str | None,
                      sharpness: Any, caveats: Sequence[tuple[str, str, int]]) -> str:
    out = ["# Optimizer comparison\n"]
    out.append("Studies: " + ", ".join(f"{md_code(s.study_name)} ({md_text(optimizer_name(s))})" for s in studies)
               + "\n")
    out.append(_COMPARE_METHOD.format(n_boot=N_BOOTSTRAP, seed=BOOTSTRAP_SEED, suffix=SEED_STUDY_SUFFIX,
                                      rule=NEAR_CHANCE_RULE))
    out.append("## Ranking by best validation accuracy\n")
    out.append(markdown_table(*ranking))
    out += [f"**Caveat.** {md_code(name)} ({md_text(optimizer)}) {caveat(n)}\n" for name, optimizer, n in caveats]
    out.append("## Sharpness over trained trials\n")
    out.append("Over each study's trained trials only (complete and not near chance: an untrained network is "
               "trivially flat, so counting it would make an optimizer that often fails to train look flat). "
               "Median and interquartile range of the final sharpness; Spearman's rho of lambda_max with the "
               "generalization gap, with its 95 % bootstrap interval. Sharpness is comparable across studies "
               "only when they share the measurement protocol (`metrics` section) and the task.\n")
    out.append(markdown_table(*sharpness))
    if by_opt is not None:
        out.append("## Per optimizer over independent studies\n")
        out.append(markdown_table(*by_opt))
    out.append("## Best configs re-run over seeds\n")
    if reruns[1]:
        out.append(markdown_table(*reruns))
    else:
        out.append(f"No seed re-runs found (no `{SEED_RERUN_ATTR}` trials, no `<study>{SEED_STUDY_SUFFIX}` "
                   "studies). Single-seed results overstate differences; re-run the best configs.\n")
    out.append("## Figures\n")
    for key, path in figure_paths.items():
        out.append(figure_entry(key, _FIGURE_CAPTIONS.get(key, ""), path))
    rows = [r for study_rows in all_rows for r in study_rows]
    out += provenance_section(studies[0] if studies else None, rows, storage)
    return "\n".join(out)


def run_compare(study_names: list[str], storage: str | optuna.storages.BaseStorage, out_dir: Path, *,
                echo: Callable[[str], None] = print) -> Written:
    """Compare studies under the same budget: print the ranking (through ``echo``), write plots,
    ``compare.md``, ``summary.json`` and ``compare.html`` (the same tables and figures in one
    self-contained page); return what was written (:class:`~.files.Written`).

    Studies named ``<base>-seeds`` whose base is also listed are treated as seed re-runs of that
    base, not as competitors. Reads the storage only.
    """
    if not study_names:
        raise StorageError("compare needs at least one study name")
    backend, names_in_storage, reads = read_studies(_competitors(study_names), storage)
    studies = [study for study, _, _ in reads]
    all_rows = [rows for _, rows, _ in reads]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = compare_figures(studies, all_rows)
    paths = save_figures(figures, out_dir)
    ranking = _ranking(studies, all_rows)
    by_opt = _by_optimizer(studies, all_rows)
    reruns = rerun_table(studies, backend, names_in_storage, rows=all_rows)
    sharp = _sharpness_entries(studies, all_rows)
    caveats = thin_evidence(studies, all_rows)
    text = _compare_markdown(studies, all_rows, paths, ranking, by_opt, reruns,
                             storage if isinstance(storage, str) else None, _sharpness_table(sharp), caveats)
    write_text(out_dir / "compare.md", text)
    summary = _compare_summary(ranking, sharp, caveats)
    write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    tables = {"Ranking by best validation accuracy": ranking, "Sharpness over trained trials": _sharpness_table(sharp),
              "Per optimizer over independent studies": by_opt if by_opt is not None else ([], []),
              "Best configs re-run over seeds": reruns}
    page = write_tables_page(
        out_dir / "compare.html", "Optimizer comparison",
        "Studies: " + ", ".join(f"{s.study_name} ({optimizer_name(s)})" for s in studies)
        + ". compare.md (beside this page) says how each number is computed.",
        tables, {key: path for key, path in paths.items() if Path(path).suffix == ".png"},
        [f"Caveat: {name} ({optimizer}) {caveat(n)}" for name, optimizer, n in caveats])
    written = Written(out_dir, [out_dir / "compare.md", out_dir / "summary.json", page, *paths.values()], text,
                      summary, tables)
    _echo_compare(echo, ranking, sharp, reruns, caveats)
    echo(f"wrote {out_dir / 'compare.md'}, summary.json, compare.html and {len(paths)} plots to {out_dir}")
    return written


def _competitors(study_names: list[str]) -> list[str]:
    """The studies compared: each name once, without the ``<base>-seeds`` studies whose base is
    listed (they are that base's seed re-runs)."""
    return [n for n in dict.fromkeys(study_names)
            if not (n.endswith(SEED_STUDY_SUFFIX) and n[: -len(SEED_STUDY_SUFFIX)] in study_names)]


def _compare_summary(ranking: tuple[list[str], list[list[str]]], sharp: list[dict[str, Any]],
                     caveats: Sequence[tuple[str, str, int]]) -> dict[str, Any]:
    """``summary.json`` of a comparison."""
    return {
        "studies": [dict(zip(ranking[0], line, strict=True)) for line in ranking[1]],
        "sharpness_over_trained": sharp,
        "near_chance_rule": NEAR_CHANCE_RULE,
        "caveats": [f"`{name}` ({optimizer}) {caveat(n)}" for name, optimizer, n in caveats],
    }


def _echo_compare(echo: Callable[[str], None], ranking: tuple[list[str], list[list[str]]],
                  sharp: list[dict[str, Any]], reruns: tuple[list[str], list[list[str]]],
                  caveats: Sequence[tuple[str, str, int]]) -> None:
    """The comparison's terminal lines: the ranking, its caveats, the sharpness and the re-runs."""
    echo(terminal_table(*ranking, drop_order=_RANKING_DROP))
    for name, optimizer, n in caveats:
        echo(f"caveat: {printable(name)} ({printable(optimizer)}) {caveat(n)}")
    echo("")
    echo(terminal_table(*_sharpness_table(sharp), drop_order=("adaptive median [IQR]",)))
    if reruns[1]:
        echo("")
        echo(terminal_table(*reruns))


def compare(studies: Sequence[str], *, storage: str | None = None, out: str | Path = "compare",
            log: Callable[[str], None] | None = None) -> Written:
    """``sassha-tune compare`` from Python (also ``sassha_tune.compare(...)``): write the comparison
    of ``studies`` to ``out`` and return what was written (:class:`~.files.Written`; in Jupyter it
    shows as compare.md). ``storage`` and ``log`` as for ``sassha_tune.report``."""
    import logging

    from sassha_tune.study.storage import resolve_storage

    if isinstance(studies, str):
        studies = [studies]
    return run_compare(list(studies), resolve_storage(storage), Path(out), echo=log or logging.getLogger("sassha_tune").info)
