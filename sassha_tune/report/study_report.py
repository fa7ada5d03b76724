"""The report of one study: the best-trials table, the budget-health section, ``report.md`` and
:func:`run_report` behind ``sassha-tune report``."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml
from tabulate import tabulate

from sassha_tune.printable import printable
from sassha_tune.study.records import FAILURE_REASON, TrialRecord

from .figures import build_figures, param_importances, save_figures
from .files import Written, write_text
from .health import NEAR_CHANCE_RULE, budget_health, near_chance_count, pareto_numbers
from .html import write_html
from .markdown import (
    fenced,
    figure_entry,
    markdown_table,
    md_code,
    md_text,
    provenance_section,
    terminal_table,
    yaml_block,
)
from .reruns import rerun_table
from .rows import (
    format_value,
    load_rows,
    ranked_rows,
    read_studies,
    search_rows,
)
from .summary import correlation_lines, study_summary, terminal_lines

__all__ = ["best_trials_table", "report", "run_report"]

_LOGGER = logging.getLogger("sassha_tune")

# (row key, column header) of the metric columns of the best-trials table.
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


def _best_trials_rows(study: optuna.Study, n: int, rows: Sequence[TrialRecord]) -> tuple[list[str], list[list[str]]]:
    ranked = ranked_rows(search_rows(rows))[:n]
    param_names = sorted({p for r in ranked for p in r.params})
    marks = []  # the last columns: (header, the trials it marks, the mark)
    if len(study.directions) > 1:
        marks.append(("pareto", pareto_numbers(rows), "*"))
    # The column appears only when a shown trial is near chance: a best-10 of an older study (no
    # num_classes) or of a healthy one looks as before.
    chance = {r.number for r in ranked if r.near_chance}
    if chance:
        marks.append(("near_chance", chance, "yes"))
    headers = ["trial", *param_names, *(h for _, h in _METRIC_COLUMNS), *(h for h, _, _ in marks)]
    table = [[*_trial_cells(r, param_names), *(mark if r.number in marked else "" for _, marked, mark in marks)]
             for r in ranked]
    return headers, table


def _trial_cells(r: TrialRecord, param_names: Sequence[str]) -> list[str]:
    """A trial's number, searched parameters and :data:`_METRIC_COLUMNS`, as table cells."""
    return [str(r.number), *(format_value(r.params.get(p)) for p in param_names),
            *(format_value(r.val_acc if key == "val_acc" else r.metric(key)) for key, _ in _METRIC_COLUMNS)]


# Left out first when the terminal table is too wide (every column stays in report.md).
_DROP_ORDER = ("seconds", "sam_sharp", "trace", "adapt_sharp", "test_acc")


def best_trials_table(study: optuna.Study, n: int = 10, tablefmt: str = "simple", width: int | None = None,
                      rows: Sequence[TrialRecord] | None = None) -> str:
    """The ``n`` best complete trials (selected on validation accuracy) as a tabulate table.

    Columns: trial number, every searched parameter, then val_acc, test_acc, gen_gap, lambda_max,
    trace, sam_sharp, adapt_sharp, seconds (and ``pareto`` for a two-objective study, and
    ``near_chance`` = ``yes`` on the trials :func:`~sassha_tune.report.health.near_chance` when one
    of the shown trials is). ``tablefmt="simple"`` (the terminal's) fits ``width`` columns (the
    terminal's by default): seconds, sam_sharp, trace, adapt_sharp, test_acc are left out in that
    order until it does, and a last line says so. ``rows``: the study's rows, when already read.
    """
    headers, table = _best_trials_rows(study, n, load_rows(study) if rows is None else rows)
    if not table:
        return f"study '{study.study_name}' has no complete trials yet"
    if tablefmt == "simple":
        return terminal_table(headers, table, width=width, drop_order=_DROP_ORDER)
    if tablefmt == "github":
        return markdown_table(headers, table).rstrip("\n")
    return tabulate(table, headers=headers, tablefmt=tablefmt, disable_numparse=True)


def _state_counts(rows: Sequence[TrialRecord]) -> str:
    counts = Counter(r.state for r in rows)
    return ", ".join(f"{counts.get(s, 0)} {s.lower()}" for s in ("COMPLETE", "PRUNED", "FAIL"))


def _failure_counts(rows: Sequence[TrialRecord]) -> Counter[str]:
    return Counter(str(r.user_attrs.get(FAILURE_REASON, "unknown")) for r in rows if r.state == "FAIL")


def _health_lines(rows: Sequence[TrialRecord]) -> list[str]:
    """The "Budget health" section of report.md: where the search trials went, with counts."""
    if not rows:
        return []
    health = budget_health(rows)
    table = [["complete", str(health["complete"])]]
    chance = near_chance_count(health)
    if chance is not None:
        table.append([f"near chance (of complete; {NEAR_CHANCE_RULE})", chance])
    table.append(["pruned", str(health["pruned"])])
    if health["pruned_near_chance"]:
        table.append(["pruned: near chance (the chance guard)", str(health["pruned_near_chance"])])
    if health["pruned_diverged"]:
        table.append(["pruned: diverged (told the sampler as pruned)", str(health["pruned_diverged"])])
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
    out.append(markdown_table(["trials", "count"], table, colalign=("left", "right")))
    return out


def _spent_lines(summary: dict[str, Any]) -> list[str]:
    """The "Where the training went" section of report.md: run-equivalents by how trials ended."""
    spent = summary.get("training_spent")
    if not spent or not spent["total_run_eq"]:
        return []
    total = spent["total_run_eq"]
    table = [[kind.replace("_", " "), str(v["trials"]), f"{v['run_eq']:.2f}", f"{v['run_eq'] / total:.0%}"]
             for kind, v in spent["by_outcome"].items() if v["trials"]]
    text = (f"The search trained **{total:.2f} run-equivalents** (the epochs every trial trained, a pruned or "
            f"failed one what it trained, over the {spent['epochs']} epochs of one run)")
    found = spent.get("best_found_at_run_eq")
    text += (f"; the configuration selected now was found after {found:.2f} of them." if found is not None
             else "; no trial has completed yet.")
    out = ["## Where the training went\n", text + "\n"]
    out.append(markdown_table(["ended", "trials", "run-equivalents", "share"], table,
                              colalign=("left", "right", "right", "right")))
    return out


_FIGURE_CAPTIONS = {
    "gap_vs_lambda_max": "Generalization gap vs lambda_max, one point per trained trial, colour = "
    "validation accuracy. A positive gap is overfitting. A rising trend says sharper "
    "minima generalize worse in this study; how strong it is, and over how many trials, is in the "
    "section above.",
    "gap_vs_adaptive_sharpness": "Generalization gap vs adaptive (scale-invariant) sharpness.",
    "pareto": "Validation accuracy vs lambda_max; the orange line is the Pareto front of the trained trials "
    "(no other trained trial is both more accurate and flatter).",
    "learning_curves": "Per-epoch accuracy and loss of the best trained trials (solid: validation, dashed: "
    "training, the running average of the epoch's batches).",
    "params_vs_lambda_max": "Each searched parameter against the final lambda_max: "
    "which settings lead to sharp or flat minima.",
    "parallel_coordinates": "One line per trained trial through its parameters (scaled to their range, "
    "log where searched on a log scale), its lambda_max and its validation accuracy (colour).",
    "history": "Validation accuracy per trial and the best so far; failed (x) and pruned (|) "
    "trials are marked on the bottom edge.",
    "best_vs_training": "What the search cost: the best complete trial's validation accuracy so far against "
    "the training spent (run-equivalents: the epochs every trial trained, over the epochs of one run), each "
    "trial at the point it ended, drawn by how it ended (a pruned or diverged one at its last epoch's accuracy).",
    "importances": "fANOVA importance of each parameter for validation accuracy (needs several "
    "complete trials to mean anything).",
}


# Appended to the captions when the study's trials store num_classes (near chance is known).
_CHANCE_NOTES = {
    "gap_vs_lambda_max": " Near-chance trials are the red x: untrained networks are trivially flat, so "
    "they are left out of every statistic.",
    "gap_vs_adaptive_sharpness": " Red x: near chance.",
    "pareto": " Near-chance trials (red x) are never on it.",
    "params_vs_lambda_max": " Red x: near chance.",
}


def _report_markdown(study: optuna.Study, storage: str | None, figure_paths: dict[str, Path],
                     reruns: tuple[list[str], list[list[str]]], summary: dict[str, Any],
                     rows: list[TrialRecord], running: int) -> str:
    search = search_rows(rows)
    out = _heading_lines(study, rows, running)
    out += _health_lines(search)
    out += _spent_lines(summary)
    ranked = ranked_rows(search)
    if not ranked:
        out.append("**No finished trials with results yet** - nothing to report. "
                   "Run the study (or wait for running trials) and report again.\n")
    else:
        out += _best_lines(ranked[0], summary)
        out.append("## Best trials\n")
        out.append(best_trials_table(study, n=10, tablefmt="github", rows=rows) + "\n")
        out += _figure_lines(figure_paths, summary)
    if reruns[1]:
        out.append("## Best config re-run over seeds\n")
        out.append(markdown_table(*reruns))
    out += _config_lines(study)
    out += provenance_section(study, rows, storage)
    return "\n".join(out)


def _heading_lines(study: optuna.Study, rows: Sequence[TrialRecord], running: int) -> list[str]:
    """The title of report.md and what the study is: optimizer, objectives, trials by state."""
    optimizer = study.user_attrs.get("optimizer", "unknown")
    objectives = study.user_attrs.get("objectives")
    if isinstance(objectives, list) and objectives:
        directions = ", ".join(str(o) for o in objectives)
    else:
        directions = ", ".join(d.name.lower() for d in study.directions)
    out = [f"# Study report: {md_text(study.study_name)}\n"]
    out.append(f"- optimizer: {md_code(optimizer)}")
    out.append(f"- objectives: {md_text(directions)}; the best trial is selected on val_acc"
               + (", the Pareto front is val_acc up / lambda_max down" if len(study.directions) > 1 else ""))
    out.append(f"- trials: {_state_counts(rows)}, {running} running or waiting (ignored)")
    failures = _failure_counts(rows)
    if failures:
        out.append("- failure reasons: " + ", ".join(f"{md_text(k)}: {v}" for k, v in sorted(failures.items())))
    rerun_rows = [r for r in rows if r.is_rerun]
    if rerun_rows:
        out.append(f"- seed re-runs (not part of the search, left out of plots): {len(rerun_rows)}")
    out.append("")
    return out


def _best_lines(best: TrialRecord, summary: dict[str, Any]) -> list[str]:
    """The best trial, its config and the sharpness-generalization verdict."""
    out = ["## Best trial (selected on validation accuracy)\n"]
    out.append(f"Trial {best.number}: val_acc {format_value(best.val_acc)}, test_acc "
               f"{format_value(best.metric('test_acc'))} (test reported once, for this trial only), "
               f"gen_gap {format_value(best.metric('gen_gap_acc'))}, "
               f"lambda_max {format_value(best.metric('lambda_max'))}.\n")
    out.append(fenced(yaml.safe_dump(dict(best.params), sort_keys=True), "yaml"))
    out += correlation_lines(summary)
    return out


def _figure_lines(figure_paths: dict[str, Path], summary: dict[str, Any]) -> list[str]:
    """The figures of report.md, each with its caption."""
    out = ["## Figures\n"]
    for key, path in figure_paths.items():
        caption = _FIGURE_CAPTIONS.get(key)
        if caption is not None and summary["counts"]["near_chance"] is not None:
            caption += _CHANCE_NOTES.get(key, "")
        if caption is None and key.startswith("slice_"):
            caption = f"Validation accuracy vs `{key[6:]}` (sensitivity; darker = later trial)."
        out.append(figure_entry(key, caption or "", path))
    return out


def _config_lines(study: optuna.Study) -> list[str]:
    """The study's stored config and search space."""
    out = ["## Config\n"]
    config = study.user_attrs.get("config")
    out.append(yaml_block(config) if config else "No config stored in the study.\n")
    space = study.user_attrs.get("search_space")
    if space:
        out.append("## Search space\n")
        out.append(yaml_block(space))
    return out


def run_report(study_name: str, storage: str | optuna.storages.BaseStorage, out_dir: Path, *,
               echo: Callable[[str], None] = print) -> Written:
    """Print the best-trials table and the verdict (through ``echo``); write PNG plots, ``report.md``,
    ``summary.json`` (:func:`~sassha_tune.report.summary.study_summary`) and the interactive
    ``report.html`` to ``out_dir``; return what was written (:class:`~.files.Written`).

    Reads the storage only. A missing study raises :class:`~sassha_tune.errors.StorageError`
    listing the available names; a study without finished trials prints a message and writes a
    ``report.md`` saying so.
    """
    backend, names_in_storage, [(study, rows, running)] = read_studies([study_name], storage)
    reruns = rerun_table([study], backend, names_in_storage, rows=[rows])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = study_summary(study, rows)
    importances = param_importances(study)
    figures = build_figures(study, rows, importances)
    paths = save_figures(figures, out_dir)
    text = _report_markdown(study, storage if isinstance(storage, str) else None, paths, reruns, summary,
                            rows, running)
    write_text(out_dir / "report.md", text)
    write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    tables = {"Best trials": _best_trials_rows(study, 10, rows), "Best config re-run over seeds": reruns}
    html = write_html(study, out_dir / "report.html", summary, tables, rows=rows, importances=importances)
    written = Written(out_dir, [out_dir / "report.md", out_dir / "summary.json", html, *paths.values()], text, summary,
                      tables)
    chance = near_chance_count(budget_health(search_rows(rows)))
    echo(f"study {printable(study.study_name)} ({printable(study.user_attrs.get('optimizer', 'unknown'))}): "
         f"{_state_counts(rows)}"
         + (f"; near chance (of complete search trials): {chance}" if chance is not None else ""))
    if not figures:
        echo(f"study '{printable(study.study_name)}' has no finished trials with results yet; "
             f"wrote {out_dir / 'report.md'}")
        return written
    echo(best_trials_table(study, rows=rows))
    for line in terminal_lines(summary):
        echo(line)
    echo(f"wrote {out_dir / 'report.md'}, summary.json, {html.name} and {len(paths)} plots to {out_dir}")
    return written


def report(study: str, *, storage: str | None = None, out: str | Path = "report",
           log: Callable[[str], None] | None = None) -> Written:
    """``sassha-tune report`` from Python (also ``sassha_tune.report(...)``): write the report of
    ``study`` to ``out`` and return what was written (:class:`~.files.Written`: the summary, the
    tables, the markdown, the files; in Jupyter it shows as the report). ``storage``: as for
    ``run_study`` (default ``$SASSHA_TUNE_STORAGE``, else ``sqlite:///sassha-tune.db``);
    ``log``: where the terminal lines go (default: the ``sassha_tune`` logger at INFO level)."""
    from sassha_tune.study.storage import resolve_storage

    return run_report(study, resolve_storage(storage), Path(out), echo=log or _LOGGER.info)
