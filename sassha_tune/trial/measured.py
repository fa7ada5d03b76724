"""What every trained trial ends with, whoever trained it (the built-in trainer, a pack member or a
``task.train`` function): its sharpness under the config's protocol, and its objective values."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..metrics.names import SHARPNESS_ATTRS
from .outcome import TrialOutcome, json_safe

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = ["SHARPNESS_PHASE", "finished_outcome", "sharpness_attrs", "sharpness_during_training"]

#: the ``phase`` a trial reports while its sharpness is measured (protocol: :mod:`sassha_tune.trial`)
SHARPNESS_PHASE = "sharpness"

#: ``metrics.budget`` keys that bound the measurement's memory: sharpness during training keeps them
MEMORY_BUDGET_KEYS = ("chunk_size", "lambda_method", "trace_batch_size")


def sharpness_attrs(cfg: Config, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
                    inputs: Tensor, targets: Tensor, *, on_phase: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The stored sharpness attributes of ``model`` on a fixed subset of ``(inputs, targets)``
    (``loss_fn`` None: cross-entropy) under ``cfg.metrics``; all None with ``metrics.sharpness: false``.
    ``on_phase("sharpness")`` is called just before the measurement starts (the trial protocol's
    ``phase`` message: a study's live view shows it, as nothing else is reported until the result)."""
    if not cfg.metrics.sharpness:
        return {key: None for key in SHARPNESS_ATTRS}
    from ..metrics.sharpness import hessian_metrics

    if on_phase is not None:
        on_phase(SHARPNESS_PHASE)

    sharp = hessian_metrics(model, loss_fn, inputs, targets, seed=cfg.metrics.seed,
                            subset_size=cfg.metrics.subset_size, **cfg.metrics.budget)
    return {**{key: sharp.get(key) for key in SHARPNESS_ATTRS},
            "sharpness_protocol": sharp.get("protocol"), "sharpness_seconds": sharp.get("seconds")}


def sharpness_during_training(cfg: Config, on_phase: Callable[[str], None] | None = None,
                              ) -> Callable[[int, nn.Module, Any], dict[str, Any]] | None:
    """``metrics.track_every: N``: the trainer's ``measure`` hook, which every N epochs measures
    ``lambda_max`` and the Hessian trace of the model at the end of the epoch, on the same subset
    and protocol as the final measurement but at :data:`~sassha_tune.metrics.sharpness.CHEAP_BUDGET`
    (no SAM or adaptive sharpness), as ``track_lambda_max``, ``track_hessian_trace`` and
    ``track_seconds`` of that epoch. The protocol puts the model and the random generators back
    exactly, so training goes on as without it. ``on_phase("sharpness")`` is told before each
    measurement (the live view shows it until the epoch's message). None when off."""
    every = cfg.metrics.track_every
    if not every:
        return None
    import gc

    import torch

    from ..metrics.evaluation import cross_entropy
    from ..metrics.sharpness import SharpnessTracker
    from ..training.trainer import OOM_ERRORS

    # what the user set so that the final measurement fits in memory holds here too (with the
    # optimizer's state alive, memory is tighter mid-training than after it)
    memory = {k: v for k, v in cfg.metrics.budget.items() if k in MEMORY_BUDGET_KEYS}
    options = {"seed": cfg.metrics.seed, "subset_size": cfg.metrics.subset_size, "sam_rho": None, "adaptive_rho": None,
               **memory}
    tracker: SharpnessTracker | None = None  # built at the first call: the loss depends on the data

    def measure(epoch: int, model: nn.Module, splits: Any) -> dict[str, Any]:
        nonlocal tracker
        if epoch % every:
            return {}
        if tracker is None:
            tracker = SharpnessTracker(cross_entropy if splits.is_language else None, options=dict(options))
        if on_phase is not None:
            on_phase(SHARPNESS_PHASE)
        try:
            sharp = tracker(model, splits.x_train, splits.y_train, epoch=epoch)
        except OOM_ERRORS:
            # a value for a plot must not cost the trial (or its pack) its training: none this epoch
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return {"track_error": "out_of_memory"}
        assert sharp is not None  # every=1: it measures whenever asked
        return {"track_lambda_max": sharp.get("lambda_max"), "track_hessian_trace": sharp.get("hessian_trace"),
                "track_seconds": sharp.get("seconds")}

    return measure


def finished_outcome(cfg: Config, attrs: dict[str, Any], history: list[dict[str, Any]],
                     why_missing: Callable[[str], str] | None = None) -> TrialOutcome:
    """COMPLETE with the study's objective values read from ``attrs``, or FAIL naming the first
    objective that is missing or not finite (``why_missing(metric)`` says why, default "is not finite")."""
    attrs = json_safe(attrs)
    values = []
    for metric in cfg.study.metrics:
        v = attrs.get(metric)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            why = why_missing(metric) if why_missing is not None else "is not finite"
            return TrialOutcome("fail", attrs, failure_reason=f"error: objective {metric} {why}", history=history)
        values.append(float(v))
    return TrialOutcome("complete", attrs, values=values, history=history)
