"""Model plug-ins of the tuning-efficiency benchmark (``task.model: tuning_models:cnn1d_bn``; the
benchmark puts this folder on ``PYTHONPATH`` for its trial processes)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def cnn1d_bn(*, input_shape: Sequence[int], num_classes: int, channels: int = 32, kernel_size: int = 5) -> nn.Module:
    """The built-in ``cnn1d`` with a BatchNorm after every convolution: the same task with a
    normalized network, as a plug-in (so the benchmark also exercises how the tool recognizes
    normalization in a model it did not build)."""
    c_in, length = (1, int(input_shape[0])) if len(input_shape) == 1 else (int(input_shape[0]), int(input_shape[1]))
    pad = kernel_size // 2
    layers: list[nn.Module] = []
    width = c_in
    for stride in (1, 2, 2):
        layers += [nn.Conv1d(width, channels, kernel_size, stride=stride, padding=pad, bias=False),
                   nn.BatchNorm1d(channels), nn.ReLU()]
        width = channels
    features = nn.Sequential(*layers)
    with torch.no_grad():
        n_out = features(torch.zeros(2, c_in, length)).flatten(1).shape[1]
    return nn.Sequential(nn.Unflatten(1, (c_in, length)) if len(input_shape) == 1 else nn.Identity(),
                         features, nn.Flatten(), nn.Linear(n_out, num_classes))
