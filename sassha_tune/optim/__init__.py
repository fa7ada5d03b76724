"""Optimizers: SASSHA, M-SASSHA and the peers, all behind one step protocol (:mod:`.base`).

``build_optimizer(name, model, hparams)`` is the one way the trainer makes an optimizer;
``hparams`` are constructor arguments (e.g. ``weight_decay`` as the optimizer itself means it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .base import frozen_running_stats
from .msassha import MSassha
from .peers import SAMSGD, SGD, AdaHessian, AdamW, SAMAdamW, SophiaH
from .sassha import Sassha

__all__ = [
    "OPTIMIZERS",
    "TWO_PASS",
    "build_optimizer",
    "frozen_running_stats",
    "SGD",
    "AdamW",
    "SAMSGD",
    "SAMAdamW",
    "AdaHessian",
    "SophiaH",
    "Sassha",
    "MSassha",
]


def _sgd(model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
    hp.setdefault("momentum", 0.9)
    return SGD(model.parameters(), **hp)


def _adamw(model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
    return AdamW(model.parameters(), **hp)


def _sam_sgd(model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
    hp.setdefault("momentum", 0.9)
    return SAMSGD(model.parameters(), model=model, **hp)


def _sam_adamw(model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
    return SAMAdamW(model.parameters(), model=model, **hp)


def _adahessian(model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
    return AdaHessian(model.parameters(), **hp)


def _sophiah(model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
    return SophiaH(model.parameters(), **hp)


def _sassha(model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
    return Sassha(model.parameters(), model=model, **hp)


def _msassha(model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
    return MSassha(model.parameters(), **hp)


# name -> builder(model, hparams). Builders that need the model (to freeze BatchNorm statistics
# in a second pass) receive it here, so the trainer never special-cases an optimizer.
OPTIMIZERS: dict[str, Callable[[nn.Module, dict[str, Any]], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adamw": _adamw,
    "sam_sgd": _sam_sgd,
    "sam_adamw": _sam_adamw,
    "adahessian": _adahessian,
    "sophiah": _sophiah,
    "sassha": _sassha,
    "msassha": _msassha,
}

# optimizers that evaluate the closure twice per step (forward+backward cost about 2x SGD)
TWO_PASS = frozenset({"sam_sgd", "sam_adamw", "sassha"})


def build_optimizer(name: str, model: nn.Module, hparams: Mapping[str, Any]) -> torch.optim.Optimizer:
    try:
        builder = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(
            f"Unknown optimizer {name!r} (expected one of {', '.join(sorted(OPTIMIZERS))})"
        ) from None
    return builder(model, dict(hparams))
