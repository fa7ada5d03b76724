"""optim/hessian.py's ``warm_up``: after it, a process's Hessian-vector products import nothing (so a
trial's clock never counts torch's lazy imports), and it leaves no state a trial could see."""

from __future__ import annotations

import torch
from conftest import in_fresh_process

from sassha_tune.optim.hessian import warm_up


def test_after_the_warm_up_a_hessian_vector_product_imports_nothing():
    # a fresh process: this one did its first product long ago
    code = (
        "import sys, torch\n"
        "from sassha_tune.optim.hessian import hvp_from_grads, warm_up\n"
        "warm_up()\n"
        "model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))\n"
        "loss = model(torch.randn(5, 4)).pow(2).sum()\n"
        "params = list(model.parameters())\n"
        "grads = torch.autograd.grad(loss, params, create_graph=True)\n"
        "imported = []\n"
        "sys.addaudithook(lambda event, args: imported.append(args[0]) if event == 'import' else None)\n"
        "products = hvp_from_grads(grads, params, [torch.ones_like(p) for p in params])\n"
        "assert [hv.shape for hv in products] == [p.shape for p in params]\n"
        "assert imported == [], imported\n"
    )
    in_fresh_process(code)


def test_the_warm_up_draws_no_random_numbers_and_changes_no_setting():
    rng, grad, dtype = torch.get_rng_state(), torch.is_grad_enabled(), torch.get_default_dtype()
    warm_up()
    assert torch.equal(torch.get_rng_state(), rng)
    assert (torch.is_grad_enabled(), torch.get_default_dtype()) == (grad, dtype)
