"""Devices: the one parser of device names, resolving them on this machine, and device quirks.

A device name is ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (configs, ``--device``). ``auto`` is
``cuda`` when a GPU is visible, else ``cpu``. Checking a name's form needs no torch (the config
and the CLI do it first); torch is imported by what resolves names on this machine.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["DEVICE_NAME", "DEVICE_CHOICES", "check_device_name", "check_available", "resolve_device",
           "synchronize", "onednn_workaround"]

#: what a device name may be
DEVICE_NAME = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def check_device_name(name: str | None, what: str = "--device") -> None:
    """A one-line :class:`UserError` unless ``name`` is a device name (``None``: nothing given)."""
    if name is not None and (not isinstance(name, str) or not DEVICE_NAME.match(name)):
        raise UserError(f"{what}: expected {DEVICE_CHOICES}, got {name!r}")


def check_available(name: str | None, what: str = "device") -> None:
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


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda[:N]`` must exist."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"Unknown device {name!r} (expected {DEVICE_CHOICES})") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise UserError(f"Unsupported device {name!r} (expected {DEVICE_CHOICES})")
    if not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available here; use device: cpu or auto")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU. For honest step timings."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _channels_last(model: nn.Module) -> bool:
    import torch

    return any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
               for p in model.parameters())


def onednn_workaround(model: nn.Module) -> AbstractContextManager[object]:
    """A context in which ``model`` can be differentiated safely on the CPU.

    torch 2.13's CPU build corrupts its heap ("corrupted size vs. prev_size", then an abort) in the
    backward pass of channels-last convolutions through oneDNN when it runs on one intra-op thread
    (``OMP_NUM_THREADS=1``, or two rank processes on two cores); forward passes are fine. There,
    and only there, oneDNN is switched off inside the context; every other run keeps its kernels.
    """
    import torch

    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if on_cpu and torch.get_num_threads() == 1 and torch.backends.mkldnn.enabled and _channels_last(model):
        return torch.backends.mkldnn.flags(enabled=False)
    return nullcontext()
