"""SASSHA's peers behind the sassha-tune step protocol (see :mod:`sassha_tune.optim.base`)."""

from __future__ import annotations

import torch

from .base import Closure, clear_grads, trainable


class _OnePassStep:
    """``step(closure)`` for first-order optimizers: clear grads, one backward, the parent's update."""

    def step(self, closure: Closure | None = None):  # type: ignore[override]
        if closure is None:
            return super().step()  # type: ignore[misc]
        clear_grads(trainable(self))  # type: ignore[arg-type]
        with torch.enable_grad():
            loss = closure()
            loss.backward()
        super().step()  # type: ignore[misc]
        return loss.detach()


class SGD(_OnePassStep, torch.optim.SGD):
    """``torch.optim.SGD`` (coupled L2 weight decay, as the reference configs use it)."""


class AdamW(_OnePassStep, torch.optim.AdamW):
    """``torch.optim.AdamW`` (decoupled weight decay: shrink by ``1 - lr * weight_decay`` per step)."""
