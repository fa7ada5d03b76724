"""Samplers and pruners by name, from plain arguments, and the sampler seed of each ask.

Depends on Optuna only, so that config validation can build them (wrong options fail when the
config is loaded) without importing the run loop.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import optuna

__all__ = ["make_sampler", "make_pruner", "trial_seed"]


def make_sampler(
    name: str, options: Mapping[str, Any], seed: int | None, *, qmc_seed: int | None
) -> optuna.samplers.BaseSampler:
    """The sampler ``name`` (``study.sampler.name``) with ``options``, seeded with ``seed``.

    ``qmc_seed``: the scramble seed of ``qmc`` (the study's sampler seed, fixed across asks)."""
    opts = dict(options)
    s = optuna.samplers
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


def make_pruner(name: str, options: Mapping[str, Any], *, max_resource: int) -> optuna.pruners.BasePruner:
    """The pruner ``name`` (``study.pruner.name``) with ``options``.

    ``max_resource``: hyperband's default ``max_resource`` (the number of epochs of a trial)."""
    opts = dict(options)
    p = optuna.pruners
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
