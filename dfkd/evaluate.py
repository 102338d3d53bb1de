"""Accuracy of a classifier on real data, and its agreement with a teacher: `dfkd evaluate`."""

from __future__ import annotations

import torch
from torch import nn

from dfkd.data import ImageData, iterate_batches
from dfkd.spec import InputSpec


@torch.no_grad()
def predict(model: nn.Module, data: ImageData, spec: InputSpec, device: torch.device | str,
            batch_size: int = 1000) -> torch.Tensor:
    """Logits of `model` on every image of `data`, on the CPU, shape (N, classes)."""
    was_training = model.training
    model.eval()
    out = [model(x).float().cpu() for x, _ in iterate_batches(data, spec, batch_size, device)]
    model.train(was_training)
    return torch.cat(out)


def scores(logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> dict[str, float]:
    """top1, top5 (fractions in [0, 1]) and, with teacher logits, top-1 agreement with the teacher."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    res = {"top1": (top[:, 0] == y).float().mean().item(),
           "top5": (top == y[:, None]).any(1).float().mean().item(), "n": int(y.numel())}
    if teacher_logits is not None:
        res["agreement"] = (teacher_logits.argmax(1) == top[:, 0]).float().mean().item()
        res["teacher_top1"] = (teacher_logits.argmax(1) == y).float().mean().item()
    return res


def default_batch(spec: InputSpec) -> int:
    """Images per evaluation forward: 1000 at 32 px and below, fewer for larger inputs (about 32 MB of input)."""
    return max(1, min(1000, 1000 * 32 * 32 * 3 // spec.pixels))


def accuracy(model: nn.Module, data: ImageData, spec: InputSpec, device: torch.device | str,
             teacher: nn.Module | None = None, teacher_spec: InputSpec | None = None,
             batch_size: int | None = None) -> dict[str, float]:
    """Evaluate `model` (and optionally its agreement with `teacher`) on `data`, `batch_size` images at a time.

    `batch_size` None: `default_batch(spec)`.
    """
    bs = batch_size or default_batch(spec)
    t = predict(teacher, data, teacher_spec or spec, device, bs) if teacher is not None else None
    return scores(predict(model, data, spec, device, bs), data.y, t)
