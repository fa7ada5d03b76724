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

__all__ = ["SHARPNESS_PHASE", "sharpness_attrs", "finished_outcome"]

#: the ``phase`` a trial reports while its sharpness is measured (protocol: :mod:`sassha_tune.trial`)
SHARPNESS_PHASE = "sharpness"


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
