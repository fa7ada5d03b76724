"""The device a trial asks for must exist on this machine."""

from __future__ import annotations

from ..errors import UserError

__all__ = ["check_device"]


def check_device(name: str | None, what: str = "device") -> None:
    """``cuda`` / ``cuda:N`` must exist on this machine: a one-line :class:`UserError` before a
    study is created or a trial asked, not a failed trial. ``auto`` and ``cpu`` always pass."""
    name = (name or "auto").strip().lower()
    if not name.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"{what} {name}: CUDA is not available on this machine (use cpu or auto)")
    index = name.partition(":")[2]
    if index.isdigit() and int(index) >= torch.cuda.device_count():
        raise UserError(f"{what} {name}: no such GPU ({torch.cuda.device_count()} CUDA device(s) visible)")
