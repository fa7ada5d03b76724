"""The step protocol of :mod:`sassha_tune.optim.base`: a closure returns the loss and never calls
``backward``; the habits of other libraries get one line saying so, and leave the weights as they were."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from sassha_tune.optim import OPTIMIZER_NAMES, build_optimizer
from sassha_tune.optim.base import CLOSURE_BACKWARD_ERROR


def _setup(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    return model, build_optimizer(name, model, {"lr": 0.05}), x, y


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_a_closure_that_calls_backward_gets_one_line_and_no_update(name):
    model, opt, x, y = _setup(name)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():  # the LBFGS / SAM-elsewhere habit
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError) as info:
        opt.step(closure)
    assert str(info.value) == CLOSURE_BACKWARD_ERROR and "\n" not in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    # the same optimizer then steps normally with a closure that follows the protocol
    loss = opt.step(lambda: F.cross_entropy(model(x), y))
    assert torch.isfinite(loss) and not loss.requires_grad


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_a_closure_returning_a_detached_loss_or_a_float_is_refused(name):
    model, opt, x, y = _setup(name)
    with pytest.raises(RuntimeError, match="the closure's loss does not require grad"):
        opt.step(lambda: F.cross_entropy(model(x), y).detach())
    with pytest.raises(TypeError, match="the closure returned float, expected the loss as a tensor"):
        opt.step(lambda: F.cross_entropy(model(x), y).item())


def test_other_errors_of_the_closure_pass_through_unchanged():
    model, opt, x, y = _setup("sassha")
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        opt.step(lambda: F.cross_entropy(model(x[:, :3]), y))  # the model's own error, not a protocol one
