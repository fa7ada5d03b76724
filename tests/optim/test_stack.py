"""An optimizer's stacked step (sassha_tune.optim.stack): K members' steps over one stacked model."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sassha_tune.optim import OPTIMIZERS, build_optimizer
from sassha_tune.optim.stack import Stack, StackMember

MEMBERS = {
    "sgd": [dict(lr=0.1, weight_decay=5e-4), dict(lr=0.05, momentum=0.5, max_grad_norm=0.1)],
    "adamw": [dict(lr=0.01), dict(lr=0.02, weight_decay=0.1)],
    "sam_sgd": [dict(lr=0.1, rho=0.05), dict(lr=0.05, rho=0.2, adaptive=True)],
    # refreshes on different steps, and one member's Hessian at the perturbed point
    "sassha": [dict(lr=0.05, rho=0.05, lazy_hessian=2, seed=1),
               dict(lr=0.1, rho=0.1, lazy_hessian=1, hessian_point="perturbed", seed=2),
               dict(lr=0.02, rho=0.02, lazy_hessian=3, bias_correction="refreshes", seed=3)],
}


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def test_the_registry_packs_with_batched_kernels_exactly_the_optimizers_with_a_stacked_step():
    for info in OPTIMIZERS.values():
        assert info.batched_packs == hasattr(info.cls, "stacked_step"), info.name


@pytest.mark.parametrize("name", list(MEMBERS))
def test_a_stacked_step_is_each_members_own_step(name):
    """A stack whose forward runs each member's slice with the lone model's kernels: every
    member's parameters, loss and optimizer state equal its lone run's, bit for bit."""
    hparams = MEMBERS[name]
    k = len(hparams)
    lone = [_model(i) for i in range(k)]
    lone_opts = [build_optimizer(name, m, h) for m, h in zip(lone, hparams, strict=True)]
    template = _model(0)
    stacked = [torch.stack([dict(m.named_parameters())[n].detach() for m in lone]).requires_grad_()
               for n, _ in template.named_parameters()]
    views = [[p.data[slot] for p in stacked] for slot in range(k)]
    members = [StackMember(build_optimizer(name, _Params(vs), h), vs, slot)
               for slot, (vs, h) in enumerate(zip(views, hparams, strict=True))]
    names = [n for n, _ in template.named_parameters()]
    torch.manual_seed(7)
    xs, ys = torch.randn(k, 16, 6), torch.randint(0, 3, (k, 16))

    def forward():
        outs = [torch.func.functional_call(template, {n: p[slot] for n, p in zip(names, stacked, strict=True)},
                                           (xs[slot],)) for slot in range(k)]
        out = torch.stack(outs)
        return torch.stack([F.cross_entropy(out[slot], ys[slot]) for slot in range(k)]), out

    stack = Stack(stacked, forward, template, nullcontext)
    for _ in range(4):
        losses, _ = members[0].optimizer.stacked_step(stack, members)
        for slot, (model, opt) in enumerate(zip(lone, lone_opts, strict=True)):
            loss = opt.step(lambda model=model, slot=slot: F.cross_entropy(model(xs[slot]), ys[slot]))
            assert torch.equal(losses[slot], loss)
    for slot, model in enumerate(lone):
        for p, v in zip(model.parameters(), views[slot], strict=True):
            assert torch.equal(p.detach(), v)
        lone_state = lone_opts[slot].state_dict()["state"]
        member_state = members[slot].optimizer.state_dict()["state"]
        for i, st in lone_state.items():
            for key, value in st.items():
                assert torch.equal(torch.as_tensor(member_state[i][key]), torch.as_tensor(value)), (slot, key)


class _Params:
    """What ``build_optimizer`` needs from a model: its parameters (here, views of a stack)."""

    def __init__(self, params):
        self._params = params

    def parameters(self):
        return iter(self._params)

    def modules(self):
        return iter(())

