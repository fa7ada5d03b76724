"""Plug-ins used by the tests: a model factory and a dataset factory (``tests`` is on sys.path)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def tiny_linear(*, input_shape, num_classes, scale=1.0):
    """A model plug-in: ``factory(input_shape=..., num_classes=..., **options) -> nn.Module``."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes))
    with torch.no_grad():
        model[1].weight.mul_(scale)
    return model


def not_a_module(*, input_shape, num_classes):
    return "nope"


def blobs(*, data_dir=None, seed=0, n=200, as_tuple=False):
    """A dataset plug-in: two Gaussian blobs in 5 dimensions, returned as a mapping or a tuple."""
    rng = np.random.default_rng(123)
    y = rng.integers(0, 2, size=n + 50)
    x = rng.normal(size=(n + 50, 5)).astype(np.float32) + 3.0 * y[:, None]
    if as_tuple:
        return x[:n], y[:n], x[n:], y[n:]
    return {
        "x_train": x[:n],
        "y_train": y[:n],
        "x_test": torch.from_numpy(x[n:]),
        "y_test": y[n:],
        "num_classes": 2,
        "name": "blobs",
    }


def broken(*, data_dir=None, seed=0):
    return 42


class MemoryLimited(nn.Module):
    """A small MLP with an emulated memory limit: in training mode its forward raises
    ``torch.OutOfMemoryError`` when its input is one member's slice of a trial pack's stacked
    batch that holds more than ``max_members`` members' batches (``max_members=0``: even a lone run).

    Why emulated: a pack's memory grows with the number of members it stacks, and on a GPU the
    CUDA allocator then raises ``torch.OutOfMemoryError`` from inside a pass. On the CPU the real
    allocator cannot be exhausted safely (the host swaps, or the kernel kills the process, instead
    of an exception), so the tests raise the same exception where the pack's size is visible: the
    stacked batch. With the pack's exact kernels (SASSHA's default) each member's forward gets a
    view ``x[i]`` of the stack ``x`` of shape (K, batch, ...), so ``x._base`` holds all K batches;
    a lone run's batch is a fresh tensor. Otherwise the forward is an ordinary deterministic MLP."""

    def __init__(self, input_shape, num_classes, max_members: int, hidden: int) -> None:
        super().__init__()
        self.max_members = int(max_members)
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(int(np.prod(input_shape)), hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x):
        if self.training:
            base = x._base
            members = base.shape[0] if base is not None and base.dim() == x.dim() + 1 else 1
            if members > self.max_members:
                raise torch.OutOfMemoryError(
                    f"emulated: a batch of {members} members' samples exceeds the limit of {self.max_members}"
                )
        return self.net(x)


def memory_limited(*, input_shape, num_classes, max_members=1, hidden=16):
    """A model plug-in: :class:`MemoryLimited`, deterministic and stateless, so it may be packed."""
    return MemoryLimited(input_shape, num_classes, max_members, hidden)


memory_limited.packable = True  # the plug-in's promise to packs.pack_blocker (docs/packs.md, "Plug-in models")
