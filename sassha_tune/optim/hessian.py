"""Hessian-vector products and Hutchinson probes: the one implementation shared by the
second-order optimizers (SASSHA, M-SASSHA, AdaHessian, Sophia-H) and the sharpness metrics.

Everything here works on *lists* of tensors, one per parameter, in ``param_groups`` (or
``model.parameters()``) order, so that probes drawn by two implementations with the same
generator line up element for element.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .base import double_backward_context

TensorList = list[Tensor]


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A private generator for probes: CPU parameters get a CPU generator, others one on their device.

    Keeping probes off the global RNG makes two runs with the same ``seed`` draw the same probes
    whatever else (dropout, data order) consumed random numbers in between.
    """
    device = torch.device(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator


def rademacher_probes(params: Sequence[Tensor], generator: torch.Generator) -> TensorList:
    """One Rademacher tensor (entries in {-1, +1}) per parameter, drawn in order.

    Each is drawn as ``randint(0, 2) * 2 - 1`` in the parameter's dtype, parameter by parameter,
    which is the stream the reference implementation consumes: the same generator state gives the
    same probes here and there.
    """
    probes = []
    for p in params:
        z = torch.randint(0, 2, p.shape, generator=generator, device=p.device, dtype=p.dtype)
        probes.append(z.mul_(2).sub_(1))
    return probes


def hvp_from_grads(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    vectors: Sequence[Tensor],
    *,
    retain_graph: bool = True,
) -> TensorList:
    """H v by differentiating ``<grads, v>`` again; ``grads`` must carry a graph (``create_graph=True``).

    ``torch.autograd.grad`` is used rather than ``backward`` so nothing is accumulated into
    ``.grad`` and no reference cycle through module parameters keeps the graph alive.
    Parameters that do not influence the gradient get a zero product.
    """
    products = torch.autograd.grad(
        list(grads), list(params), grad_outputs=list(vectors), retain_graph=retain_graph, allow_unused=True
    )
    return [torch.zeros_like(p) if hv is None else hv for hv, p in zip(products, params, strict=False)]


def warm_up() -> None:
    """A Hessian-vector product of a one-element tensor, so that the process's next one imports
    nothing: torch imports its symbolic-shapes module and sympy at a process's first
    ``autograd.grad`` with ``grad_outputs`` (0.25-0.4 s on a 2-core CPU). Whoever times training
    calls this before the clock starts (the trainer, a ``task.train`` trial), so that no trial's
    ``train_seconds`` or ``sharpness_seconds`` counts an import; the warm trial worker calls it
    before its first job. It draws no random numbers and changes no setting; after the first call
    it costs well under a millisecond."""
    x = torch.ones(1, requires_grad=True)
    (g,) = torch.autograd.grad(x * x, x, create_graph=True)
    hvp_from_grads([g], [x], [torch.ones(1)], retain_graph=False)


class ProbeRequest(NamedTuple):
    """One Hutchinson estimate to compute: ``n_samples`` probes for ``params`` from ``generator``."""

    params: Sequence[Tensor]
    generator: torch.Generator
    n_samples: int


# hvp(probes, retain_graph): probes[r] is request r's probe list for this sample (None when the
# request has all its samples already); returns each request's products H z (None where no probes).
BatchedHVP = Callable[[list[TensorList | None], bool], list[TensorList | None]]


def hutchinson_diagonals(requests: Sequence[ProbeRequest], hvp: BatchedHVP) -> list[TensorList]:
    """Unbiased estimates of diag(H), one per request: the mean over its ``n_samples`` probes z of ``z * (H z)``.

    Sample by sample, each request still sampling draws one Rademacher tensor per parameter from its
    own generator, in request order, and then **one** ``hvp`` call computes all the products of
    that sample: one Hessian-vector product of the whole graph serves every request. A lone
    optimizer makes one request per parameter group (:func:`hutchinson_diagonal`); a trial pack one
    per member, whose products come from one product of the stacked model. ``retain_graph`` is
    False on the last sample only.
    """
    estimates = [[torch.zeros_like(p) for p in r.params] for r in requests]
    n_max = max((r.n_samples for r in requests), default=0)
    for s in range(n_max):
        probes = [rademacher_probes(r.params, r.generator) if s < r.n_samples else None for r in requests]
        products = hvp(probes, s < n_max - 1)
        for r, est, z, hz in zip(requests, estimates, probes, products, strict=True):
            if z is not None and hz is not None:
                torch._foreach_addcmul_(est, z, hz, value=1.0 / r.n_samples)
    return estimates


def graph_hvp(
    grads: Sequence[Sequence[Tensor]], params: Sequence[Sequence[Tensor]], *, retain_graph: bool = False
) -> BatchedHVP:
    """The :data:`BatchedHVP` of one gradient graph, for requests whose parameters are ``params[r]``
    with gradients ``grads[r]`` (computed with ``create_graph=True``).

    Only gradients that carry a graph are differentiated (the loss is at most linear in the
    others, so their own product is zero; their probes are still drawn, so the stream does not
    depend on which parameters happen to be linear). ``retain_graph`` keeps the graph after the
    last sample too.
    """

    def hvp(probes: list[TensorList | None], keep: bool) -> list[TensorList | None]:
        asked = [r for r, z in enumerate(probes) if z is not None]
        sel_grads = [g for r in asked for g in grads[r]]
        sel_params = [p for r in asked for p in params[r]]
        sel_probes = [z for r in asked for z in probes[r]]  # type: ignore[union-attr]
        live = [i for i, g in enumerate(sel_grads) if g.requires_grad]
        if live:
            products = hvp_from_grads(
                [sel_grads[i] for i in live], sel_params, [sel_probes[i] for i in live],
                retain_graph=retain_graph or keep,
            )
        else:  # z * 0 adds nothing: the estimate stays exactly 0
            products = [torch.zeros_like(p) for p in sel_params]
        out: list[TensorList | None] = [None] * len(probes)
        start = 0
        for r in asked:
            out[r] = products[start : start + len(params[r])]
            start += len(params[r])
        return out

    return hvp


def hutchinson_diagonal(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    generator: torch.Generator,
    *,
    n_samples: int = 1,
    retain_graph: bool = False,
) -> TensorList:
    """Unbiased estimate of diag(H) for ``params`` from their ``grads`` (which carry a graph):
    the mean over ``n_samples`` Rademacher probes z of ``z * (H z)``; see :func:`hutchinson_diagonals`
    (one request) and :func:`graph_hvp`. The graph behind ``grads`` is kept between samples and
    freed after the last one unless ``retain_graph`` is set.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    request = ProbeRequest(params, generator, n_samples)
    return hutchinson_diagonals([request], graph_hvp([grads], [params], retain_graph=retain_graph))[0]


class LossHessian:
    """The Hessian of ``loss_fn(model(inputs), targets)`` w.r.t. the trainable parameters, as an operator.

    The gradient graph is built once; each :meth:`hvp` call reuses it. :meth:`hvp_batched`
    computes several products in one vectorized backward (``is_grads_batched``), which pays on
    wide models where one product leaves the device idle; it falls back to a loop where the
    model's operations cannot be batched.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        inputs: Tensor,
        targets: Tensor,
    ) -> None:
        self.params: TensorList = [p for p in model.parameters() if p.requires_grad]
        with torch.enable_grad(), double_backward_context():
            self.loss = loss_fn(model(inputs), targets)
            self.grads: TensorList = list(torch.autograd.grad(self.loss, self.params, create_graph=True))
        self.hvp_count = 0

    def hvp(self, vectors: Sequence[Tensor]) -> TensorList:
        self.hvp_count += 1
        return [hv.detach() for hv in hvp_from_grads(self.grads, self.params, vectors, retain_graph=True)]

    def hvp_batched(self, batched_vectors: Sequence[Tensor]) -> TensorList:
        """``batched_vectors[i]`` has shape ``(B, *params[i].shape)``; returns products of the same shapes."""
        batch = batched_vectors[0].shape[0]
        try:
            products = torch.autograd.grad(
                self.grads,
                self.params,
                grad_outputs=list(batched_vectors),
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        except RuntimeError:
            # Some operators have no batching rule for their double backward; do it one by one.
            rows = [self.hvp([v[b] for v in batched_vectors]) for b in range(batch)]
            self.hvp_count -= batch
            products = [torch.stack([row[i] for row in rows]) for i in range(len(self.params))]
        self.hvp_count += batch
        return [
            torch.zeros_like(v) if hv is None else hv.detach()
            for hv, v in zip(products, batched_vectors, strict=False)
        ]
