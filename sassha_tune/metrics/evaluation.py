"""What a trained model scores: the loss every task trains on, evaluation on a split, and the
final metrics a trial stores (train, validation and test loss and accuracy; perplexity for language
models). The trainer validates with :func:`evaluate`; the trial objective stores
:func:`final_metrics`; the sharpness metrics (:mod:`.sharpness`) use :func:`cross_entropy`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..training.data import Splits

__all__ = ["cross_entropy", "evaluate", "perplexity", "final_metrics"]


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
            out = model(x[i : i + batch_size]).float()
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


def final_metrics(model: nn.Module, splits: Splits, *, batch_size: int = 1024) -> dict:
    """Train (full, un-augmented, the labels trained on), validation and test loss/accuracy of
    ``model`` on ``splits``.

    With label noise, ``train_clean_acc`` / ``train_clean_loss`` use the original labels. Language
    models: per token, and ``train_ppl`` / ``val_ppl`` / ``test_ppl`` too.
    """
    s, m = splits, model
    out: dict = {}
    for split, x, y in (
        ("train", s.x_train, s.y_train),
        ("val", s.x_val, s.y_val),
        ("test", s.x_test, s.y_test),
    ):
        loss, acc = evaluate(m, x, y, batch_size=batch_size)
        out[f"{split}_loss"], out[f"{split}_acc"] = loss, acc
        if s.is_language:
            out[f"{split}_ppl"] = perplexity(loss)
    if s.y_train_clean is not None:
        out["train_clean_loss"], out["train_clean_acc"] = evaluate(
            m, s.x_train, s.y_train_clean, batch_size=batch_size
        )
    return out
