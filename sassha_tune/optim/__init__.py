"""Optimizers: SASSHA, M-SASSHA and the peers, all behind one step protocol (:mod:`.base`).

One file per optimizer family (:mod:`.sassha`, :mod:`.sassha_lm`, :mod:`.msassha`, :mod:`.sam`, :mod:`.first_order`,
:mod:`.adahessian`, :mod:`.sophia`), what the Hessian-preconditioned ones share in
:mod:`.preconditioned`, the arithmetic as functions on lists of tensors in :mod:`.functional`,
Hessian-vector products and Hutchinson estimates in :mod:`.hessian`, what an optimizer's step over
the stacked members of a trial pack is given (``stacked_step``) in :mod:`.stack`, and the table of
optimizer facts (with each one's config conventions and defaults) and
``build_optimizer(name, model, hparams)`` in :mod:`.registry`.
"""

from __future__ import annotations

from .adahessian import AdaHessian
from .base import frozen_running_stats
from .first_order import SGD, AdamW
from .msassha import MSassha
from .registry import OPTIMIZER_NAMES, OPTIMIZERS, OptimizerInfo, build_optimizer, optimizer_info
from .sam import SAMSGD, SAMAdamW
from .sassha import Sassha
from .sassha_lm import SasshaLM, linear_weight_groups
from .sophia import SophiaH

__all__ = [
    "OPTIMIZERS",
    "OPTIMIZER_NAMES",
    "OptimizerInfo",
    "optimizer_info",
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
    "SasshaLM",
    "linear_weight_groups",
]
