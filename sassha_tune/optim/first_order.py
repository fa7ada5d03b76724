"""SGD and AdamW behind the sassha-tune step protocol (see :mod:`sassha_tune.optim.base`).

* :class:`SGD` — ``torch.optim.SGD`` (the registry sets momentum 0.9, as the reference scripts do),
  coupled L2 weight decay;
* :class:`AdamW` — ``torch.optim.AdamW``, decoupled weight decay.

:class:`OnePassStep` is what makes a ``torch.optim`` optimizer follow the protocol; SAM
(:mod:`.sam`) builds on it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..distributed import active_group, all_reduce_mean
from .base import (
    CheckedGroups,
    Closures,
    accumulated_backward,
    check_max_grad_norm,
    clear_grads,
    clip_grads_,
    grads_of,
    micro_batches,
    trainable,
)
from .stack import Stack, StackMember, set_member_grads, stacked_grads

__all__ = ["OnePassStep", "SGD", "AdamW"]


class OnePassStep(CheckedGroups):
    """``step(closure)`` for a ``torch.optim`` optimizer: clear grads, one backward, then
    :meth:`apply_update` (clip to the group key ``max_grad_norm``, the torch update).

    ``step()`` without a closure is :meth:`apply_update` on the gradients already in ``.grad``.
    Under torch.distributed (initialized, world size > 1; ``process_group`` or the default group)
    ``step(closure)`` averages the gradients across ranks in one flat all-reduce per dtype before
    clipping (run the model without DDP's hooks); ``step()`` without a closure does not (a loop of
    your own has averaged them already).
    """

    GROUP_CHECKS = {"max_grad_norm": check_max_grad_norm}
    SAME_IN_EVERY_GROUP = ("max_grad_norm",)

    def __init__(
        self, params, *args: Any, max_grad_norm: float | None = None, process_group: Any = None, **kwargs: Any
    ) -> None:
        super().__init__(params, *args, **kwargs)  # type: ignore[call-arg]
        self.process_group = process_group
        self._extend_defaults({"max_grad_norm": max_grad_norm})

    def _all_reduce_grads(self) -> None:
        group = active_group(self.process_group)
        if group is not None:
            all_reduce_mean(grads_of(trainable(self)), group)

    def _clip(self) -> None:
        clip_grads_(grads_of(trainable(self)), self.param_groups[0]["max_grad_norm"])

    def apply_update(self) -> None:
        """The update from the gradients in ``.grad``: clipped to ``max_grad_norm``, then the torch
        optimizer's own ``step()``."""
        self._clip()
        super().step()  # type: ignore[misc]  # the torch optimizer's update (next in the MRO)

    def step(self, closure: Closures | None = None):  # type: ignore[override]
        if closure is None:
            self.apply_update()
            return None
        closures = micro_batches(closure, type(self).__name__)
        clear_grads(trainable(self))
        loss = accumulated_backward(closures)
        self._all_reduce_grads()
        self.apply_update()
        return loss.detach()

    @classmethod
    @torch.no_grad()
    def stacked_step(cls, stack: Stack, members: list[StackMember]) -> tuple[Tensor, Tensor]:
        """:meth:`step` for every member of a trial pack (:mod:`.stack`): one stacked pass, then
        each member's update from its slice of the gradient (``step()`` without a closure)."""
        with torch.enable_grad(), stack.autocast():
            loss, out = stack.forward()
        grads = stacked_grads(loss, stack.params)
        for m in members:
            set_member_grads(m, grads)
            m.optimizer.step()
        return loss.detach(), out.detach()


class SGD(OnePassStep, torch.optim.SGD):
    """``torch.optim.SGD`` (coupled L2 weight decay, as the reference configs use it)."""


class AdamW(OnePassStep, torch.optim.AdamW):
    """``torch.optim.AdamW`` (decoupled weight decay: shrink by ``1 - lr * weight_decay`` per step)."""
