"""The study config: what the user writes, checked before anything is created.

* :mod:`.yamlfile` — the safe YAML loader (duplicate keys refused, ``1e-3`` read as a float);
* :mod:`.schema` — the typed dataclasses, where the config's defaults are declared (once:
  validation and the trainer's ``TrainSpec`` take them from there), and their plain-data form
  (what a study stores);
* :mod:`.validate` — YAML -> :class:`~.schema.Config`, every mistake one line naming the file, the
  key and what was expected (``FILE: key.path: expected X, got Y``), before a storage, a study or
  a process is created;
* :mod:`.spaces` — search-space files, their validation, ``trial.suggest_*`` and the conversion
  of config values to optimizer arguments (:func:`~.spaces.to_hparams`, by the conventions of the
  optimizer's registry entry: :meth:`sassha_tune.optim.OptimizerInfo.hparams`);
* :mod:`.overrides` — ``--set key.path=value`` overrides from the command line;
* :mod:`.starter` — the starter config ``sassha-tune init`` writes;
* :mod:`.search` — ``study.sampler``, ``study.pruner`` and ``study.callbacks`` by name: Optuna's
  samplers and pruners (``auto`` among them) as validation checks and the study builds them, and
  the callbacks' entries;
* :mod:`.advice` — notes on valid configs that are likely to waste trials.

The config never runs code. The only code it can name is a ``package.module:function`` plug-in
(a model or dataset factory), which the module that uses it imports (:mod:`sassha_tune.plugins`).
"""

from .advice import advice
from .schema import Config, ObjectiveSpec, config_from_stored, config_to_dict
from .validate import (
    SHARPNESS_BUDGET_KEYS,
    config_from_dict,
    load_config,
    published_to_enqueue,
    with_model_normalization,
)
from .yamlfile import yaml_load

__all__ = [
    "Config",
    "ObjectiveSpec",
    "SHARPNESS_BUDGET_KEYS",
    "advice",
    "config_from_dict",
    "config_from_stored",
    "config_to_dict",
    "load_config",
    "published_to_enqueue",
    "with_model_normalization",
    "yaml_load",
]
