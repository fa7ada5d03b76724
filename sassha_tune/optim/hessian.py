"""Hessian-vector products and Hutchinson probes: the one implementation shared by the
second-order optimizers (SASSHA, M-SASSHA, AdaHessian, Sophia-H) and the sharpness metrics.

Everything here works on *lists* of tensors, one per parameter, in ``param_groups`` (or
``model.parameters()``) order, so that probes drawn by two implementations with the same
generator line up element for element.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

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


def hutchinson_diagonal(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    generator: torch.Generator,
    *,
    n_samples: int = 1,
    retain_graph: bool = False,
) -> TensorList:
    """Unbiased estimate of diag(H): the mean over ``n_samples`` probes z of ``z * (H z)``.

    One probe tensor per parameter is drawn for every sample, in order, even where the gradient
    carries no graph (the loss is at most linear in that parameter, so its product is zero): the
    probe stream then does not depend on which parameters happen to be linear. The graph behind
    ``grads`` is kept between samples and freed after the last one unless ``retain_graph`` is set.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    estimate = [torch.zeros_like(p) for p in params]
    for s in range(n_samples):
        probes = rademacher_probes(params, generator)
        if not live:
            continue
        keep = retain_graph or s < n_samples - 1
        products = hvp_from_grads([grads[i] for i in live], params, [probes[i] for i in live], retain_graph=keep)
        torch._foreach_addcmul_(estimate, probes, products, value=1.0 / n_samples)
    return estimate


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
        with torch.enable_grad():
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
