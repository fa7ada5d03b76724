"""``sassha-tune init`` as a Python function: a starter config (and with ``own_loop`` a training
module) written where the user said, validated first, never over a file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from .base import Log, default_log

__all__ = ["init_config"]


def init_config(out: str | Path = "study.yaml", *, dataset: str | None = None, model: str | None = None,
                optimizer: str = "sassha", own_loop: bool = False, data_dir: str | None = None,
                log: Log | None = None) -> list[Path]:
    """Write a starter config to ``out`` (``sassha-tune init``): a built-in ``dataset`` and ``model``
    (defaults: MNIST-1D and a model that fits the dataset) or, with ``own_loop``, your own training
    function in a module written beside it (``<name>_train.py``); the study is named after the
    file. The config is validated before anything is written and runs as it is; an existing file
    is never overwritten (a :class:`UserError`, nothing written). Returns the files written."""
    from ..config.starter import default_model, module_name, starter_config

    log = log or default_log
    path = Path(out)
    dataset = _starter_dataset(path, dataset, model, own_loop, data_dir)
    module = path.parent / f"{module_name(path.stem)}.py" if own_loop else None
    _check_targets(path, [path] + ([module] if module is not None else []))
    if module is not None:
        text = starter_config(name=path.stem, config=str(path), optimizer=optimizer, train=f"{module.stem}:train")
    else:
        text = starter_config(name=path.stem, config=str(path), optimizer=optimizer, dataset=dataset,
                              model=model or default_model(str(dataset)), data_dir=data_dir)
    written = _write_starter(path, text, module, optimizer)
    for done in written:
        log(f"wrote {done}")
    return written


def _starter_dataset(path: Path, dataset: str | None, model: str | None, own_loop: bool,
                     data_dir: str | None) -> str | None:
    """``init_config``'s arguments checked (before any file is looked at): the built-in dataset the
    starter config uses (None with ``own_loop``)."""
    from ..config.starter import DEFAULT_DATASET, FILE_DATASETS

    if path.suffix not in (".yaml", ".yml"):
        raise UserError(f"--out {path}: expected a .yaml file name (the study is named after it)")
    if own_loop and (dataset is not None or model is not None or data_dir is not None):
        raise UserError("--own-loop: your training function brings its own data and model; "
                        "not with --dataset, --model or --data-dir")
    dataset = None if own_loop else dataset or DEFAULT_DATASET
    if dataset in FILE_DATASETS and data_dir is None:
        raise UserError(f"--dataset {dataset}: reads files (nothing is downloaded): give --data-dir DIR, where they are")
    return dataset


def _check_targets(path: Path, targets: list[Path]) -> None:
    """The files ``init`` would write: none a link, none there already, each in a directory."""
    from .outputs import check_output

    for target in targets:  # path first; the module beside it is in the same directory
        check_output(target, "--out")
        if target.exists():
            raise UserError(f"--out {path}: {target} exists; init never overwrites a file (choose another --out, "
                            "or remove it)")


def _write_starter(path: Path, text: str, module: Path | None, optimizer: str) -> list[Path]:
    """The starter config ``text`` written to ``path`` once it validates (and first the own-loop
    ``module`` it names); on any failure nothing is left behind. Returns the files written."""
    from ..config import config_from_dict, yaml_load
    from ..config.starter import starter_train_module
    from .outputs import write_output

    written: list[Path] = []
    try:
        if module is not None:  # first: the config names it, and validation imports it
            write_output(module, starter_train_module(optimizer), "--out")
            written.append(module)
        with _importable(path.parent):
            config_from_dict(yaml_load(text, "sassha-tune init"), source="sassha-tune init", name_from=str(path),
                             base_dir=path.resolve().parent)
        write_output(path, text, "--out")
        written.append(path)
    except BaseException:
        for done in written:
            done.unlink(missing_ok=True)
        raise
    return written


@contextmanager
def _importable(folder: Path) -> Iterator[None]:
    """``folder`` on ``sys.path`` for the block (an own-loop module written there, checked by
    importing it as a run does with ``PYTHONPATH=.``)."""
    import sys

    entry = str(folder.resolve())
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        if entry in sys.path:
            sys.path.remove(entry)
