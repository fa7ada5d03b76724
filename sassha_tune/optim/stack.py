"""A step of K optimizers at once, over models stacked into one batched computation (a trial pack).

A trial pack (:mod:`sassha_tune.training.packs`) stacks K members' parameters along a new leading
dimension and runs the model once per pass for all of them. Each member still owns a real
optimizer whose parameters are views of its slice of the stack. An optimizer that can take part
in such a step has a classmethod ``stacked_step(stack, members)``: its pass order, written next to
its ``step``, around the stacked passes, with each member's own arithmetic through the member's
optimizer. The pack calls it on the members' optimizer class and needs to know nothing of the
method. (An optimizer without ``stacked_step`` packs with each member stepping alone.)

The members are independent, so the gradient of the *summed* member losses w.r.t. the stacked
parameters holds each member's own gradient in its slice, and a Hessian-vector product of that
sum with stacked probes holds each member's own H z.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Stack", "StackMember", "stacked_grads", "set_member_grads"]


@dataclass
class Stack:
    """What a stacked step needs from the pack."""

    #: the stacked leaves (one per parameter of the model, member ``slot``'s slice at ``[slot]``)
    params: list[Tensor]
    #: one pass of every member on its own batch: (per-member losses, with their graph; outputs)
    forward: Callable[[], tuple[Tensor, Tensor]]
    #: the batched module, whose BatchNorm running statistics a second pass freezes
    module: nn.Module
    #: the context every forward runs in (mixed precision, or nothing)
    autocast: Callable[[], Any]


@dataclass
class StackMember:
    """One member of a stacked step: its optimizer over ``views`` of its slice ``slot``."""

    optimizer: Any
    views: list[Tensor]
    slot: int


def stacked_grads(loss: Tensor, params: list[Tensor], *, create_graph: bool = False) -> list[Tensor]:
    """The gradient of the summed member losses w.r.t. the stacked ``params`` (zeros where unused)."""
    with torch.enable_grad():
        total = loss.sum()
    raw = torch.autograd.grad(total, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, raw, strict=True)]


def set_member_grads(member: StackMember, grads: list[Tensor]) -> None:
    """Give the member's views their slice of the stacked ``grads`` as ``.grad``."""
    for v, g in zip(member.views, grads, strict=True):
        v.grad = g[member.slot]
