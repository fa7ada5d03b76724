"""Device names and device quirks (sassha_tune.devices)."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch

from sassha_tune.devices import onednn_workaround, resolve_device
from sassha_tune.errors import UserError
from sassha_tune.metrics.sharpness import hessian_metrics
from sassha_tune.training.models import build_model


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answers on a GPU machine
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda:0")
    with pytest.raises(UserError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")


def _resnet(channels_last: bool):
    torch.manual_seed(0)
    model = build_model("resnet20", (3, 16, 16), 10, width=4)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def test_onednn_is_off_only_for_channels_last_on_one_cpu_thread():
    assert torch.get_num_threads() == 1  # tests/conftest.py
    assert not isinstance(onednn_workaround(_resnet(True)), nullcontext)
    assert isinstance(onednn_workaround(_resnet(False)), nullcontext)
    torch.set_num_threads(2)
    try:
        assert isinstance(onednn_workaround(_resnet(True)), nullcontext)
    finally:
        torch.set_num_threads(1)


def test_sharpness_of_a_channels_last_model_on_one_thread():
    # without the workaround torch 2.13 aborts the process here (heap corruption in the backward of
    # a channels-last convolution through oneDNN on one thread); the value is the contiguous model's
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)
    budget = dict(subset_size=16, lambda_max_iters=5, trace_probes=4, sam_steps=1)
    cl = hessian_metrics(_resnet(True), None, x.contiguous(memory_format=torch.channels_last), y, **budget)
    plain = hessian_metrics(_resnet(False), None, x, y, **budget)
    assert math.isfinite(cl["lambda_max"])
    assert cl["lambda_max"] == pytest.approx(plain["lambda_max"], rel=1e-4)
    assert torch.backends.mkldnn.enabled  # restored
