"""SASSHA: sharpness-aware adaptive second-order optimization with a stable (square-rooted) Hessian.

Written from a description of the official code's behaviour (``docs/optimizer.md``), not from the code
(which has no license). The default configuration reproduces the official image-classification
("IC") variant step for step, including its two undocumented details: the Hessian is evaluated at
the *hybrid point* and the bias correction counts *steps*, not Hessian refreshes. Both can be
switched to the "paper" reading (``hessian_point="perturbed"``, ``bias_correction="refreshes"``).

:class:`HessianPreconditioned` holds what SASSHA and M-SASSHA (:mod:`.msassha`) share: the lazy
Hutchinson refresh, the private probe generator, the preconditioned update and a complete
``state_dict`` (including the generator's state, which the official code does not save).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed
from .base import (
    Closure,
    check_betas,
    check_max_grad_norm,
    check_positive,
    clear_grads,
    clip_grads_,
    sam_perturbation,
    second_pass_context,
)
from .hessian import hutchinson_diagonal, make_generator

HessianPower = float | Callable[[int], float]

_HESSIAN_POINTS = ("reference", "perturbed")
_BIAS_CORRECTIONS = ("steps", "refreshes")
PERTURBATION_GRADS = ("local", "global")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def state_dtype(p: Tensor) -> torch.dtype:
    """Optimizer state is kept in fp32 for half-precision parameters, in the parameter's dtype otherwise."""
    return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {', '.join(map(repr, choices))})")


def check_int(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= {minimum})")


class HessianPreconditioned(torch.optim.Optimizer):
    """Shared machinery of SASSHA and M-SASSHA (not used directly).

    Per-parameter state: ``step`` (updates so far), ``hessian_step`` (steps in which the parameter
    had a gradient: it is refreshed when this is a multiple of ``lazy_hessian`` or below
    ``dense_refresh_steps``),
    ``hessian_refreshes``, ``exp_avg`` (m), ``exp_hessian_diag`` (v, EMA of |diag H| estimates)
    and ``bias_correction2`` (c = (1 - beta2^t)^alpha, frozen between refreshes).
    Optimizer-wide: the step count (for a scheduled ``hessian_power``) and the probe generator.
    """

    # -- construction ---------------------------------------------------------------------------

    def _init_common(
        self,
        *,
        lazy_hessian: int,
        n_samples: int,
        seed: int,
        dense_refresh_steps: int = 0,
        hessian_power: HessianPower,
        bias_correction: str,
        max_grad_norm: float | None,
        always_create_graph: bool,
        process_group: Any = None,
    ) -> None:
        check_int("lazy_hessian", lazy_hessian)
        check_int("n_samples", n_samples)
        check_int("dense_refresh_steps", dense_refresh_steps, minimum=0)
        check_choice("bias_correction", bias_correction, _BIAS_CORRECTIONS)
        check_max_grad_norm(max_grad_norm)
        if not callable(hessian_power):
            check_positive("hessian_power", hessian_power)
        self.lazy_hessian = lazy_hessian
        self.dense_refresh_steps = dense_refresh_steps
        self.n_samples = n_samples
        self.seed = int(seed)
        self.hessian_power = hessian_power
        self.bias_correction = bias_correction
        self.max_grad_norm = max_grad_norm
        self.always_create_graph = bool(always_create_graph)
        self._generator: torch.Generator | None = None
        self._global_step = 0
        self.process_group = process_group

    @staticmethod
    def _check_group_args(lr: float, betas: tuple[float, float], weight_decay: float, eps: float) -> None:
        check_positive("lr", lr)
        check_betas(betas)
        check_positive("weight_decay", weight_decay)
        check_positive("eps", eps)

    # -- helpers used by step() ----------------------------------------------------------------

    def _alpha(self) -> float:
        """The Hessian power for the current step (``hessian_power(step)`` if it is a schedule)."""
        hp = self.hessian_power
        return float(hp(self._global_step)) if callable(hp) else float(hp)

    def _param_state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if "exp_avg" not in state:
            dtype = state_dtype(p)
            state["step"] = 0
            state["hessian_step"] = 0
            state["hessian_refreshes"] = 0
            state["bias_correction2"] = 1.0
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_hessian_diag"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return state

    def _all_reduce_mean(self, tensors: list[Tensor]) -> None:
        """Average ``tensors`` across ranks (one flat all-reduce per dtype) under torch.distributed;
        nothing at all in a single process (see :mod:`sassha_tune.distributed`)."""
        group = distributed.active_group(self.process_group)
        if group is not None:
            distributed.all_reduce_mean(tensors, group)

    def _due_for_refresh(self, p: Tensor) -> bool:
        # Dense start (off by default, as in the reference): with lazy refreshes the first
        # one-probe estimate is used for k steps, and where it is near zero the step is
        # lr * m / eps; on models without normalization layers that blows up within ~10 steps
        # (docs/optimizer.md, "Dense start"). Refreshing every step for a while lets the EMA
        # average many probes and follow the early, fast-changing curvature first.
        h = self.state[p].get("hessian_step", 0)
        return h < self.dense_refresh_steps or h % self.lazy_hessian == 0

    def _candidates(self) -> list[list[Tensor]]:
        return [[p for p in group["params"] if p.requires_grad] for group in self.param_groups]

    def probe_generator(self, device: torch.device) -> torch.Generator:
        """The private Rademacher generator, created (seeded with ``seed``) at the first refresh on
        the device of the first refreshed parameter: a CPU generator for CPU parameters."""
        if self._generator is None:
            self._generator = make_generator(self.seed, device)
        return self._generator

    def hessian_diagonal(self, grads: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        """Hutchinson estimate of diag(H) for ``params`` from ``grads`` (which carry a graph).

        ``n_samples`` Rademacher probes, one tensor per parameter in the given (``param_groups``)
        order, from the optimizer's generator; the graph is freed after the last sample. A gradient
        with no graph (the loss is at most linear in that parameter) contributes a zero product,
        but its probe is still drawn so that the stream does not shift.
        """
        return hutchinson_diagonal(grads, params, self.probe_generator(params[0].device), n_samples=self.n_samples)

    def _decay_and_moments(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], hess: list[Tensor | None]
    ) -> tuple[list[dict[str, Any]], list[Tensor], list[bool], list[int]]:
        """What every Hessian-preconditioned update starts with (SASSHA, M-SASSHA, Sophia-H):
        decoupled weight decay, ``step += 1``, ``m <- beta1 m + (1 - beta1) g`` and, for the
        parameters refreshed this step (``hess[i]`` not None), ``v <- beta2 v + (1 - beta2) hess``.

        Returns the states, the working copies of the parameters (in the state dtype; write them
        back with :meth:`_write_back`), which ones are low precision, and the refreshed indices.
        """
        wd, lr = group["weight_decay"], group["lr"]
        beta1, beta2 = group["betas"]
        states = [self._param_state(p) for p in params]
        low = [p.dtype != state_dtype(p) for p in params]
        work = [
            p.detach().to(state_dtype(p)) if lo else p.detach() for p, lo in zip(params, low, strict=True)
        ]
        if wd != 0:
            torch._foreach_mul_(work, 1.0 - lr * wd)
        for st in states:
            st["step"] += 1
        exp_avgs = [st["exp_avg"] for st in states]
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
        refreshed = [i for i, h in enumerate(hess) if h is not None]
        if refreshed:
            v_r = [states[i]["exp_hessian_diag"] for i in refreshed]
            torch._foreach_mul_(v_r, beta2)
            torch._foreach_add_(v_r, [hess[i] for i in refreshed], alpha=1.0 - beta2)  # type: ignore[misc]
            for i in refreshed:
                states[i]["hessian_refreshes"] += 1
        return states, work, low, refreshed

    @staticmethod
    def _write_back(params: list[Tensor], work: list[Tensor], low: list[bool]) -> None:
        """Copy the fp32 working copies back into half-precision parameters (others were updated in place)."""
        for p, w, lo in zip(params, work, low, strict=True):
            if lo:
                p.detach().copy_(w)

    def _precondition_update(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        hess: list[Tensor | None],
        alpha: float,
    ) -> None:
        """Decoupled weight decay, then m/v EMAs and ``theta -= lr/(1-beta1^t) * m / (v^alpha / c + eps)``.

        ``hess[i]`` is the new |diag H| estimate of ``params[i]`` on its refresh steps, ``None``
        otherwise (v and c then stay frozen). ``grads`` are in the state dtype.
        """
        if not params:
            return
        states, work, low, refreshed = self._decay_and_moments(group, params, grads, hess)
        lr, eps = group["lr"], group["eps"]
        beta1, beta2 = group["betas"]
        for i in refreshed:
            st = states[i]
            t = st["step"] if self.bias_correction == "steps" else st["hessian_refreshes"]
            st["bias_correction2"] = (1.0 - beta2**t) ** alpha

        exp_hd = [st["exp_hessian_diag"] for st in states]
        denom = torch._foreach_pow(exp_hd, alpha)
        torch._foreach_div_(denom, [st["bias_correction2"] for st in states])
        torch._foreach_add_(denom, eps)
        step_sizes = [-lr / (1.0 - beta1 ** st["step"]) for st in states]
        torch._foreach_addcdiv_(work, [st["exp_avg"] for st in states], denom, step_sizes)
        self._write_back(params, work, low)

    @staticmethod
    def _split_active(
        candidates: list[list[Tensor]], grads: tuple[Tensor | None, ...]
    ) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
        """Per group: the parameters that received a gradient, and those gradients."""
        it = iter(grads)
        params_out, grads_out = [], []
        for ps in candidates:
            pairs = [(p, g) for p in ps if (g := next(it)) is not None]
            params_out.append([p for p, _ in pairs])
            grads_out.append([g for _, g in pairs])
        return params_out, grads_out

    def _finish_grads(
        self,
        params: list[Tensor],
        grads: list[Tensor | None],
        max_grad_norm: float | None,
        estimate: list[Tensor] | None = None,
    ):
        """Detach the update gradients, average them across ranks (together with the signed Hessian
        ``estimate`` of this step, in the same all-reduce), clip them, expose them as ``p.grad`` and
        cast to the state dtype."""
        out = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)]
        self._all_reduce_mean(out + list(estimate or []))
        clip_grads_(out, max_grad_norm)
        for p, g in zip(params, out, strict=True):
            p.grad = g
        return [g.to(state_dtype(p)) for p, g in zip(params, out, strict=True)]

    # -- checkpointing ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The usual optimizer state plus the step count and the probe generator's state (a tensor)."""
        sd = super().state_dict()
        extra: dict[str, Any] = {"global_step": self._global_step}
        if self._generator is not None:
            extra["generator_state"] = self._generator.get_state().clone()
            extra["generator_device"] = str(self._generator.device)
        sd["hessian_preconditioned"] = extra
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        sd = dict(state_dict)
        extra = sd.pop("hessian_preconditioned", {})
        super().load_state_dict(sd)
        # torch casts floating state to the parameter's dtype: keep it fp32 for half parameters
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                for key in ("exp_avg", "exp_hessian_diag", "hessian"):
                    if key in st:
                        st[key] = st[key].to(state_dtype(p))
        self._global_step = int(extra.get("global_step", 0))
        if "generator_state" in extra:
            device = torch.device(extra["generator_device"])
            mine = next((p.device for g in self.param_groups for p in g["params"]), device)
            if mine.type == device.type:
                device = mine  # a checkpoint saved by rank 0 on cuda:0, loaded by rank r on cuda:r
            generator = torch.Generator(device=device)
            generator.set_state(extra["generator_state"].cpu())
            self._generator = generator
        else:
            self._generator = None


class Sassha(HessianPreconditioned):
    r"""SASSHA (Shin et al., ICML 2025), official image-classification variant by default.

    Each ``step(closure)`` (see :mod:`sassha_tune.optim.base`):

    1. pass 1 at θ: ``g = ∇L_B(θ)``; the returned loss is this one, detached;
    2. perturbation ``e = rho * g / (||g|| + perturb_eps)``, ``||g||`` the global norm over all groups
       (``rho``, ``perturb_eps`` per group); ``θ ← θ + e``;
    3. pass 2 on the same batch at θ + e, with BatchNorm running statistics frozen when ``model`` is
       given; the gradient graph is kept only on Hessian-refresh steps;
    4. restore ``θ ← (θ + e) − e`` in place on ``.data`` (no autograd version bump); ``e`` is freed,
       never kept in the state;
    5. on refresh steps (every ``lazy_hessian`` steps, starting at the first, and each of the first
       ``dense_refresh_steps`` steps): Hutchinson estimate
       ``ĥ = mean_s z_s ⊙ (H z_s)`` with Rademacher probes from the optimizer's own generator;
       ``v ← β2 v + (1 − β2)|ĥ|`` and ``c ← (1 − β2^t)^α``; between refreshes v and c are frozen;
    6. ``θ ← θ (1 − lr·weight_decay)`` (decoupled), ``m ← β1 m + (1 − β1) g̃`` with g̃ the
       pass-2 gradient, ``θ ← θ − lr / (1 − β1^t) · m / (v^α / c + eps)``.

    Args:
        params: parameters or parameter groups (groups may set ``lr``, ``betas``, ``weight_decay``,
            ``rho``, ``perturb_eps``, ``eps``).
        lr: learning rate η.
        betas: (β1, β2): EMA rates of the gradient and of |diag H|.
        weight_decay: decoupled weight decay λ: every step θ is multiplied by ``1 − lr·λ`` before
            the update (all parameters, BN and biases included, as in the reference).
        rho: perturbation radius (absolute, L2 over all parameters). ``0`` still runs two passes.
        lazy_hessian: k: the Hessian estimate is refreshed at steps 1, k+1, 2k+1, ...
        dense_refresh_steps: N (default 0, the reference): also refresh at every one of the first
            N steps (a parameter is refreshed when its gradient-step count h satisfies h < N or
            h mod k = 0). Not in the paper; on models without normalization layers a small ``eps``
            with k > 1 diverges within the first steps, and N = 50 together with eps >= 1e-4
            prevents it (docs/optimizer.md).
        n_samples: Hutchinson probes per refresh.
        perturb_eps: added to the gradient norm in the perturbation.
        eps: added to the denominator *after* the power.
        hessian_power: α, a float (0.5 in every published configuration), or a callable
            ``step -> α`` (``step`` is 1-based, called once per ``step()``). As in the reference,
            the numerator uses the current α and ``c`` keeps the α of the last refresh.
        adaptive: ASAM-style perturbation ``e = rho θ² g / (|| |θ| g || + perturb_eps)``.
        hessian_point: ``"reference"`` (default): the Hessian-vector product is taken from the
            pass-2 graph *after* the in-place restore, so saved parameters read θ while saved
            activations are those of θ + e (the official code's "hybrid point").
            ``"perturbed"``: the product is taken before restoring, i.e. at θ + e (the paper's text).
        bias_correction: ``"steps"`` (default, official): ``c = (1 − β2^t)^α`` with t the step
            count at the last refresh; ``"refreshes"``: t = the number of refreshes so far (the
            statistically unbiased choice; changes the dynamics, see the reference §1.2).
        seed: seed of the private probe generator (CPU generator for CPU parameters, on the
            parameters' device otherwise: CPU and GPU runs draw different probes).
        max_grad_norm: clip the pass-2 gradient (the one the update uses) to this global L2 norm.
            ``None`` (default, as in the reference): no clipping.
        model: the module being trained, so pass 2 can freeze its BatchNorm running statistics.
            Without it pass 2 moves them (wrap the closure yourself, see ``frozen_running_stats``).
        always_create_graph: debugging: keep the pass-2 graph on every step, as the official
            training loop does (same trajectory, more memory).
        perturbation_grad: under torch.distributed data parallelism, the gradient the perturbation
            is built from: ``"local"`` (default, as the reference): each rank's own pass-1 gradient,
            so each rank perturbs differently and pass 1 costs no communication; ``"global"``: the
            pass-1 gradient averaged across ranks (one more all-reduce per step), so every rank
            perturbs like a single process on the whole batch. Ignored in a single process. With
            ``"local"`` θ is saved during the step and restored by copy (one parameter-sized
            buffer), not as (θ + e) − e, whose rounding would differ between ranks.
        process_group: the group to average over (default: the default group). Under
            torch.distributed (initialized, world size > 1) the pass-2 gradient and, on refresh
            steps, the signed Hutchinson estimate are averaged across ranks in one coalesced
            all-reduce; every rank draws the same probes (same ``seed``), so the average is
            ``z ⊙ (H̄ z)`` for the mean Hessian H̄. Run the model without DDP's hooks (plain module,
            or inside ``ddp_model.no_sync()``). See ``docs/distributed.md``.

    The state is fp32 for half-precision parameters. ``state_dict()`` also holds the step count
    and the probe generator, so a resumed run continues the exact trajectory.
    """

    def __init__(
        self,
        params,
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        rho: float = 0.0,
        lazy_hessian: int = 10,
        dense_refresh_steps: int = 0,
        n_samples: int = 1,
        perturb_eps: float = 1e-12,
        eps: float = 1e-4,
        hessian_power: HessianPower = 0.5,
        adaptive: bool = False,
        hessian_point: str = "reference",
        bias_correction: str = "steps",
        seed: int = 0,
        max_grad_norm: float | None = None,
        model: nn.Module | None = None,
        always_create_graph: bool = False,
        perturbation_grad: str = "local",
        process_group: Any = None,
    ) -> None:
        self._check_group_args(lr, betas, weight_decay, eps)
        check_positive("rho", rho)
        check_positive("perturb_eps", perturb_eps)
        check_choice("hessian_point", hessian_point, _HESSIAN_POINTS)
        check_choice("perturbation_grad", perturbation_grad, PERTURBATION_GRADS)
        defaults = dict(
            lr=lr, betas=tuple(betas), weight_decay=weight_decay, rho=rho, perturb_eps=perturb_eps, eps=eps
        )
        super().__init__(params, defaults)
        self._init_common(
            lazy_hessian=lazy_hessian,
            dense_refresh_steps=dense_refresh_steps,
            n_samples=n_samples,
            seed=seed,
            hessian_power=hessian_power,
            bias_correction=bias_correction,
            max_grad_norm=max_grad_norm,
            always_create_graph=always_create_graph,
            process_group=process_group,
        )
        self.adaptive = bool(adaptive)
        self.hessian_point = hessian_point
        self.perturbation_grad = perturbation_grad
        self.model = model

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """One SASSHA step on the batch ``closure`` evaluates; returns the clean (pass-1) loss."""
        if closure is None:
            raise RuntimeError(
                "Sassha.step needs a closure that returns the loss (see sassha_tune.optim.base)"
            )
        candidates = self._candidates()
        flat = [p for ps in candidates for p in ps]
        clear_grads(flat)

        # pass 1 at theta
        with torch.enable_grad():
            loss = closure()
            first = torch.autograd.grad(loss, flat, allow_unused=True)
        params, grads1 = self._split_active(candidates, first)
        del first
        active = [p for ps in params for p in ps]
        if not active:
            return loss.detach()
        self._global_step += 1
        alpha = self._alpha()
        refresh = [self._due_for_refresh(p) for p in active]
        for p in active:
            self._param_state(p)["hessian_step"] += 1
        need_graph = self.always_create_graph or any(refresh)
        group = distributed.active_group(self.process_group)
        if group is not None and self.perturbation_grad == "global":
            distributed.all_reduce_mean([g for gs in grads1 for g in gs], group)

        # perturb: e is written over the pass-1 gradients, which are not needed any more
        groups = self.param_groups
        es = sam_perturbation(
            params,
            grads1,
            [g["rho"] for g in groups],
            [g["perturb_eps"] for g in groups],
            adaptive=self.adaptive,
            inplace=True,
        )
        flat_e = [e for group_e in es for e in group_e]
        del es, grads1
        data = [p.data for p in active]
        # Under data parallelism with local perturbations e differs between ranks, and so would the
        # rounding of (theta + e) - e: ranks would drift apart. Restore by copy there (exact).
        saved = torch._foreach_mul(data, 1.0) if group is not None and self.perturbation_grad == "local" else None
        torch._foreach_add_(data, flat_e)

        # pass 2 at theta + e on the same batch
        with torch.enable_grad(), second_pass_context(self.model):
            loss2 = closure()
            second = torch.autograd.grad(loss2, active, create_graph=need_graph, allow_unused=True)
        del loss2
        second = [torch.zeros_like(p) if g is None else g for p, g in zip(active, second, strict=True)]
        due = [i for i, r in enumerate(refresh) if r]
        estimate: list[Tensor] = []
        if due and self.hessian_point == "perturbed":
            estimate = self.hessian_diagonal([second[i] for i in due], [active[i] for i in due])
        # restore on .data: no version bump, so the graph's saved parameters now read theta
        if saved is None:
            torch._foreach_sub_(data, flat_e)
        else:
            torch._foreach_copy_(data, saved)
        del flat_e, data, saved
        if due and self.hessian_point == "reference":
            estimate = self.hessian_diagonal([second[i] for i in due], [active[i] for i in due])
        grads = self._finish_grads(active, second, self.max_grad_norm, estimate)
        del second

        hess: list[Tensor | None] = [None] * len(active)
        if estimate:
            torch._foreach_abs_(estimate)
            for i, h in zip(due, estimate, strict=True):
                hess[i] = h.to(state_dtype(active[i]))
        start = 0
        for group, ps in zip(groups, params, strict=True):
            stop = start + len(ps)
            self._precondition_update(group, ps, grads[start:stop], hess[start:stop], alpha)
            start = stop
        return loss.detach()
