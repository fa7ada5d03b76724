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
