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


def size_note(data: ImageData, spec: InputSpec) -> str:
    """How `data`'s images reach the model's input: '' when they are its kind, else e.g. '28x28 resized to 32x32'.

    `to_model_input` resizes bilinearly (28-px MNIST to a 32-px LeNet, as DAFL and DFAD do); images of another
    aspect ratio are 'stretched to' it. Sizes are height x width, as `--input-size` takes them. Colour images read
    by a grey model are averaged to grey, grey ones read by a colour model repeated to 3 channels: said too
    (CIFAR-10 images averaged for an MNIST teacher trained on them unsaid).
    """
    c, h, w = (int(s) for s in data.x.shape[-3:])
    notes = []
    if c != spec.channels:
        notes.append("colour averaged to grey" if spec.channels == 1 else f"grey repeated to {spec.channels} channels")
    if (h, w) != spec.hw:
        stretched = abs(w / h - spec.hw[1] / spec.hw[0]) > 0.01
        notes.append(f"{h}x{w} {'stretched' if stretched else 'resized'} to {spec.hw[0]}x{spec.hw[1]}")
    return ", ".join(notes)


def doubtful_top1(num_classes: int) -> float:
    """The top-1 at or below which a teacher has not recognised its data: min(4 / K, 1 / K + 0.25 * (1 - 1 / K)).

    Four times chance for many classes (0.4 % of ImageNet's 1000), a quarter of the way from chance to perfect for
    few (32.5 % at K = 10, 62.5 % at K = 2): a weak teacher of its own data scores above that, a teacher shown
    another task's images or its own images prepared otherwise scores near chance (the demo LeNet-5, 99.21 % on
    MNIST, answers 30.9 % of MNIST padded to 64 px and read at 32; a Fashion-MNIST LeNet-5 14.5 % of MNIST).
    """
    chance = 1.0 / num_classes
    return min(4 * chance, chance + 0.25 * (1 - chance))


def data_doubt(top1: float, num_classes: int, flag: str, path: str, resized: str, recorded: float | None = None,
               who: str = "the teacher") -> str | None:
    """A warning when a model that should know the data (`who`) scores near chance on it, else None.

    Also when it scores 5 points under the top-1 its file records (`recorded`). Evaluated against labels that
    model does not give, a student's test accuracy says little.
    """
    if top1 > doubtful_top1(num_classes) and (recorded is None or top1 >= recorded - 0.05):
        return None
    against = f"chance is {100 / num_classes:.1f}%" if recorded is None or top1 <= doubtful_top1(num_classes) \
        else f"its file records {100 * recorded:.2f}% on its test data"
    how = f"; the images are {resized}" if resized else ""
    return (f"{who} answers only {100 * top1:.2f}% of {flag} {path} right ({against}{how}): check that they are "
            "images of its task, prepared as it was trained (size, padding, --mean/--std), with labels in its class "
            "order")
