"""SASSHA's peers behind the sassha-tune step protocol (see :mod:`sassha_tune.optim.base`).

Semantics follow how the SASSHA reference scripts build them (``docs/optimizer.md``):

* :class:`SGD` — ``torch.optim.SGD`` (the registry sets momentum 0.9), coupled L2 weight decay;
* :class:`AdamW` — ``torch.optim.AdamW``, decoupled weight decay;
* :class:`SAMSGD` / :class:`SAMAdamW` — SAM (optionally ASAM, ``adaptive=True``) around those two;
* :class:`AdaHessian` — Hutchinson diag(H), EMA of its square, spatial averaging over conv kernels;
* :class:`SophiaH` — Hutchinson diag(H) every k steps, clipped sign-momentum update.

Why written here rather than taken from ``pytorch-optimizer`` (not a dependency): every optimizer
must follow one ``step(closure)`` protocol (the optimizer runs its own backward passes, builds
the double-backward graph only on refresh steps, freezes BatchNorm statistics in a second pass),
draw its probes from the shared :mod:`.hessian` module (so that probe streams are comparable
across optimizers and with the sharpness metrics), share SAM's perturbation with SASSHA
(:func:`.base.sam_perturbation`), and reproduce the reference repository's exact variants
(e.g. AdaHessian's ``lazy_hessian``, Sophia-H without bias correction), which third-party
versions do not all match.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed
from .base import (
    Closure,
    check_max_grad_norm,
    check_positive,
    clear_grads,
    clip_grads_,
    sam_perturbation,
    second_pass_context,
    trainable,
)
from .sassha import PERTURBATION_GRADS, HessianPreconditioned, check_choice, check_int, state_dtype


class _OnePassStep:
    """``step(closure)`` for first-order optimizers: clear grads, one backward, clip, the parent's update.

    Under torch.distributed (initialized, world size > 1; ``process_group`` or the default group)
    ``step(closure)`` averages the gradients across ranks in one flat all-reduce per dtype before
    clipping (run the model without DDP's hooks). ``step()`` without a closure does not.
    """

    def __init__(
        self, params, *args: Any, max_grad_norm: float | None = None, process_group: Any = None, **kwargs: Any
    ) -> None:
        check_max_grad_norm(max_grad_norm)
        super().__init__(params, *args, **kwargs)  # type: ignore[call-arg]
        self.max_grad_norm = max_grad_norm
        self.process_group = process_group

    def _all_reduce_grads(self) -> None:
        group = distributed.active_group(self.process_group)
        if group is not None:
            distributed.all_reduce_mean([p.grad for p in trainable(self) if p.grad is not None], group)  # type: ignore[arg-type]

    def _clip(self) -> None:
        self._all_reduce_grads()
        grads = [p.grad for p in trainable(self) if p.grad is not None]  # type: ignore[arg-type]
        clip_grads_(grads, self.max_grad_norm)

    def step(self, closure: Closure | None = None):  # type: ignore[override]
        if closure is None:
            return super().step()  # type: ignore[misc]
        clear_grads(trainable(self))  # type: ignore[arg-type]
        with torch.enable_grad():
            loss = closure()
            loss.backward()
        self._clip()
        super().step()  # type: ignore[misc]
        return loss.detach()


class SGD(_OnePassStep, torch.optim.SGD):
    """``torch.optim.SGD`` (coupled L2 weight decay, as the reference configs use it)."""


class AdamW(_OnePassStep, torch.optim.AdamW):
    """``torch.optim.AdamW`` (decoupled weight decay: shrink by ``1 - lr * weight_decay`` per step)."""


class _SAMStep(_OnePassStep):
    """SAM (Foret et al.) around a torch optimizer: two passes, the base update at the restored point.

    ``rho``, ``adaptive`` and ``perturb_eps`` become param-group keys (groups may override them).
    The perturbation is :func:`.base.sam_perturbation` (the same function SASSHA uses): global
    gradient norm over all groups; with ``adaptive`` the ASAM element-wise version. Pass 2 runs on
    the same batch with BatchNorm running statistics frozen (``model=``). The original θ is
    copied back after pass 2 (exact restore, as the reference SAM does); the copy lives only
    during the step. ``max_grad_norm`` clips the pass-2 gradient before the base update.

    Under torch.distributed the pass-2 gradient is averaged across ranks; ``perturbation_grad``
    chooses the pass-1 gradient the perturbation uses: ``"local"`` (default, each rank's own, as
    the SASSHA reference does) or ``"global"`` (averaged first: one more all-reduce per step).
    """

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
        check_positive("rho", rho)
        check_positive("perturb_eps", perturb_eps)
        check_choice("perturbation_grad", perturbation_grad, PERTURBATION_GRADS)
        super().__init__(params, *args, max_grad_norm=max_grad_norm, **kwargs)
        self.perturbation_grad = perturbation_grad
        extra = dict(rho=rho, adaptive=bool(adaptive), perturb_eps=perturb_eps)
        self.defaults.update(extra)  # type: ignore[attr-defined]
        for group in self.param_groups:  # type: ignore[attr-defined]
            for key, value in extra.items():
                group.setdefault(key, value)
            check_positive("rho", group["rho"])
        self.model = model

    def step(self, closure: Closure | None = None):  # type: ignore[override]
        if closure is None:
            raise RuntimeError("SAM needs a closure that returns the loss (see sassha_tune.optim.base)")
        groups = self.param_groups  # type: ignore[attr-defined]
        clear_grads(trainable(self))  # type: ignore[arg-type]
        with torch.enable_grad():
            loss = closure()
            loss.backward()
        params = [[p for p in g["params"] if p.grad is not None] for g in groups]
        active = [p for ps in params for p in ps]
        if not active:
            return loss.detach()
        if any(g["adaptive"] for g in groups) != all(g["adaptive"] for g in groups if g["params"]):
            raise ValueError("Invalid adaptive: must be the same in every parameter group")
        if self.perturbation_grad == "global":
            self._all_reduce_grads()
        with torch.no_grad():
            es = sam_perturbation(
                params,
                [[p.grad for p in ps] for ps in params],
                [g["rho"] for g in groups],
                [g["perturb_eps"] for g in groups],
                adaptive=bool(groups[0]["adaptive"]),
                inplace=True,
            )
            flat_e = [e for group_e in es for e in group_e]
            saved = torch._foreach_mul(active, 1.0)  # a copy of theta
            torch._foreach_add_(active, flat_e)
            del es, flat_e
        clear_grads(active)
        with torch.enable_grad(), second_pass_context(self.model):
            closure().backward()
        with torch.no_grad():
            torch._foreach_copy_(active, saved)
        del saved
        self._clip()
        super(_OnePassStep, self).step()  # the base optimizer's update
        return loss.detach()


class SAMSGD(_SAMStep, torch.optim.SGD):
    """SAM over SGD (momentum from the registry, coupled L2 ``weight_decay``); ``adaptive=True``: ASAM."""


class SAMAdamW(_SAMStep, torch.optim.AdamW):
    """SAM over AdamW (decoupled ``weight_decay``); ``adaptive=True``: ASAM."""


class _HutchinsonOnePass(HessianPreconditioned):
    """One pass with the gradient graph kept on refresh steps only; Hutchinson diag(H) from it."""

    def _one_pass(self, closure: Closure | None):
        if closure is None:
            raise RuntimeError(f"{type(self).__name__}.step needs a closure that returns the loss")
        candidates = self._candidates()
        flat = [p for ps in candidates for p in ps]
        clear_grads(flat)
        need_graph = self.always_create_graph or any(self._due_for_refresh(p) for p in flat)
        with torch.enable_grad():
            loss = closure()
            raw = torch.autograd.grad(loss, flat, create_graph=need_graph, allow_unused=True)
        params, grads_g = self._split_active(candidates, raw)
        del raw
        active = [p for ps in params for p in ps]
        grads = [g for gs in grads_g for g in gs]
        self._global_step += 1
        due = [i for i, p in enumerate(active) if self._due_for_refresh(p)]
        for p in active:
            self._param_state(p)["hessian_step"] += 1
        estimate: list[Tensor] = []
        if due:
            estimate = self.hessian_diagonal([grads[i] for i in due], [active[i] for i in due])
        grads = self._finish_grads(active, grads, self.max_grad_norm, estimate)
        hess: list[Tensor | None] = [None] * len(active)
        for i, h in zip(due, estimate, strict=True):
            hess[i] = h.to(state_dtype(active[i]))
        return loss.detach(), params, grads, hess

    def _param_state(self, p: Tensor) -> dict[str, Any]:
        state = super()._param_state(p)
        if "hessian" not in state:
            state["hessian"] = torch.zeros_like(state["exp_avg"])
        return state

    @staticmethod
    def _split(flat: list, params: list[list[Tensor]]):
        start = 0
        for ps in params:
            yield flat[start : start + len(ps)]
            start += len(ps)


class AdaHessian(_HutchinsonOnePass):
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
        self._check_group_args(lr, betas, weight_decay, eps)
        check_positive("hessian_power", hessian_power)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, hessian_power=hessian_power
        )
        super().__init__(params, defaults)
        self._init_common(
            lazy_hessian=lazy_hessian,
            dense_refresh_steps=dense_refresh_steps,
            n_samples=n_samples,
            seed=seed,
            hessian_power=hessian_power,
            bias_correction="steps",
            max_grad_norm=max_grad_norm,
            always_create_graph=always_create_graph,
            process_group=process_group,
        )

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        loss, params, grads, hess = self._one_pass(closure)
        for group, ps, gs, hs in zip(
            self.param_groups, params, self._split(grads, params), self._split(hess, params), strict=True
        ):
            if not ps:
                continue
            states = [self._param_state(p) for p in ps]
            for p, h, st in zip(ps, hs, states, strict=True):
                if h is None:
                    continue
                if p.dim() == 4:
                    h = h.abs().mean(dim=(2, 3), keepdim=True).expand_as(h)
                st["hessian"].copy_(h)
            # v is AdaHessian's own (an EMA of ĥ², updated every step), so no estimate is passed here
            states, work, low, _ = self._decay_and_moments(group, ps, gs, [None] * len(ps))
            lr, eps, power = group["lr"], group["eps"], group["hessian_power"]
            beta1, beta2 = group["betas"]
            ms = [st["exp_avg"] for st in states]
            vs = [st["exp_hessian_diag"] for st in states]
            hss = [st["hessian"] for st in states]
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, hss, hss, value=1.0 - beta2)
            denom = torch._foreach_div(vs, [1.0 - beta2 ** st["step"] for st in states])
            torch._foreach_pow_(denom, power / 2)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(work, ms, denom, [-lr / (1.0 - beta1 ** st["step"]) for st in states])
            self._write_back(ps, work, low)
        return loss


class SophiaH(_HutchinsonOnePass):
    r"""Sophia-H (Liu et al., 2024) as the SASSHA reference scripts run it (no bias correction).

    One pass per step; every ``lazy_hessian`` steps (from the first) a Hutchinson estimate ĥ
    (signed) enters ``v ← β2 v + (1 − β2) ĥ``. Every step: ``θ ← θ(1 − lr·weight_decay)``,
    ``m ← β1 m + (1 − β1) g``, ``θ ← θ − lr · sign(m) · min(|m| / (γ·max(v, 0) + eps), 1)`` with
    γ = ``clip_threshold``. Defaults follow Sophia's paper (betas (0.965, 0.99), γ 0.04); the
    reference scripts pass betas (0.9, 0.999), γ 0.05 and eps 1e-4. ``dense_refresh_steps`` as for
    :class:`~sassha_tune.optim.sassha.Sassha` (also refresh at each of the first N steps).
    """

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
        self._check_group_args(lr, betas, weight_decay, eps)
        check_positive("clip_threshold", clip_threshold, allow_zero=False)
        check_int("lazy_hessian", lazy_hessian)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, clip_threshold=clip_threshold
        )
        super().__init__(params, defaults)
        self._init_common(
            lazy_hessian=lazy_hessian,
            dense_refresh_steps=dense_refresh_steps,
            n_samples=n_samples,
            seed=seed,
            hessian_power=1.0,
            bias_correction="steps",
            max_grad_norm=max_grad_norm,
            always_create_graph=always_create_graph,
            process_group=process_group,
        )

    def _param_state(self, p: Tensor) -> dict[str, Any]:
        # Sophia keeps no separate estimate buffer: v is updated on refresh steps only
        return HessianPreconditioned._param_state(self, p)

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        loss, params, grads, hess = self._one_pass(closure)
        for group, ps, gs, hs in zip(
            self.param_groups, params, self._split(grads, params), self._split(hess, params), strict=True
        ):
            if not ps:
                continue
            states, work, low, _ = self._decay_and_moments(group, ps, gs, hs)
            lr, eps, gamma = group["lr"], group["eps"], group["clip_threshold"]
            ms = [st["exp_avg"] for st in states]
            vs = [st["exp_hessian_diag"] for st in states]
            denom = torch._foreach_clamp_min(vs, 0.0)
            torch._foreach_mul_(denom, gamma)
            torch._foreach_add_(denom, eps)
            ratio = torch._foreach_abs(ms)
            torch._foreach_div_(ratio, denom)
            torch._foreach_clamp_max_(ratio, 1.0)
            torch._foreach_mul_(ratio, torch._foreach_sign(ms))
            torch._foreach_add_(work, ratio, alpha=-lr)
            self._write_back(ps, work, low)
        return loss
