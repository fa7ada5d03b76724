"""sassha-tune: tune the SASSHA optimizer (and compare it with its peers) with Optuna studies.

The public API, importable from the package itself::

    from sassha_tune import Sassha, SasshaLM, SGD, AdamW, SAMSGD, SAMAdamW, AdaHessian, SophiaH, MSassha
    from sassha_tune import build_optimizer, frozen_running_stats, linear_weight_groups
    from sassha_tune import run_study, resume_study, rerun_study, load_config, config_from_dict
    from sassha_tune import TrialReporter, TrialPruned   # for a task.train function of your own
    from sassha_tune import build_model, load_dataset    # a kept model's architecture and data (docs/workflow.md)
    from sassha_tune import report, compare, export, trials_dataframe   # in a notebook: objects and files

``sassha_tune.report(study, out=...)`` (the package ``sassha_tune.report``, callable) and
``sassha_tune.compare([...])`` write what the commands write and return it
(``report.files.Written``: summary, tables, markdown; Jupyter shows the markdown);
``sassha_tune.export(study)`` returns the exported config as a dict.

The names are loaded on first use (PEP 562), so importing one part of the package (the CLI, a
single optimizer) does not import the others; ``import sassha_tune`` alone imports no torch.
Importing sassha-tune changes no logging configuration.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .version import __version__

# public name -> the module that defines it
_PUBLIC = {
    **{name: "sassha_tune.optim" for name in (
        "Sassha", "SasshaLM", "MSassha", "SGD", "AdamW", "SAMSGD", "SAMAdamW", "AdaHessian", "SophiaH",
        "build_optimizer", "frozen_running_stats", "linear_weight_groups", "OPTIMIZERS",
    )},
    **{name: "sassha_tune.config" for name in ("load_config", "config_from_dict", "Config")},
    "build_model": "sassha_tune.training.models",
    "load_dataset": "sassha_tune.training.data",
    "TrialReporter": "sassha_tune.trial.user_train",
    "TrialPruned": "sassha_tune.trial.user_train",
    "run_study": "sassha_tune.app.api",
    "resume_study": "sassha_tune.app.api",
    "rerun_study": "sassha_tune.app.api",
    "export": "sassha_tune.app.results",
    "trials_dataframe": "sassha_tune.app.results",
    "compare": "sassha_tune.report.compare",
    "UserError": "sassha_tune.errors",
}

__all__ = ["__version__", "report", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name == "report":  # the package sassha_tune.report, callable as the function report(...)
        return import_module("sassha_tune.report")
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value  # the next access is a plain attribute
        return value
    raise AttributeError(f"module 'sassha_tune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
