"""Samplers and pruners by name, from plain arguments, and the sampler seed of each ask.

``auto`` (the default of both) is sassha-tune's choice for small budgets, measured in
``benchmarks/tuning_efficiency.py`` (docs/tuning.md): a TPE that starts modelling after a few
trials instead of ten (:data:`AUTO_SAMPLER_OPTIONS`), and successive halving over epochs
(:func:`auto_pruner`). Options given with ``auto`` override its own.

Depends on Optuna only, so that config validation can build them (wrong options fail when the
config is loaded) without importing the run loop.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import optuna

__all__ = ["AUTO_SAMPLER_OPTIONS", "EarlyRungsOnly", "auto_pruner", "make_sampler", "make_pruner", "resolve_pruner",
           "trial_seed"]

#: ``sampler: auto``: TPE with these options. Few random start-up trials (the enqueued starting
#: configurations count as start-up trials too), a joint model of the parameters (lr, rho and eps
#: interact), and running trials treated as bad by other workers' asks so that parallel workers
#: do not all propose the same point.
AUTO_SAMPLER_OPTIONS: dict[str, Any] = {"n_startup_trials": 4, "multivariate": True, "constant_liar": True}


def auto_pruner(epochs: int, can_prune: bool) -> tuple[str, dict[str, Any]]:
    """What ``pruner: auto`` is for trials of ``epochs`` epochs: successive halving with rungs at
    r, 3r, 9r, ... epochs up to half the epochs (r = a tenth of the epochs, at least 1; a trial
    goes on past a rung only if it is in the best third there; :class:`EarlyRungsOnly`), or
    ``none`` when the study cannot prune (several objectives, an objective that is not reported
    per epoch) or a trial is too short to have a rung in its first half."""
    min_resource = max(1, round(epochs / 10))
    if not can_prune or min_resource > epochs // 2:
        return "none", {}
    return "successive_halving", {"min_resource": min_resource, "reduction_factor": 3}


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


def make_sampler(
    name: str, options: Mapping[str, Any], seed: int | None, *, qmc_seed: int | None
) -> optuna.samplers.BaseSampler:
    """The sampler ``name`` (``study.sampler.name``) with ``options``, seeded with ``seed``.

    ``qmc_seed``: the scramble seed of ``qmc`` (the study's sampler seed, fixed across asks)."""
    opts = dict(options)
    s = optuna.samplers
    if name == "auto":
        return s.TPESampler(seed=seed, **{**AUTO_SAMPLER_OPTIONS, **opts})
    if name == "tpe":
        return s.TPESampler(seed=seed, **opts)
    if name == "random":
        return s.RandomSampler(seed=seed, **opts)
    if name == "gp":
        return s.GPSampler(seed=seed, **opts)
    if name == "cmaes":
        return s.CmaEsSampler(seed=seed, **opts)
    if name == "qmc":
        # The quasi-random sequence indexes itself through the storage: keep its scramble seed
        # fixed. Until a trial completes, QMC samples with its independent sampler, which is
        # rebuilt for every trial here (fresh process state): seed that one per trial, or every
        # trial before the first completion would get the same parameters.
        return s.QMCSampler(seed=qmc_seed, independent_sampler=s.RandomSampler(seed=seed), **opts)
    if name == "nsgaii":
        return s.NSGAIISampler(seed=seed, **opts)
    raise ValueError(f"unknown sampler {name!r}")


def resolve_pruner(name: str, options: Mapping[str, Any], *, epochs: int, can_prune: bool = True
                   ) -> tuple[str, dict[str, Any]]:
    """The pruner that runs for ``study.pruner`` (``name``, ``options``): ``auto`` becomes
    :func:`auto_pruner`'s choice, its options overridden by ``options``; any other name is itself."""
    if name != "auto":
        return name, dict(options)
    chosen, base = auto_pruner(epochs, can_prune)
    return chosen, ({**base, **options} if chosen != "none" else {})


def make_pruner(name: str, options: Mapping[str, Any], *, max_resource: int, can_prune: bool = True
                ) -> optuna.pruners.BasePruner:
    """The pruner ``name`` (``study.pruner.name``) with ``options``.

    ``max_resource``: the number of epochs of a trial (hyperband's default ``max_resource``, and
    what ``auto`` chooses for); ``can_prune``: whether the study's objective is reported per
    epoch (``auto`` chooses ``none`` otherwise)."""
    auto = name == "auto"
    name, opts = resolve_pruner(name, options, epochs=max_resource, can_prune=can_prune)
    p = optuna.pruners
    if auto and name == "successive_halving":
        return EarlyRungsOnly(p.SuccessiveHalvingPruner(**opts), last_step=max_resource // 2)
    if name == "none":
        if opts:
            raise ValueError("pruner none takes no options")
        return p.NopPruner()
    if name == "median":
        return p.MedianPruner(**opts)
    if name == "hyperband":
        opts.setdefault("max_resource", max_resource)
        return p.HyperbandPruner(**opts)
    if name == "successive_halving":
        return p.SuccessiveHalvingPruner(**opts)
    raise ValueError(f"unknown pruner {name!r}")


def trial_seed(base: int, n_trials_so_far: int, salt: int | str = 0) -> int:
    """The sampler seed for the next ask: a function of the study's progress, not of the process."""
    digest = hashlib.sha256(f"{base}:{n_trials_so_far}:{salt}".encode()).hexdigest()
    return int(digest[:8], 16)
