"""The one table of optimizer facts: name -> class and what the rest of sassha-tune needs to know.

Everything that used to be a list of names somewhere else (which optimizers take a probe seed,
which have decoupled weight decay, which a trial pack can run, how many passes a step costs, the
hyperparameters a config may set, their defaults and conventions) is a field or method of
:class:`OptimizerInfo` here, and :func:`build_optimizer` is the one way the trainer makes an
optimizer. A config's values become constructor arguments by :meth:`OptimizerInfo.hparams`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .adahessian import AdaHessian
from .base import without_compiler_import
from .first_order import SGD, AdamW
from .msassha import MSassha
from .sam import SAMSGD, SAMAdamW
from .sassha import Sassha
from .sassha_lm import SasshaLM, linear_weight_groups
from .sophia import SophiaH

__all__ = [
    "OptimizerInfo", "OPTIMIZERS", "OPTIMIZER_NAMES", "optimizer_info", "build_optimizer", "hparams_from_config",
]

# Constructor arguments that are objects of the run, never config values.
_NOT_HYPERPARAMETERS = frozenset({"self", "params", "model", "process_group"})


def _constructor_parameters(cls: type) -> list[list[inspect.Parameter]]:
    """The keyword arguments ``cls(params, ...)`` accepts, per class along its MRO (``cls`` first):
    a class whose ``__init__`` passes ``**kwargs`` on contributes its own and the next one's
    (``SGD`` = ``OnePassStep``'s ``max_grad_norm`` + ``torch.optim.SGD``'s arguments)."""
    per_class: list[list[inspect.Parameter]] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        params = list(inspect.signature(init).parameters.values())
        per_class.append([p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                          and p.name not in _NOT_HYPERPARAMETERS])
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return per_class


def constructor_hyperparameters(cls: type) -> tuple[str, ...]:
    """The names of :func:`_constructor_parameters`, the base class's first."""
    names: list[str] = []
    for own in reversed(_constructor_parameters(cls)):
        names += [p.name for p in own if p.name not in names]
    return tuple(names)


def _with_betas(values: Mapping[str, Any]) -> dict[str, Any]:
    """``beta1`` / ``beta2`` as ``betas`` (a missing one at 0.9 / 0.999); a list of betas as a tuple."""
    hp = dict(values)
    if "beta1" in hp or "beta2" in hp:
        b1 = hp.pop("beta1", 0.9)
        b2 = hp.pop("beta2", 0.999)
        hp["betas"] = (float(b1), float(b2))
    elif isinstance(hp.get("betas"), list):
        hp["betas"] = tuple(hp["betas"])
    return hp


@dataclass(frozen=True)
class OptimizerInfo:
    """What sassha-tune knows about one optimizer."""

    name: str
    cls: type[torch.optim.Optimizer]
    #: weight decay shrinks the weights by ``1 - lr * wd`` (the config's scripts' ``wd`` is divided by lr)
    decoupled_weight_decay: bool
    #: takes ``seed`` for its Rademacher probes (a trial passes its seed unless fixed)
    seeded: bool
    #: a trial pack can run it with batched kernels (the class has a ``stacked_step``, see
    #: :mod:`.stack`); every optimizer packs with exact kernels (each member steps alone)
    batched_packs: bool
    #: forward/backward passes per step (cost about ``passes`` x SGD's)
    passes: int
    #: takes ``model=`` so its second pass can freeze BatchNorm running statistics
    needs_model: bool = False
    #: a trial pack runs it with exact kernels unless told otherwise, though it has a batched step
    #: (SASSHA: its Hessian preconditioner amplifies the batched kernels' last-bit differences)
    exact_packs_by_default: bool = False
    #: the registry's defaults over the constructor's (the reference scripts' SGD momentum 0.9)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    #: the parameter groups to build it over, from the model and the arguments it takes out of them
    #: (default: all parameters, one group)
    param_groups: Callable[[nn.Module, dict[str, Any]], Any] | None = None

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        """The names a config or search space may set (``beta1``/``beta2`` stand for ``betas``)."""
        return constructor_hyperparameters(self.cls)

    def config_defaults(self) -> dict[str, Any]:
        """Each hyperparameter's default as a config sees it: the constructor's, the registry's
        over them, and ``beta1``/``beta2`` from ``betas``."""
        defaults: dict[str, Any] = {}
        for own in _constructor_parameters(self.cls):  # the subclass's default first
            for p in own:
                if p.default is not p.empty:
                    defaults.setdefault(p.name, p.default)
        defaults.update(self.defaults)
        if isinstance(defaults.get("betas"), tuple):
            defaults.setdefault("beta1", defaults["betas"][0])
            defaults.setdefault("beta2", defaults["betas"][1])
        return defaults

    def hparams(self, values: Mapping[str, Any], *, seed: int | None = None, language: bool = False) -> dict[str, Any]:
        """Values in the conventions of the SASSHA reference scripts (and of configs) -> constructor
        arguments:

        * ``weight_decay`` (the scripts' ``--wd``) becomes ``wd / lr`` for decoupled optimizers, as
          the image-classification scripts pass it; ``language``: as given, as the language-model
          scripts pass it (nanoGPT style: ``AdamW(weight_decay=wd)``, SASSHA-LM's ``2e-4``);
        * ``beta1`` / ``beta2`` become ``betas``;
        * optimizers with Hessian probes get ``seed`` (the trial seed) unless it is given.
        """
        hp = _with_betas(values)
        if self.decoupled_weight_decay and "weight_decay" in hp and not language:
            if "lr" not in hp:
                raise ConfigError(
                    f"weight_decay for {self.name} is given in the scripts' convention (wd / lr); it needs lr too"
                )
            hp["weight_decay"] = float(hp["weight_decay"]) / float(hp["lr"])
        if self.seeded and seed is not None:
            hp.setdefault("seed", seed)
        return hp

    def build(self, model: nn.Module, hparams: Mapping[str, Any]) -> torch.optim.Optimizer:
        kwargs = {**self.defaults, **hparams}
        params = model.parameters() if self.param_groups is None else self.param_groups(model, kwargs)
        if self.needs_model:
            kwargs["model"] = model
        # Built without importing torch's compiler, which nothing here uses: the first optimizer of
        # a process imported it (0.8-1.3 s, every trial process, validation's dummy optimizers).
        with without_compiler_import():
            return self.cls(params, **kwargs)



def _linear_weight_groups(model: nn.Module, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    # the language-model code decays the weights of linear layers only
    return linear_weight_groups(model, kwargs.pop("weight_decay", 2e-4))


OPTIMIZERS: dict[str, OptimizerInfo] = {
    info.name: info
    for info in (
        OptimizerInfo("sgd", SGD, decoupled_weight_decay=False, seeded=False, batched_packs=True, passes=1,
                      defaults={"momentum": 0.9}),
        OptimizerInfo("adamw", AdamW, decoupled_weight_decay=True, seeded=False, batched_packs=True, passes=1),
        OptimizerInfo("sam_sgd", SAMSGD, decoupled_weight_decay=False, seeded=False, batched_packs=True, passes=2,
                      needs_model=True, defaults={"momentum": 0.9}),
        OptimizerInfo("sam_adamw", SAMAdamW, decoupled_weight_decay=True, seeded=False, batched_packs=True, passes=2,
                      needs_model=True),
        OptimizerInfo("adahessian", AdaHessian, decoupled_weight_decay=True, seeded=True, batched_packs=False, passes=1),
        OptimizerInfo("sophiah", SophiaH, decoupled_weight_decay=True, seeded=True, batched_packs=False, passes=1),
        OptimizerInfo("sassha", Sassha, decoupled_weight_decay=True, seeded=True, batched_packs=True, passes=2,
                      needs_model=True, exact_packs_by_default=True),
        OptimizerInfo("msassha", MSassha, decoupled_weight_decay=True, seeded=True, batched_packs=False, passes=1),
        OptimizerInfo("sassha_lm", SasshaLM, decoupled_weight_decay=True, seeded=True, batched_packs=False, passes=2,
                      needs_model=True, param_groups=_linear_weight_groups),
    )
}

#: the names in a stable order (configs, docs, error messages)
OPTIMIZER_NAMES: tuple[str, ...] = tuple(OPTIMIZERS)


def optimizer_info(name: str) -> OptimizerInfo:
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(
            f"Unknown optimizer {name!r} (expected one of {', '.join(sorted(OPTIMIZERS))})"
        ) from None


def hparams_from_config(name: str, values: Mapping[str, Any], *, seed: int | None = None,
                        language: bool = False) -> dict[str, Any]:
    """:meth:`OptimizerInfo.hparams` of optimizer ``name``; a name the registry does not know gets
    only ``betas`` from ``beta1`` / ``beta2``."""
    info = OPTIMIZERS.get(name)
    return _with_betas(values) if info is None else info.hparams(values, seed=seed, language=language)


def build_optimizer(name: str, model: nn.Module, hparams: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``model.parameters()`` with constructor arguments ``hparams``
    (``weight_decay`` as the optimizer itself means it; see :meth:`OptimizerInfo.hparams`)."""
    return optimizer_info(name).build(model, dict(hparams))
