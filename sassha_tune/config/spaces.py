"""Search spaces: ``search_spaces/*.yaml`` -> validated :class:`SearchSpace` -> ``trial.suggest_*``.

A space file::

    optimizer: sassha
    params:
      lr:           {type: float, low: 0.01, high: 1.0, log: true}
      lazy_hessian: {type: int, low: 1, high: 100, log: true}
      adaptive:     {type: categorical, choices: [true, false]}
    published:      # enqueued as the first trials when optimizer.enqueue_published is true
      - {source: cifar10/resnet20/sassha.sh, lr: 0.15, weight_decay: 5.0e-4, rho: 0.2, ...}
    prior:          # where a study starts (optimizer.enqueue_published: auto, the default)
      - cifar10/resnet32/sassha.sh                  # a published entry, by its source
      - {source: my-safe-start, lr: 0.1, rho: 0.1}  # or values of its own (the sampler fills the rest)
    without_normalization: sassha_nonorm   # the space searched instead on a model without normalization
                                           # layers when the config names no space

Weight-decay convention (converted by :func:`to_hparams`, by the optimizer's registry entry): ``weight_decay``
in configs, search spaces, published lists and exports is the published scripts' ``--wd``. The
scripts give decoupled optimizers (SASSHA, M-SASSHA, AdamW, SAM-AdamW, AdaHessian, Sophia-H)
``wd / lr`` (the initial lr), so the per-step shrink ``1 - lr_t * wd / lr_0`` equals ``wd`` at the
peak lr; SGD and SAM-SGD get ``wd`` itself as coupled L2.
"""

from __future__ import annotations

import difflib
import math
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .yamlfile import excerpt, unknown_key_text

__all__ = [
    "ParamSpec",
    "SearchSpace",
    "SPACES_DIR",
    "load_space",
    "space_for_config",
    "default_space_name",
    "space_from_dict",
    "suggest",
    "to_hparams",
    "check_param_names",
]


def _shipped_spaces_dir() -> Path:
    """Where the shipped search spaces are: the checkout's ``search_spaces/`` (editable installs,
    running from the repository), else the copy a wheel installs under ``<prefix>/share/sassha-tune``
    (``[tool.setuptools.data-files]`` in pyproject.toml)."""
    checkout = Path(__file__).resolve().parents[2] / "search_spaces"
    if checkout.is_dir():
        return checkout
    return Path(sysconfig.get_path("data")) / "share" / "sassha-tune" / "search_spaces"


SPACES_DIR = _shipped_spaces_dir()

_BETA_SPLIT = ("beta1", "beta2")
_PARAM_KEYS = ("type", "low", "high", "log", "step", "choices")
_TYPES = ("float", "int", "categorical")


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] | None = None

    @property
    def is_fixed(self) -> bool:
        """A categorical with one choice: a fixed value, not a searched parameter (Optuna never
        sees it, so it is no "parameter" of importances, slices or the dashboard)."""
        return self.type == "categorical" and len(self.choices or ()) == 1

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in (self.choices or ())
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type == "int" and float(value) != int(value):
            return False
        return self.low <= value <= self.high  # type: ignore[operator]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type}
        if self.type == "categorical":
            d["choices"] = list(self.choices or ())
        else:
            d.update(low=self.low, high=self.high, log=self.log)
            if self.step is not None:
                d["step"] = self.step
        return d


@dataclass
class SearchSpace:
    optimizer: str | None
    params: dict[str, ParamSpec]
    published: list[dict[str, Any]] = field(default_factory=list)
    source: str = "<inline>"
    # Where a study starts and which space replaces this one on a model without normalization:
    # used when a study is created, not stored with it (to_dict), so they never make a stored
    # study's space differ from its file's.
    prior: list[dict[str, Any]] = field(default_factory=list)
    without_normalization: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data, stored with the study and compared on resume."""
        return {
            "optimizer": self.optimizer,
            "params": {name: p.to_dict() for name, p in self.params.items()},
            "published": [dict(p) for p in self.published],
        }

    def published_params(self) -> list[dict[str, Any]]:
        """The published configurations restricted to the searched params (for enqueue_trial)."""
        return [{k: v for k, v in p.items() if k in self.params} for p in self.published]


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _unknown_keys(raw: Mapping[Any, Any], allowed: tuple[str, ...], src: str, prefix: str) -> None:
    """Refuse a key of ``raw`` that is not ``allowed``, with the closest valid key (or all of them)."""
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{src}: {prefix}{key}: {unknown_key_text(str(key), allowed)}")


def _param(name: str, raw: Any, src: str, path: str) -> ParamSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: {path}: expected a mapping with type, low, high (or choices), got {excerpt(raw)}")
    _unknown_keys(raw, _PARAM_KEYS, src, f"{path}.")
    kind = raw.get("type")
    if kind not in _TYPES:
        raise ConfigError(f"{src}: {path}.type: expected one of {', '.join(_TYPES)}, got {excerpt(kind)}")
    if kind == "categorical":
        return _categorical(name, raw, src, path)
    return _numeric(name, kind, raw, src, path)


def _categorical(name: str, raw: dict[str, Any], src: str, path: str) -> ParamSpec:
    for key in ("low", "high", "log", "step"):
        if key in raw:
            raise ConfigError(f"{src}: {path}.{key}: not used by a categorical parameter (give choices)")
    choices = raw.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{src}: {path}.choices: expected a non-empty list, got {excerpt(choices)}")
    for c in choices:
        if not (c is None or isinstance(c, (bool, int, float, str))):
            raise ConfigError(f"{src}: {path}.choices: expected scalars (number, string, bool), got {excerpt(c)}")
    if len(set(map(repr, choices))) != len(choices):
        raise ConfigError(f"{src}: {path}.choices: expected distinct values, got {excerpt(choices)}")
    if name == "dense_refresh_steps" and any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in choices):
        raise ConfigError(f"{src}: {path}.choices: expected integers >= 0 (steps), got {excerpt(choices)}")
    return ParamSpec(name, "categorical", choices=tuple(choices))


def _numeric(name: str, kind: str, raw: dict[str, Any], src: str, path: str) -> ParamSpec:
    """A ``float`` or ``int`` parameter: a range, on a log scale or in steps."""
    if "choices" in raw:
        raise ConfigError(f"{src}: {path}.choices: only for type: categorical")
    low, high = _bounds(kind, raw, src, path)
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{src}: {path}.log: expected true or false, got {excerpt(log)}")
    if log and low <= 0:
        raise ConfigError(f"{src}: {path}.low: expected a number > 0 with log: true, got {excerpt(low)}")
    step = raw.get("step")
    if step is not None:
        _check_step(step, kind, log, src, path)
    if name == "lazy_hessian" and low < 1:
        raise ConfigError(f"{src}: {path}.low: expected the Hessian interval k >= 1, got {excerpt(low)}")
    if name == "dense_refresh_steps" and (kind != "int" or low < 0):
        raise ConfigError(f"{src}: {path}: expected type int with low >= 0 (steps), got type {kind} with low {excerpt(low)}")
    if kind == "float":
        low, high = float(low), float(high)
    return ParamSpec(name, kind, low=low, high=high, log=log, step=step)


def _bounds(kind: str, raw: dict[str, Any], src: str, path: str) -> tuple[Any, Any]:
    """``low`` and ``high`` of a ``kind`` parameter: numbers (integers for ``int``), low < high."""
    low, high = raw.get("low"), raw.get("high")
    for key, v in (("low", low), ("high", high)):
        if not _num(v) or (kind == "int" and not isinstance(v, int)):
            raise ConfigError(f"{src}: {path}.{key}: expected {'an integer' if kind == 'int' else 'a number'}, got {excerpt(v)}")
    if not low < high:
        raise ConfigError(f"{src}: {path}: expected low < high, got low={excerpt(low)}, high={excerpt(high)}")
    return low, high


def _check_step(step: Any, kind: str, log: bool, src: str, path: str) -> None:
    if log:
        raise ConfigError(f"{src}: {path}.step: cannot be combined with log: true")
    if not _num(step) or step <= 0 or (kind == "int" and not isinstance(step, int)):
        raise ConfigError(f"{src}: {path}.step: expected a positive {'integer' if kind == 'int' else 'number'}, got {excerpt(step)}")


def check_param_names(optimizer: str, names: list[str], src: str, path: str) -> None:
    """Every name must be a hyperparameter of ``optimizer`` (its constructor's arguments, from the
    optimizer registry), with a "did you mean" hint."""
    from ..optim.registry import OPTIMIZERS

    info = OPTIMIZERS.get(optimizer)
    if info is None:
        return
    known = info.hyperparameters
    valid = known + _BETA_SPLIT if "betas" in known else known
    for n in names:
        if n not in valid:
            close = difflib.get_close_matches(n, valid, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}?" if close else f"{optimizer} takes {', '.join(valid)}"
            raise ConfigError(f"{src}: {path}.{n}: not a {optimizer} hyperparameter ({hint})")


def _kind(value: Any) -> str:
    """What a value is, without its content (for files a config refers to)."""
    if value is None:
        return "nothing"
    kinds = {bool: "true or false", str: "text", list: "a list", dict: "a mapping"}
    return kinds.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


_SPACE_KEYS = ("optimizer", "params", "published", "prior", "without_normalization", "description")


def space_from_dict(
    raw: Any, src: str, optimizer: str | None = None, path: str = "", *, echo: bool = True
) -> SearchSpace:
    """Validate a search space (the parsed YAML of a space file, or an inline mapping at ``path``).

    ``echo=False`` (a file the config refers to): until the content is recognized as a search space
    (a mapping of the space's keys whose ``params`` is a mapping of the optimizer's
    hyperparameters), an error says what kind of value it found, never the value itself.
    """
    prefix = f"{path}." if path else ""
    where = f"{src}: {path}" if path else src
    shown = excerpt if echo else _kind
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with params, got {shown(raw)}")
    _unknown_keys(raw, _SPACE_KEYS, src, prefix)
    params_raw = raw.get("params")
    if not isinstance(params_raw, dict) or not params_raw:
        raise ConfigError(f"{src}: {prefix}params: expected a non-empty mapping of parameters, got {shown(params_raw)}")
    opt = _space_optimizer(raw.get("optimizer"), optimizer, src, prefix)
    if opt is not None:  # names before values: a value is shown only under a hyperparameter's name
        check_param_names(opt, [str(n) for n in params_raw], src, f"{prefix}params")
    params = {str(n): _param(str(n), p, src, f"{prefix}params.{n}") for n, p in params_raw.items()}
    published = _published(raw.get("published") or [], params, opt, src, prefix)
    prior = _prior(raw.get("prior"), params, published, opt, src, prefix)
    instead = raw.get("without_normalization")
    if instead is not None and (not isinstance(instead, str) or not instead.strip()):
        raise ConfigError(f"{src}: {prefix}without_normalization: expected the name of a search space, got {excerpt(instead)}")
    return SearchSpace(optimizer=opt, params=params, published=published, source=src, prior=prior,
                       without_normalization=instead)


def _space_optimizer(declared: Any, optimizer: str | None, src: str, prefix: str) -> str | None:
    """The optimizer a space is for: the config's (``optimizer``), which the space's own
    ``optimizer:`` (``declared``) must not contradict, else the space's."""
    if declared is not None and optimizer is not None and declared != optimizer:
        raise ConfigError(f"{src}: {prefix}optimizer: this space is for {excerpt(declared)}, but the config's optimizer is {excerpt(optimizer)}")
    return optimizer or declared


def _published(raw: Any, params: dict[str, ParamSpec], opt: str | None, src: str, prefix: str) -> list[dict[str, Any]]:
    """A space's ``published:`` list: mappings of values inside the space."""
    if not isinstance(raw, list):
        raise ConfigError(f"{src}: {prefix}published: expected a list of mappings, got {excerpt(raw)}")
    published = []
    for i, entry in enumerate(raw):
        where = f"{prefix}published[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{src}: {where}: expected a mapping of parameter values, got {excerpt(entry)}")
        _values_in_space(entry, params, opt, src, where)
        published.append(dict(entry))
    return published


def _values_in_space(entry: dict[str, Any], params: dict[str, ParamSpec], opt: str | None, src: str, where: str) -> None:
    """The values of a published or prior entry: hyperparameters of the optimizer, inside the space."""
    values = {k: v for k, v in entry.items() if k != "source"}
    if opt is not None:
        check_param_names(opt, list(values), src, where)
    for k, v in values.items():
        if k in params and not params[k].contains(v):
            p = params[k]
            rng = f"one of {list(p.choices or ())}" if p.type == "categorical" else f"{p.low} <= value <= {p.high}"
            raise ConfigError(f"{src}: {where}.{k}: expected {rng} (the space must contain it), got {excerpt(v)}")


def _prior(raw: Any, params: dict[str, ParamSpec], published: list[dict[str, Any]], opt: str | None, src: str,
           prefix: str) -> list[dict[str, Any]]:
    """A space's ``prior:``: each item the ``source`` of a published entry, or a mapping of values."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{src}: {prefix}prior: expected a list of published sources or mappings, got {excerpt(raw)}")
    by_source = {str(p["source"]): p for p in published if "source" in p}
    prior = []
    for i, item in enumerate(raw):
        where = f"{prefix}prior[{i}]"
        if isinstance(item, str):
            if item not in by_source:
                raise ConfigError(f"{src}: {where}: no published configuration {excerpt(item)}; "
                                  f"published: {', '.join(by_source) or 'none'}")
            prior.append(dict(by_source[item]))
            continue
        if not isinstance(item, dict) or not any(k in params for k in item):
            raise ConfigError(f"{src}: {where}: expected a published source or a mapping of parameter values, "
                              f"got {excerpt(item)}")
        _values_in_space(item, params, opt, src, where)
        prior.append({"source": f"prior[{i}]", **item})
    return prior


def _find_space_file(ref: str, base_dir: str | Path) -> Path | None:
    candidates = []
    looks_like_path = "/" in ref or ref.endswith((".yaml", ".yml"))
    if looks_like_path:
        p = Path(ref).expanduser()
        candidates.append(p if p.is_absolute() else Path(base_dir) / p)
    else:
        candidates += [Path(base_dir) / "search_spaces" / f"{ref}.yaml", SPACES_DIR / f"{ref}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    return None


def load_space(ref: str, optimizer: str | None, base_dir: str | Path = ".", src: str = "<config>") -> SearchSpace:
    """The search space ``ref`` names (a shipped name or a path, relative to ``base_dir``), for the
    config ``src``. Every error names the config key, then the file and what is wrong in it; the
    file's content is not shown before it is recognized as a search space (:func:`space_from_dict`)."""
    from .yamlfile import read_yaml_file

    key = f"{src}: optimizer.search_space"
    path = _find_space_file(ref, base_dir)
    if path is None:
        shipped = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
        raise ConfigError(
            f"{key}: no search space {excerpt(ref)} (a shipped name: {', '.join(shipped)}; or a path to a YAML file)"
        )
    try:
        raw = read_yaml_file(path, "search-space file", echo=False)
        return space_from_dict(raw, str(path), optimizer, echo=False)
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def default_space_name(cfg: Any) -> str:
    """The shipped space a config that names none searches: the optimizer's own, or the one its
    space names under ``without_normalization`` when the model has no normalization layers
    (``cfg.model_normalized`` False: built-in models by name, plug-ins once built)."""
    name = cfg.optimizer.name
    if cfg.model_normalized is False:
        instead = load_space(name, name, cfg.base_dir, cfg.source).without_normalization
        if instead:
            return instead
    return name


def space_for_config(cfg: Any, *, check_fixed: bool = False) -> SearchSpace:
    """The search space a config names (a shipped name, a file, or inline); validated. A config
    that names none searches :func:`default_space_name`'s, without the parameters it fixes.

    ``check_fixed``: also refuse a parameter both fixed and searched (a study needs one or the
    other; ``train`` runs fixed values and ignores the space, so exported configs keep both).
    """
    ref = cfg.optimizer.search_space
    if isinstance(ref, dict):
        space = space_from_dict(ref, cfg.source, cfg.optimizer.name, path="optimizer.search_space")
    elif ref:
        space = load_space(ref, cfg.optimizer.name, cfg.base_dir, cfg.source)
    else:  # the default space: a parameter the config fixes is not searched there
        space = load_space(default_space_name(cfg), cfg.optimizer.name, cfg.base_dir, cfg.source)
        space = replace(space, params={k: p for k, p in space.params.items() if k not in cfg.optimizer.fixed})
    check_param_names(cfg.optimizer.name, list(cfg.optimizer.fixed), cfg.source, "optimizer.fixed")
    both = sorted(set(space.params) & set(cfg.optimizer.fixed))
    if both and check_fixed:
        raise ConfigError(f"{cfg.source}: optimizer.fixed.{both[0]}: also searched in the search space; remove one")
    return space


def fixed_values(space: SearchSpace) -> dict[str, Any]:
    """The space's one-choice categoricals as fixed values (``{"dense_refresh_steps": 50}``)."""
    return {name: (p.choices or ())[0] for name, p in space.params.items() if p.is_fixed}


def suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """Draw one value per searched parameter with ``trial.suggest_*`` (enqueued values are used as
    is); a one-choice categorical takes its value without being suggested (:func:`fixed_values`)."""
    out: dict[str, Any] = {}
    for name, p in space.params.items():
        if p.is_fixed:
            out[name] = (p.choices or ())[0]
        elif p.type == "float":
            out[name] = trial.suggest_float(name, p.low, p.high, log=p.log, step=p.step)
        elif p.type == "int":
            out[name] = trial.suggest_int(name, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            out[name] = trial.suggest_categorical(name, list(p.choices or ()))
    return out


def to_hparams(
    optimizer: str, params: Mapping[str, Any], *, seed: int | None = None, language: bool = False
) -> dict[str, Any]:
    """Config-convention values -> optimizer constructor arguments. The one conversion point; the
    conventions are the optimizer's registry entry's (:meth:`~sassha_tune.optim.OptimizerInfo.hparams`:
    ``weight_decay`` as ``wd / lr`` for decoupled optimizers unless ``language``, ``beta1`` /
    ``beta2`` as ``betas``, the trial ``seed`` for optimizers with Hessian probes)."""
    from ..optim.registry import hparams_from_config

    return hparams_from_config(optimizer, params, seed=seed, language=language)


def config_hparams(cfg: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (and nothing else) as optimizer arguments of ``cfg``'s optimizer: converted by
    :func:`to_hparams` with the study's seed and the weight-decay convention of the task's kind
    (``task.dataset: text``: the language-model scripts')."""
    return to_hparams(cfg.optimizer.name, values, seed=cfg.seed, language=cfg.task.dataset == "text")


def trial_hparams(cfg: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """The optimizer arguments of one trial of ``cfg``: ``optimizer.fixed`` with the trial's
    ``params`` over it (:func:`config_hparams`)."""
    return config_hparams(cfg, {**cfg.optimizer.fixed, **params})
