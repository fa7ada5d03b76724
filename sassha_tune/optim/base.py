"""The step protocol every optimizer in sassha-tune follows, and the helpers they share.

``optimizer.step(closure)``: ``closure()`` runs the model on the *current* batch and returns the
loss; it does not call ``backward``. The optimizer clears the gradients, calls ``backward`` itself
as often as its method needs (one pass for SGD/AdamW, two for SAM and SASSHA, with
``create_graph`` only on the steps that take a Hessian-vector product), updates the parameters
and returns the loss of the first (clean) pass, detached.

So the trainer, and a user's own loop, is the same for every optimizer::

    for x, y in batches:
        loss = optimizer.step(lambda: loss_fn(model(x), y))

Gradient accumulation: pass a sequence of closures, one per micro-batch, each returning its
micro-batch's mean loss. The optimizer then uses the mean over micro-batches of the loss and of
its gradient (each micro-loss divided by their number, one backward per micro-batch) and returns
the mean first-pass loss. One closure in a list is the same as the closure alone.

Two-pass optimizers evaluate the closure a second time at perturbed weights. That pass must not
move BatchNorm running statistics: pass ``model=`` to the optimizer, or wrap the second call
yourself with :func:`frozen_running_stats`.

Every hyperparameter is a param-group key (as in ``torch.optim``), so ``state_dict()`` holds all of
them and ``load_state_dict`` restores them. Some keys are optimizer-wide by nature (the global
gradient-norm clip, the perturbation's norm): :func:`check_same_in_groups` refuses groups that
disagree on them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

Closure = Callable[[], Tensor]
#: what ``step`` takes: one closure, or one per micro-batch of a gradient-accumulation step
Closures = Closure | Sequence[Closure]

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)
LOW_PRECISION = (torch.float16, torch.bfloat16)


@contextmanager
def frozen_running_stats(model: nn.Module | None) -> Iterator[None]:
    """Run forward passes in train mode without touching BatchNorm running statistics.

    Inside, each BatchNorm layer normalizes with the statistics of the current batch (as in any
    training-mode forward) but neither ``running_mean``/``running_var`` nor
    ``num_batches_tracked`` change. (Setting momentum to 0, as the reference code does, leaves the
    running averages unchanged too but still increments ``num_batches_tracked``.)
    """
    if model is None:
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, _NORM_TYPES) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


def double_backward_context(enabled: bool = True) -> Any:
    """The context for forward passes whose gradient will be differentiated again (a Hessian-vector
    product): ``F.scaled_dot_product_attention`` runs its math kernel inside, since its fused
    kernels (flash, memory-efficient) have no double backward. Models written without it are
    unaffected."""
    if not enabled:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def second_pass_context(model: nn.Module | None):
    """The context for a perturbed (second) pass: running statistics frozen when the model is known."""
    return frozen_running_stats(model) if model is not None else nullcontext()


#: the message a closure that already ran ``backward`` gets (the habit of LBFGS and SAM implementations
#: elsewhere), instead of autograd's "Trying to backward through the graph a second time"
CLOSURE_BACKWARD_ERROR = (
    "step: the loss's graph was already backpropagated: the closure must return the loss without calling "
    "backward() (the optimizer calls backward itself, as often as its method needs), and must compute "
    "the loss afresh on each call; see sassha_tune.optim.base"
)


@contextmanager
def closure_protocol() -> Iterator[None]:
    """Autograd's error for a graph used twice becomes :data:`CLOSURE_BACKWARD_ERROR` (one line)."""
    try:
        yield
    except RuntimeError as exc:
        if "backward through the graph a second time" in str(exc):
            raise RuntimeError(CLOSURE_BACKWARD_ERROR) from None
        raise


def loss_of_closure(closure: Closure) -> Tensor:
    loss = closure()
    if not isinstance(loss, Tensor):
        raise TypeError(f"step: the closure returned {type(loss).__name__}, expected the loss as a tensor")
    if not loss.requires_grad:
        raise RuntimeError(
            "step: the closure's loss does not require grad (was it computed under torch.no_grad(), or "
            "detached?); the closure must return the loss with its graph, without calling backward()"
        )
    return loss


def micro_batches(closure: Closures | None, who: str) -> list[Closure]:
    """The micro-batch closures of a step (a lone closure is one micro-batch)."""
    if closure is None:
        raise RuntimeError(f"{who}.step needs a closure that returns the loss (see sassha_tune.optim.base)")
    if callable(closure):
        return [closure]
    closures = list(closure)
    if not closures or not all(callable(c) for c in closures):
        raise ValueError(f"{who}.step: expected a closure or a non-empty sequence of closures, got {closure!r}")
    return closures


def accumulated_grads(
    closures: Sequence[Closure],
    params: Sequence[Tensor],
    *,
    create_graph: bool = False,
    context: Callable[[], Any] = nullcontext,
) -> tuple[Tensor, list[Tensor | None]]:
    """The mean over micro-batches of the loss (detached when there are several) and of its
    gradient w.r.t. ``params``, by ``torch.autograd.grad`` (nothing is accumulated into ``.grad``).

    Each closure runs inside ``context()`` with gradients enabled. One micro-batch is exactly
    ``grad(closure(), params)``. Several: each micro-loss is divided by their number and the
    gradients are summed; with ``create_graph`` every micro-batch's graph is kept (the sum carries
    them all, so a Hessian-vector product of the sum is the one of the whole batch).
    ``None``: the loss does not depend on that parameter in any micro-batch.
    """
    if len(closures) == 1:
        with closure_protocol(), torch.enable_grad(), context(), double_backward_context(create_graph):
            loss = loss_of_closure(closures[0])
            grads = torch.autograd.grad(loss, list(params), create_graph=create_graph, allow_unused=True)
        return loss, list(grads)
    n = len(closures)
    losses: list[Tensor] = []
    total: list[Tensor | None] = [None] * len(params)
    for c in closures:
        with closure_protocol(), torch.enable_grad(), context(), double_backward_context(create_graph):
            loss = loss_of_closure(c)
            grads = torch.autograd.grad(loss / n, list(params), create_graph=create_graph, allow_unused=True)
            # summed with gradients enabled: with create_graph the sum carries every micro-batch's graph
            total = [g if t is None else (t if g is None else t + g) for t, g in zip(total, grads, strict=True)]
        losses.append(loss.detach())
    return torch.stack(losses).mean(), total


def accumulated_backward(closures: Sequence[Closure], *, context: Callable[[], Any] = nullcontext) -> Tensor:
    """:func:`accumulated_grads` with ``backward`` into ``.grad`` (for ``torch.optim`` updates)."""
    if len(closures) == 1:
        with closure_protocol(), torch.enable_grad(), context():
            loss = loss_of_closure(closures[0])
            loss.backward()
        return loss
    n = len(closures)
    losses = []
    for c in closures:
        with closure_protocol(), torch.enable_grad(), context():
            loss = loss_of_closure(c)
            (loss / n).backward()
        losses.append(loss.detach())
    return torch.stack(losses).mean()


def grads_of(params: Iterable[Tensor]) -> list[Tensor]:
    """The gradients of the parameters that have one, in order."""
    return [g for p in params if (g := p.grad) is not None]


def clear_grads(params: Iterable[Tensor]) -> None:
    for p in params:
        p.grad = None


def trainable(optimizer: Any) -> list[Tensor]:
    """All parameters of all groups (of a ``torch.optim.Optimizer``), in ``param_groups`` order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def state_dtype(p: Tensor) -> torch.dtype:
    """Optimizer state is kept in fp32 for half-precision parameters, in the parameter's dtype otherwise."""
    return torch.float32 if p.dtype in LOW_PRECISION else p.dtype


def split_active(
    candidates: list[list[Tensor]], grads: Iterable[Tensor | None]
) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
    """Per group: the parameters that received a gradient, and those gradients (``grads`` is flat,
    in the order of ``candidates``)."""
    it = iter(grads)
    params_out, grads_out = [], []
    for ps in candidates:
        pairs = [(p, g) for p in ps if (g := next(it)) is not None]
        params_out.append([p for p, _ in pairs])
        grads_out.append([g for _, g in pairs])
    return params_out, grads_out


def regroup(flat: list[Any], like: list[list[Any]]) -> list[list[Any]]:
    """``flat`` cut into consecutive pieces as long as the lists of ``like``."""
    out, start = [], 0
    for group in like:
        out.append(flat[start : start + len(group)])
        start += len(group)
    return out


# --------------------------------------------------------------------------------------------
# Validation: ValueError naming the hyperparameter, as torch.optim does
# --------------------------------------------------------------------------------------------


def check_positive(name: str, value: float, *, allow_zero: bool = True) -> None:
    """Raise ``ValueError`` naming the argument when a hyperparameter is out of range."""
    bad = value < 0 or (value == 0 and not allow_zero)
    if bad or value != value:  # value != value catches NaN
        expected = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"Invalid {name}: {value!r} (expected {expected})")


def check_betas(betas: tuple[float, ...], *, name: str = "betas") -> None:
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid {name}[{i}]: {beta!r} (expected 0 <= beta < 1)")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {', '.join(map(repr, choices))})")


def check_int(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= {minimum})")


def check_max_grad_norm(max_grad_norm: float | None) -> None:
    if max_grad_norm is not None:
        check_positive("max_grad_norm", max_grad_norm, allow_zero=False)


def check_same_in_groups(groups: list[dict[str, Any]], group: Mapping[str, Any], keys: Iterable[str]) -> None:
    """An optimizer-wide hyperparameter must have one value in every group (``groups``: the groups
    already added, ``group``: the new one; a group that does not have the key yet is checked when
    it gets it)."""
    for key in keys:
        for other in groups:
            if other is not group and key in other and other[key] != group[key]:
                raise ValueError(
                    f"Invalid {key}: {group[key]!r} in one parameter group and {other[key]!r} in another "
                    "(it must be the same in every parameter group)"
                )


#: a param-group key's check: raises ``ValueError`` naming the key when the value is refused
Check = Callable[[Any], None]


def nonnegative(name: str) -> Check:
    return lambda value: check_positive(name, value)


def positive(name: str) -> Check:
    return lambda value: check_positive(name, value, allow_zero=False)


def integer(name: str, minimum: int = 1) -> Check:
    return lambda value: check_int(name, value, minimum=minimum)


def optional_count(name: str) -> Check:
    """An integer >= 0, or None (a warm-up that is off)."""
    def check(value: Any) -> None:
        if value is not None:
            check_int(name, value, minimum=0)

    return check


def one_of(name: str, choices: tuple[str, ...]) -> Check:
    return lambda value: check_choice(name, value, choices)


def flag(name: str) -> Check:
    def check(value: Any) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"Invalid {name}: {value!r} (expected True or False)")

    return check


PERTURBATION_GRADS = ("local", "global")  # SAM and SASSHA under data parallelism

#: the checks of a SAM-style perturbation's size (SAM, SASSHA and its variants)
PERTURBATION_CHECKS: dict[str, Check] = {"rho": nonnegative("rho"), "perturb_eps": nonnegative("perturb_eps")}


class CheckedGroups:
    """Mixin for ``torch.optim.Optimizer`` subclasses: every parameter group that is added (by the
    constructor or by ``add_param_group``) has its keys checked by the class's ``GROUP_CHECKS``
    (key -> check, run in that order), and the keys in ``SAME_IN_EVERY_GROUP`` must agree with the
    other groups. A bad group raises ``ValueError`` naming the key and is not added."""

    GROUP_CHECKS: Mapping[str, Check] = {}
    SAME_IN_EVERY_GROUP: tuple[str, ...] = ()
    # what the torch.optim.Optimizer it is mixed into provides
    param_groups: list[dict[str, Any]]
    defaults: dict[str, Any]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)  # type: ignore[misc]  # the torch optimizer's (next in the MRO)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
        except ValueError:
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict[str, Any]) -> None:
        for key, check in self.GROUP_CHECKS.items():
            if key in group:
                check(group[key])
        same = [k for k in self.SAME_IN_EVERY_GROUP if k in group]
        check_same_in_groups(self.param_groups, group, same)

    def _extend_defaults(self, extra: Mapping[str, Any]) -> None:
        """Add hyperparameters a ``torch.optim`` base class does not know (it built the groups
        already): into ``defaults`` and every group that does not set them, then check the groups."""
        self.defaults.update(extra)
        for group in self.param_groups:
            for key, value in extra.items():
                group.setdefault(key, value)
        for group in self.param_groups:
            self._check_group(group)


# --------------------------------------------------------------------------------------------
# Norms and clipping over lists of tensors
# --------------------------------------------------------------------------------------------


@contextmanager
def without_compiler_import() -> Iterator[None]:
    """Optimizers built in the block do not import torch's compiler (``torch._dynamo``).

    ``torch.optim.Optimizer.add_param_group`` is wrapped by ``torch._disable_dynamo``, whose first
    call imports the compiler only to keep the method out of compiled code: about 1.5 s of CPU
    time, and about 0.7 s more when the interpreter exits. A process that has not imported the
    compiler compiles nothing, so in such a process the method can be called as it is: for the
    block, the wrapper's cache of the "disabled" method (its ``__dynamo_disable`` attribute) holds
    the method itself, and is removed afterwards. The registry builds every optimizer this way
    (:meth:`~.registry.OptimizerInfo.build`): config validation's dummy ones in the study's
    coordinator, which never trains, and each trial's, whose process compiles nothing (a plug-in
    that does imports the compiler itself, and later calls go through torch's wrapper as always).
    Where torch's wrapper is not the expected one, or the compiler is imported already, the block
    runs unchanged."""
    import sys

    method = getattr(torch.optim.Optimizer.add_param_group, "__wrapped__", None)
    if method is None or "torch._dynamo" in sys.modules or hasattr(method, "__dynamo_disable"):
        yield
        return
    setattr(method, "__dynamo_disable", method)  # noqa: B010  (a name Python would mangle as an attribute)
    try:
        yield
    finally:
        if getattr(method, "__dynamo_disable", None) is method:
            delattr(method, "__dynamo_disable")


def global_grad_norm(tensors: list[Tensor]) -> Tensor:
    """L2 norm over a list of tensors, computed as the norm of the per-tensor norms (on the first one's device)."""
    if not tensors:
        return torch.zeros(())
    device = tensors[0].device
    norms = torch._foreach_norm(tensors)
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


def clip_grads_(grads: list[Tensor], max_norm: float | None, *, eps: float = 1e-6) -> Tensor | None:
    """Scale ``grads`` in place so that their global L2 norm is at most ``max_norm``; returns the norm before.

    The same rule as ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_norm / (norm + eps)``,
    capped at 1), but on an explicit list of gradient tensors, so an optimizer can clip the gradient
    its update uses (after its last backward) whatever attribute holds it. ``None`` or no tensors:
    nothing happens and ``None`` is returned.
    """
    if max_norm is None or not grads:
        return None
    total = global_grad_norm(grads)
    coef = torch.clamp(max_norm / (total + eps), max=1.0)
    torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total
