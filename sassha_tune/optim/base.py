"""The step protocol every optimizer in sassha-tune follows.

``optimizer.step(closure)``: ``closure()`` runs the model on the *current* batch and returns the
loss; it does not call ``backward``. The optimizer clears the gradients, calls ``backward`` itself
as often as its method needs (one pass for SGD/AdamW, two for SAM and SASSHA, with
``create_graph`` only on the steps that take a Hessian-vector product), updates the parameters
and returns the loss of the first (clean) pass, detached.

So the trainer, and a user's own loop, is the same for every optimizer::

    for x, y in batches:
        loss = optimizer.step(lambda: loss_fn(model(x), y))

Two-pass optimizers evaluate the closure a second time at perturbed weights. That pass must not
move BatchNorm running statistics: pass ``model=`` to the optimizer, or wrap the second call
yourself with :func:`frozen_running_stats`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn

Closure = Callable[[], Tensor]

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


@contextmanager
def frozen_running_stats(model: nn.Module | None) -> Iterator[None]:
    """Run forward passes in train mode without touching BatchNorm running statistics.

    Inside, each BatchNorm layer normalizes with the statistics of the current batch (as in any
    training-mode forward) but neither ``running_mean``/``running_var`` nor
    ``num_batches_tracked`` change. (Setting momentum to 0, as the reference code does, leaves the
    running averages unchanged too but still increments ``num_batches_tracked``.)
    """
    if model is None:
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, _NORM_TYPES) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


def second_pass_context(model: nn.Module | None):
    """The context for a perturbed (second) pass: running statistics frozen when the model is known."""
    return frozen_running_stats(model) if model is not None else nullcontext()


def clear_grads(params: list[Tensor]) -> None:
    for p in params:
        p.grad = None


def trainable(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """All parameters of all groups, in ``param_groups`` order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def check_positive(name: str, value: float, *, allow_zero: bool = True) -> None:
    """Raise ``ValueError`` naming the argument when a hyperparameter is out of range."""
    bad = value < 0 or (value == 0 and not allow_zero)
    if bad or value != value:  # value != value catches NaN
        expected = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"Invalid {name}: {value!r} (expected {expected})")


def check_betas(betas: tuple[float, ...], *, name: str = "betas") -> None:
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid {name}[{i}]: {beta!r} (expected 0 <= beta < 1)")
