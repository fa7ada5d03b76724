"""Models: forward shapes, plug-ins, errors, double backward."""

from __future__ import annotations

import math

import pytest
import torch

from sassha_tune.errors import UserError
from sassha_tune.training.models import MODELS, build_model, has_normalization

CASES = [
    ("mlp", (1, 40), {}),
    ("mlp", (20,), {"hidden": [8]}),
    ("cnn1d", (1, 40), {}),
    ("cnn1d", (20,), {"channels": 4}),
    ("cnn", (1, 28, 28), {}),
    ("cnn", (1, 8, 8), {}),
    ("resnet20", (3, 32, 32), {}),
    ("resnet20", (1, 28, 28), {}),
    ("resnet32", (3, 16, 16), {"width": 4}),
    ("resnet56", (3, 8, 8), {"width": 4}),
    ("wrn16_4", (3, 16, 16), {"dropout": 0.3}),
    ("wrn28_10", (3, 8, 8), {}),
    ("vit", (3, 32, 32), {"dim": 32, "depth": 2}),
    ("vit", (1, 28, 28), {"patch_size": 7, "dim": 32, "depth": 1}),
    ("vit", (1, 30, 30), {"patch_size": 4, "dim": 16, "depth": 1, "heads": 2}),  # padded to 32
    ("vit", (1, 40), {"patch_size": 8, "dim": 16, "depth": 1}),
]


# language models take token windows (integer ids) and give (batch, T, vocabulary) logits
LANGUAGE_CASES = [("gpt", (12,), {"n_layer": 2, "n_head": 2, "n_embd": 16})]


def test_every_listed_model_is_covered():
    assert set(MODELS) == {name for name, _, _ in CASES + LANGUAGE_CASES}


@pytest.mark.parametrize("name,shape,opts", LANGUAGE_CASES, ids=[c[0] for c in LANGUAGE_CASES])
def test_language_model_forward_shape_and_normalization(name, shape, opts):
    model = build_model(name, shape, 256, **opts)
    assert model(torch.randint(0, 256, (2, *shape))).shape == (2, *shape, 256)
    assert has_normalization(name) is any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())


@pytest.mark.parametrize("name,shape,opts", CASES[::2], ids=[c[0] for c in CASES[::2]])
def test_has_normalization_matches_the_built_model(name, shape, opts):
    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm)
    built = any(isinstance(m, norms) for m in build_model(name, shape, 7, **opts).modules())
    assert has_normalization(name) is built
    assert has_normalization("plugins_example:tiny_linear") is None


@pytest.mark.parametrize("name,shape,opts", CASES, ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}" for c in CASES])
def test_forward_shape(name, shape, opts):
    model = build_model(name, shape, 7, **opts)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)


def test_resnet_structure():
    m = build_model("resnet20", (3, 32, 32), 10)
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (3, 3)]
    assert len(convs) == 19  # stem + 9 blocks x 2; the fc makes 20 layers
    shortcuts = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (1, 1)]
    assert len(shortcuts) == 2
    assert sum(p.numel() for p in m.parameters()) < 300_000
    assert build_model("resnet20", (1, 28, 28), 10).stem[0].in_channels == 1


def test_double_backward_works_for_vit():
    m = build_model("vit", (1, 8, 8), 3, dim=16, depth=1, heads=2)
    loss = torch.nn.functional.cross_entropy(m(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 0]))
    params = list(m.parameters())
    grads = torch.autograd.grad(loss, params, create_graph=True)
    hvp = torch.autograd.grad(sum((g * torch.ones_like(g)).sum() for g in grads), params, allow_unused=True)
    assert any(h is not None and torch.isfinite(h).all() for h in hvp)


def test_plugin_model():
    m = build_model("plugins_example:tiny_linear", (2, 3), 4, scale=0.0)
    out = m(torch.randn(5, 2, 3))
    assert torch.allclose(out, m[1].bias.expand(5, 4))  # scale=0 zeroed the weights
    with pytest.raises(UserError, match="not a torch.nn.Module"):
        build_model("plugins_example:not_a_module", (2,), 2)
    with pytest.raises(UserError, match="cannot import"):
        build_model("no_such_pkg_xyz.mod:f", (2,), 2)
    with pytest.raises(UserError, match="no attribute"):
        build_model("plugins_example:nothing_here", (2,), 2)


def test_errors_are_one_line_and_list_names():
    with pytest.raises(UserError) as e:
        build_model("resnet18x", (3, 32, 32), 10)
    assert "resnet20" in str(e.value) and "vit" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="6n\\+2"):
        build_model("resnet21", (3, 32, 32), 10)
    with pytest.raises(UserError, match="image inputs"):
        build_model("resnet20", (40,), 10)
    with pytest.raises(UserError, match="unexpected keyword"):
        build_model("mlp", (4,), 2, widths=[3])


def test_gpt_shapes_tied_head_and_hessian_vector_products():
    # attention through F.scaled_dot_product_attention, whose fused kernels have no double backward:
    # the optimizers' graph passes and the sharpness metrics switch to its math kernel
    from torch import nn

    from sassha_tune.metrics.sharpness import hessian_metrics
    from sassha_tune.optim import Sassha

    torch.manual_seed(0)
    model = build_model("gpt", (12,), 256, n_layer=2, n_head=2, n_embd=16)
    assert model.head.weight is model.tok.weight
    x, y = torch.randint(0, 256, (4, 12)), torch.randint(0, 256, (4, 12))
    assert model(x).shape == (4, 12, 256)

    def loss_fn(out, t):
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), t.reshape(-1))

    opt = Sassha(model.parameters(), lr=0.01, rho=0.05, lazy_hessian=1, model=model)
    before = loss_fn(model(x), y).item()
    for _ in range(3):
        opt.step(lambda: loss_fn(model(x), y))
    assert loss_fn(model(x), y).item() < before
    sharp = hessian_metrics(model, loss_fn, x, y, subset_size=4, lambda_max_iters=4, trace_probes=2, sam_steps=1)
    assert sharp["lambda_max"] > 0 and math.isfinite(sharp["hessian_trace"])
