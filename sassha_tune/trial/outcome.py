"""The outcome of a trial: its state, stored attributes, objective values or failure reason.

One type for the whole path: :func:`sassha_tune.trial.objective.evaluate_params` returns it, the
trial process sends it as its ``result`` message, the study rebuilds it from that message and
tells the trial with it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrialOutcome", "json_safe", "one_line"]


@dataclass
class TrialOutcome:
    state: str  # "complete" | "pruned" | "fail"
    attrs: dict[str, Any] = field(default_factory=dict)
    values: list[float] | None = None
    failure_reason: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The ``result`` message (the history travels as the epoch messages before it)."""
        return {
            "type": "result",
            "state": self.state,
            "attrs": self.attrs,
            "values": self.values,
            "failure_reason": self.failure_reason,
        }

    @classmethod
    def from_message(cls, msg: Mapping[str, Any], history: list[dict[str, Any]] | None = None) -> TrialOutcome:
        """The outcome a ``result`` message carries (``history``: the epochs reported before it)."""
        return cls(msg["state"], msg.get("attrs") or {}, msg.get("values"), msg.get("failure_reason"), history or [])


def json_safe(value: Any) -> Any:
    """JSON-safe attribute values: non-finite floats become None, tensors become numbers."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def one_line(exc: BaseException) -> str:
    """``error: Type: message`` on one line (at most 500 characters): a failure reason."""
    text = " ".join(str(exc).split())
    name = type(exc).__name__
    msg = f"error: {name}: {text}" if text else f"error: {name}"
    return msg[:500]
