"""A custom model and dataset for sassha-tune, loaded through `package.module:function` plug-ins.

Plug-ins are the only way a config runs code: `task.model: plugin_model:build_model` imports this
module (it must be importable: run from this folder, or put it on PYTHONPATH) and calls the
function. Nothing else in a config is ever executed.
"""

from __future__ import annotations

import torch
from torch import nn


def build_model(*, input_shape, num_classes, width: int = 64):
    """A model factory: called as build_model(input_shape=..., num_classes=..., **model_options)."""
    in_features = 1
    for size in input_shape:
        in_features *= int(size)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, width),
        nn.GELU(),
        nn.Linear(width, width),
        nn.GELU(),
        nn.Linear(width, num_classes),
    )


def two_spirals(*, data_dir=None, seed: int = 0, n: int = 3000, noise: float = 0.3):
    """A dataset factory: called as two_spirals(data_dir=..., seed=..., **dataset_options).

    Returns train/test tensors; sassha-tune carves the seeded validation split, applies label
    noise and normalises, as for the built-in datasets.
    """
    g = torch.Generator().manual_seed(seed)

    def make(count: int):
        t = torch.rand(count, generator=g) * 3 * torch.pi + 0.5
        label = torch.randint(0, 2, (count,), generator=g)
        sign = 1 - 2 * label.float()
        x = torch.stack([sign * t * torch.cos(t), sign * t * torch.sin(t)], dim=1)
        x = x + noise * torch.randn(count, 2, generator=g)
        return x, label

    x_train, y_train = make(n)
    x_test, y_test = make(n // 3)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, "num_classes": 2}
