"""SAM (Foret et al., 2021) and ASAM around SGD and AdamW, as the SASSHA reference scripts run them.

* :class:`SAMSGD` — SAM over SGD (momentum 0.9 from the registry, coupled L2 ``weight_decay``);
* :class:`SAMAdamW` — SAM over AdamW (decoupled ``weight_decay``).

``adaptive=True`` gives ASAM. The perturbation is :func:`.functional.sam_perturbation`, the same
function SASSHA uses. A step is two public phases around the caller's passes, so a trial pack can
run them on its members' views of a stacked model: :meth:`SAMStep.perturb` after the first
backward, :meth:`SAMStep.restore_and_update` after the second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .base import (
    PERTURBATION_CHECKS,
    PERTURBATION_GRADS,
    Closures,
    accumulated_backward,
    clear_grads,
    flag,
    frozen_running_stats,
    micro_batches,
    one_of,
    second_pass_context,
    trainable,
)
from .first_order import OnePassStep
from .functional import sam_perturbation
from .stack import Stack, StackMember, set_member_grads, stacked_grads

__all__ = ["SAMStep", "Perturbation", "SAMSGD", "SAMAdamW"]


@dataclass
class Perturbation:
    """What :meth:`SAMStep.perturb` moved: the parameters and their values before (θ)."""

    params: list[Tensor]
    theta: list[Tensor]


class SAMStep(OnePassStep):
    """SAM around a torch optimizer: two passes, the base update at the restored point.

    ``rho``, ``adaptive``, ``perturb_eps`` and ``perturbation_grad`` are param-group keys (groups
    may set their own ``rho`` and ``perturb_eps``; ``adaptive`` and ``perturbation_grad`` are the
    same in every group). The perturbation uses the global gradient norm over all groups. Pass 2
    runs on the same batch with BatchNorm running statistics frozen (``model=``). The original θ is
    copied back after pass 2 (exact restore, as the reference SAM does); the copy lives only
    during the step. ``max_grad_norm`` clips the pass-2 gradient before the base update.

    Under torch.distributed the pass-2 gradient is averaged across ranks; ``perturbation_grad``
    chooses the pass-1 gradient the perturbation uses: ``"local"`` (default, each rank's own, as
    the SASSHA reference does) or ``"global"`` (averaged first: one more all-reduce per step).
    """

    GROUP_CHECKS = {
        **OnePassStep.GROUP_CHECKS,
        **PERTURBATION_CHECKS,
        "adaptive": flag("adaptive"),
        "perturbation_grad": one_of("perturbation_grad", PERTURBATION_GRADS),
    }
    SAME_IN_EVERY_GROUP = ("max_grad_norm", "adaptive", "perturbation_grad")

    def __init__(
        self,
        params,
        *args: Any,
        rho: float = 0.05,
        adaptive: bool = False,
        perturb_eps: float = 1e-12,
        model: nn.Module | None = None,
        max_grad_norm: float | None = None,
        perturbation_grad: str = "local",
        **kwargs: Any,
    ) -> None:
        super().__init__(params, *args, max_grad_norm=max_grad_norm, **kwargs)
        self._extend_defaults(
            dict(rho=rho, adaptive=bool(adaptive), perturb_eps=perturb_eps, perturbation_grad=perturbation_grad)
        )
        self.model = model

    def perturb(self) -> Perturbation | None:
        """Phase 1, after the first backward: ``θ ← θ + e`` from the gradients in ``.grad``
        (``None`` when no parameter has one: nothing to do this step). The gradients are cleared."""
        groups = self.param_groups
        params = [[p for p in g["params"] if p.grad is not None] for g in groups]
        active = [p for ps in params for p in ps]
        if not active:
            return None
        if groups[0]["perturbation_grad"] == "global":
            self._all_reduce_grads()
        with torch.no_grad():
            es = sam_perturbation(
                params,
                [[p.grad for p in ps] for ps in params],
                [g["rho"] for g in groups],
                [g["perturb_eps"] for g in groups],
                adaptive=groups[0]["adaptive"],
                inplace=True,
            )
            flat_e = [e for group_e in es for e in group_e]
            saved = torch._foreach_mul(active, 1.0)  # a copy of theta
            torch._foreach_add_(active, flat_e)
            del es, flat_e
        clear_grads(active)
        return Perturbation(active, saved)

    def restore_and_update(self, perturbation: Perturbation) -> None:
        """Phase 2, after the second backward (gradients at θ + e in ``.grad``): θ copied back,
        gradients averaged across ranks and clipped, the base optimizer's update."""
        with torch.no_grad():
            torch._foreach_copy_(perturbation.params, perturbation.theta)
        self._all_reduce_grads()
        self.apply_update()

    def step(self, closure: Closures | None = None):  # type: ignore[override]
        closures = micro_batches(closure, type(self).__name__)
        clear_grads(trainable(self))
        loss = accumulated_backward(closures)
        perturbation = self.perturb()
        if perturbation is None:
            return loss.detach()
        accumulated_backward(closures, context=lambda: second_pass_context(self.model))
        self.restore_and_update(perturbation)
        return loss.detach()

    @classmethod
    @torch.no_grad()
    def stacked_step(cls, stack: Stack, members: list[StackMember]) -> tuple[Tensor, Tensor]:
        """:meth:`step` for every member of a trial pack (:mod:`.stack`): each member's
        :meth:`perturb` and :meth:`restore_and_update` around the two stacked passes."""
        with torch.enable_grad(), stack.autocast():
            loss, out = stack.forward()
        grads1 = stacked_grads(loss, stack.params)
        perturbations = []
        for m in members:
            set_member_grads(m, grads1)
            perturbations.append(m.optimizer.perturb())
        del grads1
        with torch.enable_grad(), frozen_running_stats(stack.module), stack.autocast():
            loss2, _ = stack.forward()
        grads2 = stacked_grads(loss2, stack.params)
        del loss2
        for m, perturbation in zip(members, perturbations, strict=True):
            set_member_grads(m, grads2)
            m.optimizer.restore_and_update(perturbation)  # never None: every view has a gradient
        return loss.detach(), out.detach()


class SAMSGD(SAMStep, torch.optim.SGD):
    """SAM over SGD (momentum from the registry, coupled L2 ``weight_decay``); ``adaptive=True``: ASAM."""


class SAMAdamW(SAMStep, torch.optim.AdamW):
    """SAM over AdamW (decoupled ``weight_decay``); ``adaptive=True``: ASAM."""
