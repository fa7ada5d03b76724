"""What a trained model scores: the loss every task trains on (:func:`cross_entropy`, over classes
or over the tokens of a window), evaluation on a split (:func:`evaluate`: mean loss and accuracy,
per token for language models) and :func:`perplexity`. The trainer validates with them, a trial's
final metrics are them on its three splits, the sharpness metrics (:mod:`.sharpness`) measure
the same loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["cross_entropy", "evaluate", "perplexity"]


def cross_entropy(logits: Tensor, targets: Tensor, *, reduction: str = "mean") -> Tensor:
    """The training loss of every task: cross-entropy over classes, or over every token of a window
    for a language model (logits (batch, T, vocabulary), targets (batch, T))."""
    if logits.dim() > 2:
        logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    return F.cross_entropy(logits, targets, reduction=reduction)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on (x, y) in eval mode, no augmentation; for
    token windows, per token (next-token accuracy).

    Restores the model's train/eval mode. An empty set gives (nan, nan).
    """
    n = y.numel()
    if n == 0:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    try:
        loss_sum = torch.zeros((), dtype=torch.float64, device=y.device)
        correct = torch.zeros((), dtype=torch.long, device=y.device)
        for i in range(0, len(y), batch_size):
            out = model(x[i : i + batch_size])
            out = out.to(torch.promote_types(out.dtype, torch.float32))  # half precision up, float64 kept
            yb = y[i : i + batch_size]
            loss_sum += cross_entropy(out, yb, reduction="sum").double()
            correct += (out.argmax(-1) == yb).sum()
        return float(loss_sum) / n, int(correct) / n
    finally:
        model.train(was_training)


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy); inf when it overflows, nan for nan."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
