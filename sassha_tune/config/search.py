"""The study's search settings by name: ``study.sampler``, ``study.pruner`` and ``study.callbacks``.

Samplers and pruners are Optuna's, built here from a name and plain options, so that config
validation asks their constructors about the options (wrong options fail when the config is
loaded) and the study loop builds the same objects. ``auto`` (the default of both) is
sassha-tune's choice for small budgets, measured in ``benchmarks/tuning_efficiency.py``
(docs/tuning.md): a TPE that starts modelling after a few trials instead of ten
(:data:`AUTO_SAMPLER_OPTIONS`), and successive halving over epochs (:func:`auto_pruner`). Options
given with ``auto`` override its own. What a study runs of them (a sampler seeded per ask, auto's
pruner judging only early rungs) is :mod:`sassha_tune.study.samplers`.

Callbacks are parsed here (:func:`parse_callbacks`); :mod:`sassha_tune.study.callbacks` builds
and calls them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..plugins import PLUGIN_SPEC

if TYPE_CHECKING:
    import optuna

__all__ = ["AUTO_SAMPLER_OPTIONS", "BUILTIN_CALLBACKS", "auto_pruner", "callback_label", "make_sampler",
           "parse_callbacks", "pruner_by_name", "resolve_pruner"]

#: ``sampler: auto``: TPE with these options. Few random start-up trials (the enqueued starting
#: configurations count as start-up trials too), a joint model of the parameters (lr, rho and eps
#: interact), and running trials treated as bad by other workers' asks so that parallel workers
#: do not all propose the same point.
AUTO_SAMPLER_OPTIONS: dict[str, Any] = {"n_startup_trials": 4, "multivariate": True, "constant_liar": True}

#: built-in callback name -> (the modules it needs, the extra that installs them)
BUILTIN_CALLBACKS: dict[str, tuple[tuple[str, ...], str]] = {
    "mlflow": (("optuna_integration", "mlflow"), "mlflow"),
    "wandb": (("optuna_integration", "wandb"), "wandb"),
    "tensorboard": (("optuna_integration", "tensorboard", "tensorflow"), "tensorboard"),
}


def auto_pruner(epochs: int, can_prune: bool) -> tuple[str, dict[str, Any]]:
    """What ``pruner: auto`` is for trials of ``epochs`` epochs: successive halving with rungs at
    r, 3r, 9r, ... epochs up to half the epochs (r = a tenth of the epochs, at least 1; a trial
    goes on past a rung only if it is in the best third there; the study's pruner judges no later
    rung), or ``none`` when the study cannot prune (several objectives, an objective that is not
    reported per epoch) or a trial is too short to have a rung in its first half."""
    min_resource = max(1, round(epochs / 10))
    if not can_prune or min_resource > epochs // 2:
        return "none", {}
    return "successive_halving", {"min_resource": min_resource, "reduction_factor": 3}


def resolve_pruner(name: str, options: Mapping[str, Any], *, epochs: int, can_prune: bool = True
                   ) -> tuple[str, dict[str, Any]]:
    """The pruner that runs for ``study.pruner`` (``name``, ``options``): ``auto`` becomes
    :func:`auto_pruner`'s choice, its options overridden by ``options``; any other name is itself."""
    if name != "auto":
        return name, dict(options)
    chosen, base = auto_pruner(epochs, can_prune)
    return chosen, ({**base, **options} if chosen != "none" else {})


def make_sampler(
    name: str, options: Mapping[str, Any], seed: int | None, *, qmc_seed: int | None
) -> optuna.samplers.BaseSampler:
    """The sampler ``name`` (``study.sampler.name``) with ``options``, seeded with ``seed``.

    ``qmc_seed``: the scramble seed of ``qmc`` (the study's sampler seed, fixed across asks)."""
    opts = dict(options)
    import optuna  # here, not at the top: a trial process imports config and needs no Optuna

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
        # rebuilt for every trial (fresh process state): seed that one per trial, or every
        # trial before the first completion would get the same parameters.
        return s.QMCSampler(seed=qmc_seed, independent_sampler=s.RandomSampler(seed=seed), **opts)
    if name == "nsgaii":
        return s.NSGAIISampler(seed=seed, **opts)
    raise ValueError(f"unknown sampler {name!r}")


def pruner_by_name(name: str, options: Mapping[str, Any], *, max_resource: int) -> optuna.pruners.BasePruner:
    """Optuna's pruner ``name`` (a name :func:`resolve_pruner` returns, not ``auto``) with ``options``.

    ``max_resource``: the number of epochs of a trial (hyperband's default ``max_resource``)."""
    opts = dict(options)
    import optuna

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


def callback_label(i: int) -> str:
    """How messages name the ``i``-th entry of ``study.callbacks``."""
    return f"study.callbacks[{i}]"


def parse_callbacks(raw: Any, fail: Callable[[str, str, Any], Exception]) -> list[dict[str, Any]]:
    """``study.callbacks`` as written -> ``[{"name": ..., "options": {...}}, ...]``; ``fail(path,
    expected, got)`` builds the config's one-line error."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise fail("study.callbacks", "a list of callbacks (built-in names or package.module:factory plug-ins)", raw)
    return [_callback_entry(item, callback_label(i), fail) for i, item in enumerate(raw)]


def _callback_entry(item: Any, label: str, fail: Callable[[str, str, Any], Exception]) -> dict[str, Any]:
    entry = {"name": item} if isinstance(item, str) else item
    if not isinstance(entry, Mapping) or set(entry) - {"name", "options"} or "name" not in entry:
        raise fail(label, "a name, or a mapping with name and options", item)
    name, options = entry["name"], entry.get("options") or {}
    if not isinstance(name, str) or (name not in BUILTIN_CALLBACKS and not PLUGIN_SPEC.match(name)):
        raise fail(f"{label}.name", f"one of {', '.join(BUILTIN_CALLBACKS)} or a package.module:factory plug-in", name)
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise fail(f"{label}.options", "a mapping of keyword arguments", options)
    return {"name": name, "options": dict(options)}
