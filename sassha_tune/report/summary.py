"""The numbers of a one-study report for machines (``summary.json``) and the section of
``report.md`` that answers "does flatness predict generalization here?" from them.

One function computes them (:func:`study_summary`); the markdown section, the terminal lines and
``report.html`` all print from its result, so they cannot disagree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import optuna

from sassha_tune.study.records import TrialRecord

from ..study.budget import spent_by_outcome
from .correlation import (
    BOOT_SEED,
    CONTROL,
    LEVEL,
    MIN_TRIALS,
    N_BOOT,
    TARGETS,
    correlation_entries,
    find,
    verdict,
)
from .curves import study_epochs, training_curve
from .health import NEAR_CHANCE_RULE, budget_health, pareto_numbers, trained_rows
from .markdown import markdown_table
from .rows import complete_rows, load_rows, optimizer_name, ranked_rows, search_rows

__all__ = ["correlation_lines", "correlation_table", "study_summary"]

_BEST_KEYS = ("val_acc", "test_acc", "gen_gap_acc", "lambda_max", "hessian_trace", "sam_sharpness",
              "adaptive_sharpness")


def _number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def study_summary(study: optuna.Study, rows: Sequence[TrialRecord] | None = None) -> dict[str, Any]:
    """``summary.json``: counts (trained, near chance, failed, pruned, ...), the best trial,
    the correlations over the trained trials (and, for contrast, over all complete trials), the
    Pareto front's trial numbers and the verdict. ``rows``: the study's rows, when already read."""
    rows = search_rows(load_rows(study) if rows is None else rows)
    health = budget_health(rows)
    trained = trained_rows(rows)
    complete = complete_rows(rows)
    ranked = ranked_rows(rows)
    best = ranked[0] if ranked else None
    excluded = health["near_chance"]
    entries = correlation_entries(trained)
    complete_entries = correlation_entries(complete, over="complete", methods=("spearman",))
    return {
        "study": study.study_name,
        "optimizer": optimizer_name(study),
        "objectives": study.user_attrs.get("objectives") or [d.name.lower() for d in study.directions],
        "counts": {
            "trials": len(rows),
            "complete": health["complete"],
            "trained": len(trained),
            # None when no complete trial stores num_classes (an older study): unknown, not zero
            "near_chance": excluded if health["near_chance_known"] else None,
            "near_chance_unknown": health["complete"] - health["near_chance_known"],
            "failed": health["failed"],
            "pruned": health["pruned"],
            "pruned_near_chance": health["pruned_near_chance"],
            "failures": health["failures"],
        },
        "near_chance_rule": NEAR_CHANCE_RULE,
        "best_trial": None if best is None else {
            "number": best.number,
            **{k: _number(best.val_acc if k == "val_acc" else best.metric(k)) for k in _BEST_KEYS},
        },
        "bootstrap": {"resamples": N_BOOT, "seed": BOOT_SEED, "level": LEVEL, "method": "percentile"},
        "correlations": entries,
        "correlations_all_complete": complete_entries,
        "pareto": sorted(pareto_numbers(rows)),
        "verdict": verdict(entries, complete_entries, excluded),
        "training_spent": training_spent(study, rows),
    }


def training_spent(study: optuna.Study, rows: Sequence[TrialRecord]) -> dict[str, Any]:
    """What the search cost: run-equivalents in all and by how trials ended
    (:func:`~sassha_tune.study.budget.spent_by_outcome`), the epochs of one run, and the
    run-equivalents spent when the best complete trial so far ended (None before one completes)."""
    epochs = study_epochs(study)
    by_outcome = spent_by_outcome(rows, epochs)
    curve = training_curve(rows, epochs)
    final = curve["best"][-1] if curve["best"] else math.nan
    found = next((c for c, b in zip(curve["cost"], curve["best"], strict=True) if b == final), None)
    return {"epochs": epochs, "total_run_eq": sum(v["run_eq"] for v in by_outcome.values()),
            "by_outcome": by_outcome, "best_found_at_run_eq": None if math.isnan(final) else found}


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None or entry["value"] is None:
        return "-"
    ci = entry["ci"]
    return f"{entry['value']:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else f"{entry['value']:+.2f}"


def correlation_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per (sharpness measure, target): Spearman, Kendall and the partial Spearman given
    the training loss, each with its interval, and n."""
    entries = summary["correlations"]
    headers = ["sharpness", "vs", "spearman [CI]", "kendall [CI]", f"partial given {CONTROL} [CI]", "n"]
    pairs = dict.fromkeys((e["x"], e["y"]) for e in entries)
    table = []
    for x, y in pairs:
        spear = find(entries, x, y, "spearman")
        table.append([x, y, _cell(spear), _cell(find(entries, x, y, "kendall")),
                      _cell(find(entries, x, y, "partial_spearman")), str(spear["n"] if spear else 0)])
    return headers, table


def _counts_sentence(summary: dict[str, Any]) -> str:
    c = summary["counts"]
    if c["near_chance"] is None:  # an older study: nothing is said about chance
        return (f"Computed over the **{c['trained']} complete trials** of {c['trials']} search trials; left out: "
                f"{c['failed']} failed, {c['pruned']} pruned. The trials store no `num_classes`, so untrained "
                "networks (trivially flat) cannot be told apart and are included.")
    text = (f"Computed over the **{c['trained']} trials that trained** (complete and not near chance) of "
            f"{c['trials']} search trials; left out: {c['near_chance']} near chance ({NEAR_CHANCE_RULE}), "
            f"{c['failed']} failed, {c['pruned']} pruned")
    if c["near_chance_unknown"]:
        text += f"; {c['near_chance_unknown']} complete trials store no `num_classes` and are kept (unknown)"
    return text + "."


def correlation_lines(summary: dict[str, Any]) -> list[str]:
    """The ``## Does flatness predict generalization here?`` section of report.md."""
    out = ["## Does flatness predict generalization here?\n"]
    out.append(_counts_sentence(summary) + "\n")
    out.append(f"**Verdict.** {summary['verdict']}\n")
    out.append(
        f"Rank correlations of each sharpness measure with the generalization gap (`gen_gap_acc`, + = "
        f"overfitting) and with validation and test accuracy ({', '.join(TARGETS)}). Brackets: "
        f"{LEVEL:.0%} percentile bootstrap interval over trials ({N_BOOT} resamples, seed {BOOT_SEED}); a value "
        "without brackets has none (over half the resamples were degenerate); "
        f"`partial given {CONTROL}`: Spearman's rho once the training loss is accounted for (the control for "
        f"\"flat because barely trained\"). `-`: fewer than {MIN_TRIALS} trials with both values, or a "
        "constant one. For the hypothesis \"flatter generalizes better\", rho with the gap should be "
        "positive and rho with the accuracies negative.\n")
    out.append(markdown_table(*correlation_table(summary)))
    contrast = [e for e in summary["correlations_all_complete"] if e["value"] is not None
                and e["y"] == "gen_gap_acc"]
    if summary["counts"]["near_chance"] and contrast:
        cells = ", ".join(f"{e['x']} {_cell(e)} (n = {e['n']})" for e in contrast)
        out.append(f"For contrast only, the same Spearman correlations with the gap over all complete trials, "
                   f"near-chance ones included: {cells}.\n")
    return out


def terminal_lines(summary: dict[str, Any]) -> Sequence[str]:
    """The short form printed by ``report``: counts, the main correlation and the verdict."""
    c = summary["counts"]
    chance = "" if c["near_chance"] is None else f"{c['near_chance']} near chance, "
    lines = [f"trained trials: {c['trained']} (left out: {chance}{c['failed']} failed, "
             f"{c['pruned']} pruned); Pareto front: {summary['pareto'] or 'none'}"]
    lines.append("verdict: " + summary["verdict"])
    return lines
