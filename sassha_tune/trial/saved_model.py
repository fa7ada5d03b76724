"""A trained model as a file: its weights and everything needed to use them again.

``train --save PATH`` writes one, and so does every trial of a study that keeps its models
(``study.keep_models``; the study stores the file in its artifact store: :mod:`sassha_tune.study.models`).
The file is ``torch.save`` of a dict of plain data and tensors, so ``torch.load(path,
weights_only=True)`` reads it without running code:

* ``state_dict``: the model's weights (and buffers: BatchNorm statistics), on the CPU;
* ``model``: ``{"name", "input_shape", "num_classes", "options"}``, the arguments
  ``sassha_tune.build_model(name, input_shape, num_classes, **options)`` built it from;
* ``data``: the arguments of ``sassha_tune.load_dataset(**data)`` that give the splits it was
  trained and evaluated on (its seed's validation split; the test split is the dataset's own);
* ``config``: the config that made it (plain data, the trial's hyperparameters in
  ``optimizer.fixed``: ``sassha-tune train`` runs it again), ``params``: those hyperparameters;
* ``metrics``: its final train, validation and test loss and accuracy (what the trial stores);
* ``format``: :data:`FORMAT`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Config, config_to_dict

if TYPE_CHECKING:
    from torch import nn

__all__ = ["FORMAT", "save_trained_model", "config_that_made_it"]

#: the ``format`` entry of a model file
FORMAT = "sassha-tune model 1"


def config_that_made_it(cfg: Config, params: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` as plain data with ``params`` (a trial's hyperparameters) fixed: ``train`` runs it as is."""
    d = config_to_dict(cfg)
    d["optimizer"]["fixed"] = {**d["optimizer"].get("fixed", {}), **dict(params)}
    d["optimizer"].pop("enqueue_published", None)
    d["study"].pop("storage", None)
    return d


def save_trained_model(path: str | Path, model: nn.Module, cfg: Config, spec: Any, params: Mapping[str, Any],
                       splits: Any, metrics: Mapping[str, Any]) -> None:
    """Write the model file (see the module docstring) to ``path``, atomically: a file beside it,
    renamed over ``path`` once complete."""
    import torch

    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "state_dict": state,
        "model": {"name": spec.model, "input_shape": [int(n) for n in splits.input_shape],
                  "num_classes": int(splits.num_classes), "options": dict(spec.model_options)},
        "data": {"name": spec.dataset, "data_dir": spec.data_dir, "val_fraction": spec.val_fraction,
                 "label_noise": spec.label_noise, "seed": spec.seed, "options": dict(spec.dataset_options)},
        "config": config_that_made_it(cfg, params),
        "params": dict(params),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    }
    target = Path(path)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
