"""Trained models kept by a study (``study.keep_models``), in Optuna's artifact store.

A study that keeps models asks each trial process to write its model file
(:mod:`sassha_tune.trial.saved_model`) into a temporary folder; before the trial is told, the loop
uploads it with ``optuna.artifacts.upload_artifact`` to the trial (Optuna records the artifact in
the trial's system attributes; the trial's user attribute ``model_artifact`` names it too) and
removes the temporary file. ``best`` keeps a complete trial's model when no complete trial of the
study is better by the first objective (so the study's best trial always has its model, and
about log(n) earlier bests have theirs); ``all`` keeps every complete trial's; ``none`` (the
default) none. The store is a folder (``optuna.artifacts.FileSystemArtifactStore``):
``study.artifact_dir``, or beside an SQLite database ``<database name>-artifacts``.
``export --model`` gets a kept model back (:func:`download_model`).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..config import Config
from ..errors import ConfigError, StorageError, UserError
from ..redact import mask_url
from ..trial.outcome import TrialOutcome
from .storage import study_storage, with_retry

__all__ = ["MODEL_ATTR", "artifact_dir", "check_model_store", "ModelKeeper", "kept_artifact", "download_model",
           "export_model"]

#: Trial user attribute: the id of the trial's model in the study's artifact store.
MODEL_ATTR = "model_artifact"

Log = Callable[[str], None]


def artifact_dir(storage_url: str, cfg: Config) -> Path:
    """The artifact store's folder: ``study.artifact_dir``, else ``<db>-artifacts`` beside an
    SQLite database file; any other storage needs ``study.artifact_dir`` (a one-line :class:`ConfigError`)."""
    if cfg.study.artifact_dir is not None:
        return Path(cfg.study.artifact_dir)
    from sqlalchemy.engine import make_url

    try:
        url = make_url(storage_url)
        db = url.database if url.get_backend_name() == "sqlite" else None
    except Exception:
        db = None
    if not db or db == ":memory:" or db.startswith("file:"):
        raise ConfigError(f"{cfg.source}: study.artifact_dir: expected a folder for the kept models (study.keep_models: "
                          f"{cfg.study.keep_models}): storage {mask_url(storage_url)} is not an SQLite file to keep "
                          "them beside")
    path = Path(db).expanduser()
    return path.with_name(path.stem + "-artifacts")


def check_model_store(storage_url: str, cfg: Config) -> None:
    """Before a study runs: its artifact folder can be had (a one-line error otherwise)."""
    if cfg.study.keep_models == "none":
        return
    folder = artifact_dir(storage_url, cfg)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{cfg.source}: study.artifact_dir: cannot create {folder}: {exc.strerror or exc}") from None


def _store(folder: Path) -> Any:
    from optuna.artifacts import FileSystemArtifactStore

    folder.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(base_path=str(folder))


class ModelKeeper:
    """The study loop's side of ``study.keep_models``: where a trial process writes its model
    (:meth:`path`, None when the study keeps none) and the upload before the trial is told
    (:meth:`keep`). The temporary folder goes with :meth:`close`."""

    def __init__(self, storage_url: str, log: Log) -> None:
        self.storage_url, self.log = storage_url, log
        self._tmp: Path | None = None

    def path(self, cfg: Config, number: int) -> str | None:
        if cfg.study.keep_models == "none" or cfg.task.train is not None:
            return None
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="sassha-tune-models-"))
        return str(self._tmp / f"trial-{number}.pt")

    def keep(self, study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome, cfg: Config) -> None:
        """Upload the trial's model file when ``study.keep_models`` keeps it (a complete trial;
        ``best``: none better so far), then remove the file. A store that fails (a full disk) is a
        warning line: the trial is told all the same."""
        path = self.path(cfg, trial.number)
        if path is None or not Path(path).is_file():
            return
        try:
            if outcome.state == "complete" and self._wanted(study, outcome, cfg):
                store = _store(artifact_dir(self.storage_url, cfg))
                artifact = with_retry(optuna.artifacts.upload_artifact, artifact_store=store, file_path=path,
                                      study_or_trial=trial, mimetype="application/x-pytorch")
                with_retry(trial.set_user_attr, MODEL_ATTR, artifact)
        except (OSError, UserError) as exc:
            self.log(f"warning: trial {trial.number}: its model was not kept ({exc})")
        finally:
            with contextlib.suppress(OSError):
                Path(path).unlink()

    @staticmethod
    def _wanted(study: optuna.Study, outcome: TrialOutcome, cfg: Config) -> bool:
        if cfg.study.keep_models == "all":
            return True
        if not outcome.values:
            return False
        sign = 1 if cfg.study.directions[0] == "maximize" else -1
        done = with_retry(study.get_trials, deepcopy=False, states=(TrialState.COMPLETE,))
        return all(sign * outcome.values[0] >= sign * t.values[0] for t in done if t.values)

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def kept_artifact(study: optuna.Study, trial: FrozenTrial) -> str:
    """The artifact id of ``trial``'s kept model; a one-line :class:`UserError` when it has none."""
    metas = with_retry(optuna.artifacts.get_all_artifact_meta, trial, storage=study_storage(study))
    wanted = trial.user_attrs.get(MODEL_ATTR)
    ids = [m.artifact_id for m in metas]
    if wanted in ids:
        return str(wanted)
    raise UserError(f"trial {trial.number} of {study.study_name!r} has no kept model (study.keep_models: best "
                    "keeps the trials that were the best when they finished, all keeps every complete trial; "
                    "none, the default, keeps none)")


def download_model(study: optuna.Study, trial: FrozenTrial, storage_url: str, cfg: Config, out: Path) -> None:
    """Copy ``trial``'s kept model file to ``out`` (atomically; a link there is refused by the caller)."""
    artifact = kept_artifact(study, trial)
    folder = artifact_dir(storage_url, cfg)
    if not (folder / artifact).is_file():
        raise StorageError(f"trial {trial.number} of {study.study_name!r}: its model {artifact} is not in the "
                           f"artifact store {folder} (moved or deleted?)")
    tmp = out.parent / f".{out.name}.download.tmp"
    tmp.unlink(missing_ok=True)
    try:
        optuna.artifacts.download_artifact(artifact_store=_store(folder), file_path=str(tmp), artifact_id=artifact)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def export_model(study: optuna.Study, storage_url: str, out: Path, number: int | None = None) -> FrozenTrial:
    """``export --model``: the kept model of trial ``number`` (default: the best, as ``export``
    chooses it) copied to ``out``; the trial."""
    from .create import stored_config
    from .views import best_trial

    trial = best_trial(study, number)
    if trial is None:
        raise UserError(f"study {study.study_name!r} has no complete trial yet")
    cfg, _ = stored_config(study)
    download_model(study, trial, storage_url, cfg, out)
    return trial
