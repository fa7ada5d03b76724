"""A study's results from Python and for the CLI: ``export`` (the best trial's config, its
optimizer's arguments or its kept model), ``write_report`` and ``write_comparison`` (``report`` and
``compare``: the files written) and ``trials_dataframe``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .base import Log, one_line_storage_faults

if TYPE_CHECKING:
    import optuna

    from ..report.files import Written

__all__ = ["export", "export_text", "trials_dataframe", "write_comparison", "write_report"]


@one_line_storage_faults
def export(study: str, *, storage: str | None = None, trial: int | None = None, format: str = "yaml",
           out: str | Path | None = None, model: bool = False) -> dict[str, Any] | Path:
    """``sassha-tune export`` from Python (``sassha_tune.export(...)``): the study's config with
    trial ``trial``'s (default: the best) parameters fixed, as a dict (``format="kwargs"``: the
    optimizer's class and constructor arguments), also written to ``out`` as YAML or JSON when
    given; ``model=True``: the trial's kept model file (``study.keep_models``) written to ``out``,
    whose path is returned."""
    from ..study.storage import load_study, resolve_storage
    from ..study.views import export_config, export_kwargs
    from .outputs import check_output, write_output

    if format not in ("yaml", "json", "kwargs"):
        raise UserError(f"format: expected yaml, json or kwargs, got {format!r}")
    url = resolve_storage(storage)
    if model:
        from ..study.models import export_model

        if out is None:
            raise UserError("model: give out=FILE (a model file is binary)")
        path = Path(out)
        check_output(path, "out")
        export_model(load_study(study, url), url, path, trial)
        return path
    s = load_study(study, url)
    d = export_kwargs(s, trial) if format == "kwargs" else export_config(s, trial)
    if out is not None:
        write_output(Path(out), export_text(d, format), "out")
    return d


def export_text(d: dict[str, Any], format: str) -> str:
    """An exported dict as the text ``export`` writes: YAML, or JSON for ``json`` and ``kwargs``."""
    import json

    import yaml

    return yaml.safe_dump(d, sort_keys=False) if format == "yaml" else json.dumps(d, indent=2) + "\n"


def write_report(study: str, *, storage: str | None = None, out: str | Path = "report",
                 echo: Log = print) -> Written:
    """``sassha-tune report``: the report of one study written to ``out``, its best trials and
    verdict through ``echo`` (:func:`~sassha_tune.report.study_report.run_report`)."""
    from ..report.study_report import run_report
    from ..study.storage import resolve_storage

    return run_report(study, resolve_storage(storage), Path(out), echo=echo)


def write_comparison(studies: Sequence[str], *, storage: str | None = None, out: str | Path = "compare") -> Written:
    """``sassha-tune compare``: studies compared under equal budgets, written to ``out``, the
    ranking printed (:func:`~sassha_tune.report.compare.run_compare`)."""
    from ..report.compare import run_compare
    from ..study.storage import resolve_storage

    return run_compare(list(studies), resolve_storage(storage), Path(out))


def trials_dataframe(study: str | optuna.Study, *, storage: str | None = None) -> Any:
    """``study.trials_dataframe()`` (a pandas DataFrame, one row per trial: parameters, values and
    every stored metric as ``user_attrs_*`` columns) of a study or a study's name; without pandas
    a one-line :class:`UserError` saying how to install it (``pip install -e ".[pandas]"``)."""
    try:
        import pandas  # noqa: F401
    except ImportError:
        raise UserError('trials_dataframe: needs pandas, which is not installed: pip install pandas '
                        '(or pip install -e ".[pandas]" in a checkout)') from None
    if isinstance(study, str):
        from ..study.storage import load_study, resolve_storage

        study = load_study(study, resolve_storage(storage))
    return study.trials_dataframe()
