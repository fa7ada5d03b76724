"""The one table of optimizer facts: name -> class and what the rest of sassha-tune needs to know.

Everything that used to be a list of names somewhere else (which optimizers take a probe seed,
which have decoupled weight decay, which a trial pack can run, how many passes a step costs, the
hyperparameters a config may set) is a field of :class:`OptimizerInfo` here, and
:func:`build_optimizer` is the one way the trainer makes an optimizer.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adahessian import AdaHessian
from .first_order import SGD, AdamW
from .msassha import MSassha
from .sam import SAMSGD, SAMAdamW
from .sassha import Sassha
from .sassha_lm import SasshaLM, linear_weight_groups
from .sophia import SophiaH

__all__ = ["OptimizerInfo", "OPTIMIZERS", "OPTIMIZER_NAMES", "optimizer_info", "build_optimizer"]

# Constructor arguments that are objects of the run, never config values.
_NOT_HYPERPARAMETERS = frozenset({"self", "params", "model", "process_group"})


def constructor_hyperparameters(cls: type) -> tuple[str, ...]:
    """The keyword arguments ``cls(params, ...)`` accepts, from the signatures along its MRO: a
    class whose ``__init__`` passes ``**kwargs`` on contributes its own names and the next one's
    (``SGD`` = ``torch.optim.SGD``'s arguments + ``OnePassStep``'s ``max_grad_norm``). The base
    class's names come first."""
    per_class: list[list[str]] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        params = list(inspect.signature(init).parameters.values())
        per_class.append([p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                          and p.name not in _NOT_HYPERPARAMETERS])
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    names: list[str] = []
    for own in reversed(per_class):
        names += [n for n in own if n not in names]
    return tuple(names)


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
    #: the registry's defaults over the constructor's (the reference scripts' SGD momentum 0.9)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    #: the parameter groups to build it over, from the model and the arguments it takes out of them
    #: (default: all parameters, one group)
    param_groups: Callable[[nn.Module, dict[str, Any]], Any] | None = None

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        """The names a config or search space may set (``beta1``/``beta2`` stand for ``betas``)."""
        return constructor_hyperparameters(self.cls)

    def build(self, model: nn.Module, hparams: Mapping[str, Any]) -> torch.optim.Optimizer:
        kwargs = {**self.defaults, **hparams}
        params = model.parameters() if self.param_groups is None else self.param_groups(model, kwargs)
        if self.needs_model:
            kwargs["model"] = model
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
                      needs_model=True),
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


def build_optimizer(name: str, model: nn.Module, hparams: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``model.parameters()`` with constructor arguments ``hparams``
    (``weight_decay`` as the optimizer itself means it; see :func:`sassha_tune.config.spaces.to_hparams`)."""
    return optimizer_info(name).build(model, dict(hparams))
