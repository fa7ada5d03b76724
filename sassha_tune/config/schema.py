"""The study config as typed dataclasses, and its plain-data form (what a study stores).

:mod:`.validate` builds a :class:`Config` from user input and checks everything;
:func:`config_to_dict` turns it into plain data; :func:`config_from_stored` rebuilds it from that
data without checking again (for data validated when it was written).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Config",
    "ObjectiveSpec",
    "StudyConfig",
    "TaskConfig",
    "OptimizerConfig",
    "config_to_dict",
    "config_from_stored",
    "field_defaults",
    "fill_derived_defaults",
    "SAMPLERS",
    "PRUNERS",
    "IMPLICIT_DEFAULTS",
    "IMPLICIT_KEYS",
    "AMP_MODES",
    "KEEP_MODELS",
]

SAMPLERS = ("auto", "tpe", "random", "gp", "cmaes", "qmc", "nsgaii")
PRUNERS = ("auto", "none", "median", "hyperband", "successive_halving")
#: Settings whose default changed (issue 24: sampler and pruner ``auto``, the prior enqueued,
#: diverged trials told as pruned, the search space chosen for the model), each with the default a
#: config read now gets (``study.sampler`` / ``study.pruner``: the name's). Their dataclass
#: defaults below are what a config stored by an older version meant when it lacked them
#: (:func:`config_from_stored`). When a config does not write one (:attr:`Config.implicit`) and
#: continues a study that stores it, the study keeps its own: a study created before keeps its
#: settings.
IMPLICIT_DEFAULTS: dict[str, Any] = {"study.sampler": "auto", "study.pruner": "auto", "study.diverged_as_pruned": True,
                                     "optimizer.enqueue_published": "auto", "optimizer.search_space": None}
IMPLICIT_KEYS = tuple(IMPLICIT_DEFAULTS)
# Schedule names: trainer.SCHEDULES (imported where the config is checked; the trainer needs torch).
AMP_MODES = ("none", "bf16")
#: ``study.keep_models``: which trials' trained weights a study keeps (study/models.py)
KEEP_MODELS = ("none", "best", "all")


@dataclass
class ObjectiveSpec:
    metric: str
    direction: str  # "maximize" | "minimize"


@dataclass
class SamplerConfig:
    name: str = "tpe"
    seed: int | None = None  # None: the top-level seed
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PrunerConfig:
    name: str = "none"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyConfig:
    name: str
    storage: str | None = None
    objectives: list[ObjectiveSpec] = field(default_factory=lambda: [ObjectiveSpec("val_acc", "maximize")])
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    heartbeat_interval: float = 10.0
    stale_after: float = 60.0
    # the chance guard: "auto" (max(2, ceil(0.2 * task.epochs))), an epoch count, or 0 (off);
    # see chance_guard_after
    chance_guard: int | str = "auto"
    # told of every finished trial: [{"name": builtin or package.module:factory, "options": {...}}]
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    # True: a fresh trial process for every trial; False: single trials share one warm trial worker
    fresh_process: bool = False
    # True: a trial that diverged is told PRUNED (failure_reason: diverged), so that the sampler
    # learns from it; False: FAIL, which Optuna's samplers do not see (older studies)
    diverged_as_pruned: bool = False
    # {"study": NAME, "top": K}: a new study runs the K best complete configurations of that
    # earlier study (same storage) first, instead of the space's prior; None: none
    warm_start: dict[str, Any] | None = None
    # the trained weights kept in the study's artifact store: "none", "best" (each trial that was
    # the best so far when it finished) or "all" (every complete trial); study/models.py
    keep_models: str = "none"
    # the artifact store's folder (None: beside an SQLite database)
    artifact_dir: str | None = None

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def metrics(self) -> list[str]:
        return [o.metric for o in self.objectives]


@dataclass
class BudgetConfig:
    n_trials: int = 20
    timeout: float | None = None
    trial_timeout: float | None = None  # seconds one trial may run before it is stopped (FAIL timeout)


@dataclass
class TaskConfig:
    dataset: str
    model: str
    data_dir: str | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    model_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int | None = None
    augment: bool | None = None  # None: the dataset's default augmentation
    label_noise: float = 0.0
    val_fraction: float = 0.1
    max_steps_per_epoch: int | None = None
    grad_accumulation: int = 1  # micro-batches per optimizer step (batch_size is the whole step's)
    # your own training function (``package.module:function``): it brings its own data and model,
    # so dataset and model are "" and the built-in trainer's keys are not used
    train: str | None = None
    train_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    name: str
    search_space: str | dict[str, Any] | None = None  # None: the shipped space named like the optimizer
    fixed: dict[str, Any] = field(default_factory=dict)
    # "auto" (the space's prior), true/false, or the `source` strings of the space's published
    # configurations to enqueue
    enqueue_published: bool | str | list[str] = False
    grad_clip: float = 0.0


@dataclass
class ScheduleConfig:
    name: str = "multistep"
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = 0.1
    warmup_fraction: float = 0.0
    min_lr_fraction: float = 0.0  # cosine: the lr decays to this fraction of the initial lr


@dataclass
class MetricsConfig:
    sharpness: bool = True
    subset_size: int = 1024
    seed: int = 0
    budget: dict[str, Any] = field(default_factory=dict)
    track_every: int = 0  # sharpness during training every N epochs, at a cheap budget (0: off)


@dataclass
class DeviceConfig:
    name: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    processes: int = 1  # data-parallel ranks per trial (one GPU each on CUDA); docs/distributed.md


@dataclass
class Config:
    study: StudyConfig
    task: TaskConfig
    optimizer: OptimizerConfig
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    seed: int = 0
    provenance: dict[str, Any] = field(default_factory=dict)
    source: str = "<config>"  # file the config came from (not part of the schema)
    base_dir: str = "."  # where relative search-space paths are looked up
    name_given: bool = True  # study.name was written (not the file name's default; not stored)
    implicit: frozenset[str] = field(default=frozenset(), compare=False)  # the IMPLICIT_KEYS not written (not stored)
    # whether the model has normalization layers (built-in models by name, plug-ins once built;
    # None: unknown); chooses the search space when none is named (not stored)
    model_normalized: bool | None = field(default=None, compare=False)

    @property
    def sampler_seed(self) -> int:
        return self.seed if self.study.sampler.seed is None else self.study.sampler.seed

    @property
    def can_prune(self) -> bool:
        """Whether a pruner can judge this study's trials: one objective, reported every epoch."""
        from ..metrics.names import PER_EPOCH_METRICS

        return len(self.study.objectives) == 1 and self.study.objectives[0].metric in PER_EPOCH_METRICS

    @property
    def chance_guard_after(self) -> int | None:
        """The first epoch at which the chance guard stops a trial still near chance; ``None``
        when it is off (``study.chance_guard: 0``) or cannot apply (``task.train``: the user's
        function reports no number of classes). ``auto``: ``max(2, ceil(0.2 * task.epochs))``."""
        guard = self.study.chance_guard
        if self.task.train is not None or guard == 0:
            return None
        if guard == "auto":
            return max(2, math.ceil(0.2 * self.task.epochs))
        return int(guard)


def field_defaults(cls: type) -> dict[str, Any]:
    """The default of each field of dataclass ``cls`` that has one (a fresh value from each
    factory): the one declaration of the config's defaults, which validation gives unwritten keys."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def fill_derived_defaults(cfg: Config) -> None:
    """Defaults that depend on other settings (a stored config from an older version may lack them)."""
    if cfg.task.eval_batch_size is None:
        cfg.task.eval_batch_size = max(cfg.task.batch_size, 256)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain data (what a study stores and what ``export`` writes)."""
    d = dataclasses.asdict(cfg)
    d.pop("source", None)
    d.pop("base_dir", None)
    d.pop("name_given", None)
    d.pop("implicit", None)
    d.pop("model_normalized", None)
    task = d["task"]
    if task["train"] is None:  # the built-in trainer: as configs were before task.train existed
        task.pop("train")
        task.pop("train_options")
    else:  # the user's function: only the keys such a task takes (config_from_dict reads it back)
        d["task"] = {key: task[key] for key in ("train", "train_options", "epochs")}
        del d["schedule"], d["optimizer"]["grad_clip"]  # the function's own business
    study = d["study"]
    objectives = study.pop("objectives")
    if len(objectives) == 1:
        study["objective"] = objectives[0]["metric"]
        study["direction"] = objectives[0]["direction"]
    else:
        study["objectives"] = objectives
    if study.get("storage") is None:
        study.pop("storage")
    defaults = field_defaults(StudyConfig)
    for key in ("keep_models", "artifact_dir"):  # at their defaults: configs as before they existed
        if study.get(key) == defaults[key]:
            study.pop(key)
    if not d["provenance"]:
        d.pop("provenance")
    return d


def config_from_stored(data: Mapping[str, Any], source: str = "<stored config>") -> Config:
    """Rebuild a :class:`Config` from plain data written by :func:`config_to_dict`, **without**
    validating it again: for data that :func:`config_from_dict` validated when it was written (the
    config a study stores, the config a trial process is handed). Validation builds a sampler and
    a pruner, looks up the model and dataset, loads the search space; a study loop re-reads its
    config before every trial and every trial process rebuilds it, and neither needs that again.

    A key the data lacks gets the default :func:`config_from_dict` gives it (a study stored by an
    older version); malformed data raises ``TypeError`` / ``KeyError`` here or fails later, so
    never pass user input: that is :func:`config_from_dict`'s job."""
    d = copy.deepcopy(dict(data))
    study = dict(d["study"])
    if "objectives" in study:
        objectives = [ObjectiveSpec(**o) for o in study.pop("objectives")]
    else:
        objectives = [ObjectiveSpec(study.pop("objective"), study.pop("direction"))]
    cfg = Config(
        study=StudyConfig(
            objectives=objectives,
            sampler=SamplerConfig(**study.pop("sampler", {})),
            pruner=PrunerConfig(**study.pop("pruner", {})),
            **study,
        ),
        task=TaskConfig(**({"dataset": "", "model": ""} if d["task"].get("train") else {}), **d["task"]),
        optimizer=OptimizerConfig(**d["optimizer"]),
        budget=BudgetConfig(**d.get("budget", {})),
        schedule=ScheduleConfig(**d.get("schedule", {})),
        metrics=MetricsConfig(**d.get("metrics", {})),
        device=DeviceConfig(**d.get("device", {})),
        **{key: d[key] for key in ("seed", "provenance") if key in d},
        source=source,
    )
    fill_derived_defaults(cfg)
    return cfg
