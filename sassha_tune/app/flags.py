"""The command line's flags, checked as typed before a command does anything (nothing read from a
config or a storage yet): each bad flag one :class:`~sassha_tune.errors.UserError` line naming it
(``--gpus``, ``--pack``, ...), as the user wrote it. The Python API checks its own arguments by
their Python names (``gpus=``, ``pack=``) in :mod:`sassha_tune.app.api`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..devices import check_available, check_device_name
from ..errors import UserError

if TYPE_CHECKING:
    from ..study.create import BudgetChange

__all__ = ["Flags", "check_flags"]


@dataclass(frozen=True)
class Flags:
    """What :func:`check_flags` read from the flags: the ``--n-trials`` budget change (None when not
    given), the ``--gpus`` list and the ``--pack`` size (``"auto"`` when not given)."""

    budget: BudgetChange | None
    gpus: list[str]
    pack: str | int


def check_flags(*, seeds: str | None = None, n_trials: str | None = None, gpus: str | None = None,
                device: str | None = None, pack: str | None = None, overrides: Sequence[str] | None = None) -> Flags:
    """Every flag that can be checked without a config or a storage, in this order: ``--seeds``,
    ``--n-trials``, ``--gpus``, ``--device`` (also: it exists on this machine; with ``--gpus``,
    CUDA must), ``--pack``, ``--set``."""
    # each parser imported where its flag is given: `train` checks only --device (its --set is read with its config)
    from ..config.overrides import parse_overrides

    if seeds is not None:
        from ..study.reruns import parse_seeds

        parse_seeds(seeds)
    budget = None
    if n_trials is not None:
        from ..study.create import budget_change

        budget = budget_change(n_trials, "--n-trials")
    gpu_list = _parse_gpus(gpus)
    check_device_name(device)
    pack_size: str | int = "auto"
    if pack is not None:
        from ..study.pack_size import parse_pack

        pack_size = parse_pack(pack)
    if gpu_list and device is not None:
        raise UserError("--device cannot be combined with --gpus (each GPU worker trains on its own cuda device)")
    check_available(device, "--device")
    if gpu_list:
        check_available("cuda", "--gpus")
    parse_overrides(overrides)
    return Flags(budget, gpu_list, pack_size)


def _parse_gpus(gpus: str | None) -> list[str]:
    if gpus is None:
        return []
    items = [g.strip() for g in gpus.split(",") if g.strip()]
    if not items or not all(g.isdigit() for g in items):
        raise UserError(f"--gpus: expected comma-separated GPU indices like 0,1, got {gpus!r}")
    if len(set(items)) != len(items):
        raise UserError(f"--gpus: GPU listed twice in {gpus!r}")
    return items
