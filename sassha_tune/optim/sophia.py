"""Sophia-H (Liu et al., 2024) as the SASSHA reference scripts run it (no bias correction)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Closures, positive
from .functional import sophia_update_
from .preconditioned import OnePassPreconditioned, group_defaults

__all__ = ["SophiaH"]


class SophiaH(OnePassPreconditioned):
    r"""Sophia-H (Liu et al., 2024) as the SASSHA reference scripts run it (no bias correction).

    One pass per step; every ``lazy_hessian`` steps (from the first) a Hutchinson estimate ĥ
    (signed) enters ``v ← β2 v + (1 − β2) ĥ``. Every step: ``θ ← θ(1 − lr·weight_decay)``,
    ``m ← β1 m + (1 − β1) g``, ``θ ← θ − lr · sign(m) · min(|m| / (γ·max(v, 0) + eps), 1)`` with
    γ = ``clip_threshold``. Defaults follow Sophia's paper (betas (0.965, 0.99), γ 0.04); the
    reference scripts pass betas (0.9, 0.999), γ 0.05 and eps 1e-4. ``dense_refresh_steps`` as for
    :class:`~sassha_tune.optim.sassha.Sassha` (also refresh at each of the first N steps).
    """

    GROUP_CHECKS = {**OnePassPreconditioned.GROUP_CHECKS, "clip_threshold": positive("clip_threshold")}

    def __init__(
        self,
        params,
        lr: float = 6e-2,
        betas: tuple[float, float] = (0.965, 0.99),
        eps: float = 1e-12,
        weight_decay: float = 0.0,
        clip_threshold: float = 0.04,
        lazy_hessian: int = 10,
        dense_refresh_steps: int = 0,
        n_samples: int = 1,
        seed: int = 0,
        max_grad_norm: float | None = None,
        always_create_graph: bool = False,
        process_group: Any = None,
    ) -> None:
        super().__init__(params, group_defaults(locals()), seed=seed, process_group=process_group)

    @torch.no_grad()
    def step(self, closure: Closures | None = None) -> Tensor:  # type: ignore[override]
        loss, params, grads, hess = self._one_pass(closure)
        for group, ps, gs, hs in zip(self.param_groups, params, grads, hess, strict=True):
            if not ps:
                continue
            states, work, low, _ = self._decay_and_moments(group, ps, gs, hs)
            sophia_update_(
                work,
                [st["exp_avg"] for st in states],
                [st["exp_hessian_diag"] for st in states],
                lr=group["lr"], eps=group["eps"], clip_threshold=group["clip_threshold"],
            )
            self._write_back(ps, work, low)
        return loss
