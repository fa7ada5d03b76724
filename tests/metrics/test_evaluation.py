"""metrics.evaluation: the loss is computed in the model's precision, half precision promoted to float32."""

import torch
import torch.nn.functional as F
from torch import nn

from sassha_tune.metrics.evaluation import evaluate


def _data(dtype):
    g = torch.Generator().manual_seed(0)
    return torch.randn(50, 6, generator=g, dtype=dtype), torch.randint(0, 3, (50,), generator=g)


def test_a_float64_model_is_evaluated_in_float64():
    """A float32 round trip would lose ~1e-8 of the loss: the characterization tests rely on float64 throughout."""
    x, y = _data(torch.float64)
    model = nn.Linear(6, 3).double()
    loss, acc = evaluate(model, x, y, batch_size=64)  # one batch: the same sum as below
    with torch.no_grad():
        out = model(x)
        expected = F.cross_entropy(out, y, reduction="sum").item() / 50
        as_float32 = F.cross_entropy(out.float(), y, reduction="sum").double().item() / 50
    assert loss == expected != as_float32
    assert acc == (out.argmax(1) == y).sum().item() / 50


def test_a_bfloat16_model_is_evaluated_in_float32():
    x, y = _data(torch.float32)
    model = nn.Linear(6, 3).to(torch.bfloat16)
    loss, _ = evaluate(model, x.to(torch.bfloat16), y, batch_size=64)
    with torch.no_grad():
        expected = F.cross_entropy(model(x.to(torch.bfloat16)).float(), y, reduction="sum").double().item() / 50
    assert loss == expected
