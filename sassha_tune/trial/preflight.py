"""The checks that need the data: run once, before a study is created or a trial is asked.

Validation (:mod:`sassha_tune.config.validate`) checks what a config says; some mistakes only show
when the data are there: options of the wrong type that the dataset loader or the model builder
refuses, a plug-in dataset returning inputs and labels of different lengths or labels out of range,
a ``val_fraction`` that leaves an empty validation split. :func:`check_task` loads the dataset on the
CPU once (a plug-in's factory is called: its code runs), checks the splits, builds the model and runs
it on two examples. Each failure is a one-line :class:`~sassha_tune.errors.ConfigError` naming the
config key, so a mistake costs no study and no budget slot.
"""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..errors import ConfigError, UserError

__all__ = ["check_task"]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (f"{type(exc).__name__}: {text}" if not isinstance(exc, UserError) else text)[:200]


def _splits_error(splits: Any) -> str | None:
    """What is wrong with a dataset's splits (None: nothing)."""
    import torch

    for part in ("train", "val", "test"):
        x, y = getattr(splits, f"x_{part}", None), getattr(splits, f"y_{part}", None)
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            return f"its {part} split is not a pair of tensors"
        if len(x) != len(y):
            return f"its {part} split has {len(x)} inputs but {len(y)} labels"
        if len(y) == 0:
            return f"its {part} split is empty"
        if y.dim() and not y.is_floating_point() and splits.tokens_train is None:
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= splits.num_classes:
                return f"its {part} labels lie in {lo}..{hi}, not 0..{splits.num_classes - 1}"
    return None


def _built_model(cfg: Config, input_shape: tuple, num_classes: int) -> Any:
    """``cfg``'s model for these inputs; a failure is a :class:`ConfigError` naming its options."""
    from ..training.models import build_model

    task = cfg.task
    try:
        return build_model(task.model, input_shape, num_classes, **task.model_options)
    except Exception as exc:
        where = "task.model" if not task.model_options else "task.model_options"
        raise ConfigError(f"{cfg.source}: {where}: model {task.model!r} could not be built: {_one_line(exc)}") from None


def check_task(cfg: Config) -> bool | None:
    """Load ``cfg``'s dataset on the CPU, check its splits, build its model and run it on two
    examples; a failure is a :class:`ConfigError` naming the key to fix. Returns whether the model
    has normalization layers (None when no model was built: ``task.train``, language models)."""
    import torch

    from ..plugins import is_plugin
    from ..training.data import VOCABULARY, load_dataset

    task, src = cfg.task, cfg.source
    if task.train is not None:
        return None  # the user's function brings its own data and model (imported at validation)
    if task.dataset == "text":  # its files were checked (check_dataset_files); windows are cut per batch
        if not is_plugin(task.model):  # a built-in model, built without memory, for windows of any length
            with torch.device("meta"):
                _built_model(cfg, (1,), VOCABULARY)
        return None
    key = "task.dataset_options.factory" if task.dataset == "custom" else "task.dataset_options"
    try:
        splits = load_dataset(task.dataset, task.data_dir, val_fraction=task.val_fraction,
                              label_noise=task.label_noise, seed=cfg.seed, device="cpu",
                              options=task.dataset_options)
    except (ConfigError, MemoryError):
        raise
    except Exception as exc:
        raise ConfigError(f"{src}: {key}: dataset {task.dataset!r} could not be loaded: {_one_line(exc)}") from None
    if splits.tokens_train is None and len(splits.y_val) == 0 and len(splits.y_train) > 0:
        raise ConfigError(
            f"{src}: task.val_fraction: expected a fraction that leaves at least one validation example, "
            f"got {task.val_fraction} of {len(splits.y_train)} training examples"
        )
    if (why := _splits_error(splits)) is not None:
        raise ConfigError(f"{src}: {key}: dataset {task.dataset!r} is unusable: {why}")
    model = _built_model(cfg, splits.input_shape, splits.num_classes)
    try:
        with torch.no_grad():
            model.eval()
            out = model(splits.x_train[:2])
    except Exception as exc:
        raise ConfigError(f"{src}: task.model: model {task.model!r} fails on the dataset's inputs "
                          f"(shape {tuple(splits.input_shape)}): {_one_line(exc)}") from None
    if not isinstance(out, torch.Tensor) or out.shape[0] != min(2, len(splits.x_train)):
        raise ConfigError(f"{src}: task.model: model {task.model!r} must return one row of outputs per example")
    from ..training.models import has_normalization_layers

    return has_normalization_layers(model)
