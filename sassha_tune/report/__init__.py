"""Reports: tables, plots and markdown built from a study's storage (read only).

Two entry points back the CLI verbs (and, returning what they wrote, the Python functions
:func:`report` and :func:`compare`; the package itself is callable as ``report``, so that
``sassha_tune.report("study")`` works though ``sassha_tune.report`` names this package):

* :func:`run_report` -- one study: terminal table of the best trials, PNG plots
  (generalization gap vs sharpness, Pareto front, history, importances, slices) and ``report.md``.
* :func:`run_compare` -- several studies (typically one per optimizer, same budget): best
  validation accuracy vs number of trials and vs train-seconds with bootstrap bands, final
  sharpness per optimizer, a ranking table, seed re-runs of the best configs and ``compare.md``.

One module per concept:

* :mod:`.rows` -- read-only storage access and the finished trials as rows;
* :mod:`.health` -- near chance, failure kinds and their counts (also used by ``status``);
* :mod:`.reruns` -- seed re-runs and their table;
* :mod:`.figures` -- the one-study figures and saving figures;
* :mod:`.markdown` -- tables, YAML blocks and provenance, passwords masked;
* :mod:`.curves` -- best-so-far budget curves and their bootstrap over trial orders;
* :mod:`.study_report` -- the one-study report (:func:`best_trials_table`, :func:`run_report`);
* :mod:`.compare` -- the comparison (:func:`compare_figures`, :func:`run_compare`).

Everything here only reads the storage: it is opened and studies are loaded with
:func:`sassha_tune.study.storage.open_storage` (``create=False``) and :func:`sassha_tune.study.storage.load_study`
(in :mod:`.rows`, the only module that touches them), no attribute is ever set, RUNNING/WAITING
trials are ignored. Figures are built on :class:`matplotlib.figure.Figure` directly (Agg canvas,
no pyplot global state), so the pure functions :func:`build_figures` and :func:`compare_figures`
can be inspected by tests.

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

import sys
import types
from typing import Any

from .compare import compare, compare_figures, run_compare
from .curves import BOOTSTRAP_SEED, N_BOOTSTRAP
from .figures import SLICE_PARAMS, build_figures
from .files import Written
from .health import (
    NEAR_CHANCE_RULE,
    budget_health,
    failure_kind,
    near_chance,
    near_chance_count,
    near_chance_threshold,
)
from .rows import SEED_RERUN_ATTR, SEED_STUDY_SUFFIX, load_rows
from .study_report import best_trials_table, report, run_report

__all__ = [
    "Written",
    "compare",
    "report",
    "BOOTSTRAP_SEED",
    "NEAR_CHANCE_RULE",
    "N_BOOTSTRAP",
    "SEED_RERUN_ATTR",
    "SEED_STUDY_SUFFIX",
    "SLICE_PARAMS",
    "best_trials_table",
    "budget_health",
    "build_figures",
    "compare_figures",
    "failure_kind",
    "load_rows",
    "near_chance",
    "near_chance_count",
    "near_chance_threshold",
    "run_compare",
    "run_report",
]


class _CallablePackage(types.ModuleType):
    """``sassha_tune.report`` is this package and, called, :func:`.study_report.report`: the
    package's name is also the top-level function's (``sassha_tune.report("quickstart")``)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Written:
        return report(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
