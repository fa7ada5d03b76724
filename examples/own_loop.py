"""Your own training function, tuned by sassha-tune (``task.train: own_loop:train``).

The function owns the data, the model and the loop; sassha-tune owns the study: it samples the
hyperparameters, builds the trial's optimizer (``reporter.make_optimizer``), runs every trial in a
fresh process with heartbeats and retries, prunes through ``reporter.report``, measures sharpness on
the batch given to ``reporter.sharpness_on``, and stores what the function returns.

    PYTHONPATH=examples sassha-tune run examples/own_loop.yaml

Importing this module (done once before the study starts, and in each trial) runs its top-level
code, as for any plug-in: keep it to definitions.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def make_data(seed: int, n: int = 1200, dim: int = 16):
    """A classification task from a random teacher network, with 10% of the labels flipped."""
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(dim, 32), nn.Tanh(), nn.Linear(32, 3))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        x = torch.randn(n, dim, generator=g)
        y = teacher(x).argmax(1)
    flip = torch.rand(n, generator=g) < 0.1
    y[flip] = torch.randint(0, 3, (int(flip.sum()),), generator=g)
    return x[: n * 3 // 4], y[: n * 3 // 4], x[n * 3 // 4:], y[n * 3 // 4:]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    out = model(x)
    model.train()
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def train(reporter):
    width = int(reporter.options.get("width", 64))
    batch_size = int(reporter.options.get("batch_size", 64))
    x_train, y_train, x_val, y_val = make_data(seed=0)  # the same data for every trial
    torch.manual_seed(reporter.seed)
    model = nn.Sequential(nn.Linear(x_train.shape[1], width), nn.GELU(), nn.Linear(width, 3)).to(reporter.device)
    x_train, y_train, x_val, y_val = (t.to(reporter.device) for t in (x_train, y_train, x_val, y_val))
    optimizer = reporter.make_optimizer(model)  # the study's optimizer with this trial's hyperparameters
    for _ in range(reporter.epochs):
        order = torch.randperm(len(x_train), device=reporter.device)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            # the optimizer calls backward itself (twice for SASSHA): the closure only computes the loss
            optimizer.step(lambda idx=idx: F.cross_entropy(model(x_train[idx]), y_train[idx]))
        train_loss, train_acc = evaluate(model, x_train, y_train)
        val_loss, val_acc = evaluate(model, x_val, y_val)
        reporter.report({"train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc})
    reporter.sharpness_on(model, x_train, y_train)  # lambda_max, trace, SAM sharpness on a fixed subset
    return {"train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc,
            "num_classes": 3}
