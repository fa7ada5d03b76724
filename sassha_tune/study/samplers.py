"""What a study runs of ``study.sampler`` and ``study.pruner``, and the sampler seed of each ask.

The samplers and pruners by name, ``auto`` among them, are the config's
(:mod:`sassha_tune.config.search`, where validation asks their constructors about the options);
the study adds how it runs them: ``auto``'s successive halving judges only the early rungs
(:class:`EarlyRungsOnly`), and each ask's sampler seed is a function of the study's progress
(:func:`trial_seed`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import optuna

from ..config.search import pruner_by_name, resolve_pruner

__all__ = ["EarlyRungsOnly", "make_pruner", "trial_seed"]


class EarlyRungsOnly(optuna.pruners.BasePruner):
    """A pruner that judges a trial only up to ``last_step`` (``auto``: half the epochs).

    Optuna's successive halving has no maximum resource: its rungs go on (1, 3, 9, ... epochs),
    so with 10 epochs it stops trials at epoch 9, which saves a tenth of a run and, under a decaying
    learning rate, stops trials whose accuracy comes in the last epochs. Past half the epochs a
    trial trains to the end."""

    def __init__(self, wrapped: optuna.pruners.BasePruner, last_step: int) -> None:
        self.wrapped, self.last_step = wrapped, last_step

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        return step is not None and step <= self.last_step and self.wrapped.prune(study, trial)


def make_pruner(name: str, options: Mapping[str, Any], *, max_resource: int, can_prune: bool = True
                ) -> optuna.pruners.BasePruner:
    """The pruner ``name`` (``study.pruner.name``) with ``options``.

    ``max_resource``: the number of epochs of a trial (hyperband's default ``max_resource``, and
    what ``auto`` chooses for); ``can_prune``: whether the study's objective is reported per
    epoch (``auto`` chooses ``none`` otherwise)."""
    chosen, opts = resolve_pruner(name, options, epochs=max_resource, can_prune=can_prune)
    pruner = pruner_by_name(chosen, opts, max_resource=max_resource)
    if name == "auto" and chosen == "successive_halving":
        return EarlyRungsOnly(pruner, last_step=max_resource // 2)
    return pruner


def trial_seed(base: int, n_trials_so_far: int, salt: int | str = 0) -> int:
    """The sampler seed for the next ask: a function of the study's progress, not of the process."""
    digest = hashlib.sha256(f"{base}:{n_trials_so_far}:{salt}".encode()).hexdigest()
    return int(digest[:8], 16)
