"""AdaHessian (Yao et al., 2021) as the SASSHA reference scripts run it."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Closures
from .functional import adahessian_update_, conv_kernel_average
from .preconditioned import OnePassPreconditioned, group_defaults

__all__ = ["AdaHessian"]


class AdaHessian(OnePassPreconditioned):
    r"""AdaHessian (Yao et al., 2021) as the SASSHA reference scripts run it.

    One pass per step; on refresh steps (every ``lazy_hessian``, from the first) a Hutchinson
    estimate ĥ replaces the stored one. For 4-D (convolution) weights the stored estimate is
    the mean of |ĥ| over the kernel's spatial dimensions, broadcast back. Every step:
    ``θ ← θ(1 − lr·weight_decay)``, ``m ← β1 m + (1 − β1) g``, ``v ← β2 v + (1 − β2) ĥ²`` (with the
    latest stored ĥ), ``θ ← θ − lr/(1 − β1^t) · m / ((v / (1 − β2^t))^{k/2} + eps)``, k =
    ``hessian_power`` (1). ``lazy_hessian`` defaults to 10, the reference scripts' value
    (the original AdaHessian refreshes every step: ``lazy_hessian=1``); ``dense_refresh_steps``
    as for :class:`~sassha_tune.optim.sassha.Sassha`.
    """

    def __init__(
        self,
        params,
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        lazy_hessian: int = 10,
        dense_refresh_steps: int = 0,
        n_samples: int = 1,
        seed: int = 0,
        max_grad_norm: float | None = None,
        always_create_graph: bool = False,
        process_group: Any = None,
    ) -> None:
        if callable(hessian_power):
            raise ValueError(f"Invalid hessian_power: {hessian_power!r} (expected a number >= 0)")
        super().__init__(params, group_defaults(locals()), seed=seed, process_group=process_group)

    def _param_state(self, p: Tensor) -> dict[str, Any]:
        state = super()._param_state(p)
        if "hessian" not in state:
            state["hessian"] = torch.zeros_like(state["exp_avg"])
        return state

    @torch.no_grad()
    def step(self, closure: Closures | None = None) -> Tensor:  # type: ignore[override]
        loss, params, grads, hess = self._one_pass(closure)
        for group, ps, gs, hs in zip(self.param_groups, params, grads, hess, strict=True):
            if not ps:
                continue
            states = [self._param_state(p) for p in ps]
            for h, st in zip(hs, states, strict=True):
                if h is not None:
                    st["hessian"].copy_(conv_kernel_average(h))
            # v is AdaHessian's own (an EMA of ĥ², updated every step), so no estimate is passed here
            states, work, low, _ = self._decay_and_moments(group, ps, gs, [None] * len(ps))
            beta1, beta2 = group["betas"]
            adahessian_update_(
                work,
                [st["exp_avg"] for st in states],
                [st["exp_hessian_diag"] for st in states],
                [st["hessian"] for st in states],
                [st["step"] for st in states],
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], hessian_power=group["hessian_power"],
            )
            self._write_back(ps, work, low)
        return loss
