"""Training a teacher on real data: `dfkd train-teacher` (standard augmentation, one-cycle schedule, `--precision`)."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dfkd.cost import millions
from dfkd.data import ImageData, check_training_labels, load_for, load_images, to_model_input
from dfkd.errors import DfkdError
from dfkd.evaluate import accuracy
from dfkd.hooks import is_batchnorm
from dfkd.modelfile import ModelFile, save_model
from dfkd.models import create
from dfkd.precision import Precision, auto_bf16_line, backward, resolve_precision, step
from dfkd.spec import InputSpec, split_size
from dfkd.utils import on_terminal, pick_device, progress_bar, seed_everything


@dataclass(frozen=True)
class TeacherConfig:
    """Settings of `dfkd train-teacher`; `None` means "pick from the data"."""

    data: str
    arch: str
    out: str
    eval_data: str | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    weight_decay: float = 5e-4
    input_size: int | tuple[int, int] = 32  # a side, or (height, width)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    force: bool = False  # --force: replace `out`, also a file that appears there while the teacher trains


def data_spec(data: ImageData, size: int | tuple[int, int]) -> InputSpec:
    """Normalisation from the training pixels themselves (per-channel mean and std in [0, 1] units).

    `size` is the model's input: a side, or (height, width).
    """
    n, total, squares = min(len(data), 20000), 0.0, 0.0
    for i in range(0, n, 1000):  # a batch at a time: 20,000 ImageNet-size images are 12 GB as floats
        x = data.x[i:min(i + 1000, n)].double().div(255.0)
        total, squares = total + x.sum((0, 2, 3)), squares + x.square().sum((0, 2, 3))
    count = n * data.x.shape[2] * data.x.shape[3]
    mean = total / count
    std = ((squares - count * mean.square()) / max(count - 1, 1)).clamp_min(0).sqrt()
    flat = [c for c in range(len(std)) if std[c] * 255 < 1e-3]
    if flat:  # it said "input spec: std values must be positive", a spec the user never gave
        raise DfkdError(f"--data: every pixel of channel {flat[0]} of its first {n} images is "
                        f"{round(float(mean[flat[0]]) * 255)}: images of one colour teach a classifier nothing; "
                        "give the real training images")
    height, width = split_size(size)
    spec = InputSpec(data.x.shape[1], height, tuple(mean.tolist()), tuple(std.tolist()), width)
    h, w = data.x.shape[2:]
    if abs(h / w - spec.size / spec.width) > 0.02 * h / w:  # a square model on 28x48 images squeezed them unsaid
        warnings.warn(f"--data: its images are {h}x{w} (height x width) and the model's input {spec.size}x{spec.width}"
                      f": each is stretched to that shape; give --input-size {h}x{w} to keep theirs", stacklevel=2)
    return spec


def augment(x01: torch.Tensor, flip: bool) -> torch.Tensor:
    """Random translation (zero fill) and, for colour images, horizontal flips.

    Colour images shift by up to 1/8 of the side (CIFAR's pad-4 crop); grey digits by 1/16 (a 4-pixel shift
    crops MNIST strokes at 32 px).
    """
    b, c, h, w = x01.shape
    pad = max(1, h // 8 if c == 3 else h // 16)
    shift = torch.randint(-pad, pad + 1, (b, 2), device=x01.device).float()
    theta = torch.zeros(b, 2, 3, device=x01.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2], theta[:, 1, 2] = 2 * shift[:, 0] / w, 2 * shift[:, 1] / h
    grid = F.affine_grid(theta, list(x01.shape), align_corners=False)
    x01 = F.grid_sample(x01, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    if flip:
        mask = torch.rand(b, device=x01.device) < 0.5
        x01 = torch.where(mask[:, None, None, None], x01.flip(-1), x01)
    return x01


def train_teacher(cfg: TeacherConfig) -> dict[str, float]:
    """Train zoo model `cfg.arch` on `cfg.data` and write a dfkd model file to `cfg.out`.

    Returns:
        {"train_loss": ..., "top1": ...} (top1 on `cfg.eval_data`, if given).
    """
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data = load_images(cfg.data)
    num_classes = check_training_labels(data, "--data", cfg.data)
    spec = data_spec(data, cfg.input_size)
    test = load_for(cfg.eval_data, "--eval-data", num_classes, spec, data.class_names) if cfg.eval_data else None
    kwargs = {"num_classes": num_classes, "in_channels": spec.channels, "input_size": spec.side}
    model = create(cfg.arch, **kwargs).to(device)
    if cfg.batch_size == 1 and any(is_batchnorm(m) for m in model.modules()):
        raise DfkdError(f"--batch-size 1: {cfg.arch} has BatchNorm layers, which need at least 2 images a batch in "
                        "training; give --batch-size 2 or more")
    precision = _precision(cfg.precision, model, spec, device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(batch_starts(len(data), cfg.batch_size)) - 1
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    result: dict[str, float] = {}
    precision.prepare({"model": model})
    try:
        for epoch in range(cfg.epochs):
            result["train_loss"] = _epoch(model, data, spec, opt, sched, cfg, device, epoch, precision)
            if test is not None:  # evaluated in fp32
                result["top1"] = accuracy(model, test, spec, device)["top1"]
                tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: loss {result['train_loss']:.4f}, "
                           f"test top-1 {100 * result['top1']:.2f}%")
    finally:
        precision.restore()
    model.to(memory_format=torch.contiguous_format)  # the file holds plain tensors whatever the run's layout
    meta = ModelFile(cfg.arch, kwargs, spec, num_classes, data.class_names,
                     {"kind": "teacher", "trained_on": os.path.basename(cfg.data), "epochs": cfg.epochs, **result})
    save_model(cfg.out, model, meta, replace=cfg.force)
    return result


def _precision(name: str, model: torch.nn.Module, spec: InputSpec, device: torch.device) -> Precision:
    """The training's numerics from `--precision`; `auto`'s bf16 is said on one line.

    `auto` is bf16 on a CPU with a native bf16 unit for a model past the CPU recipes' multiply-add line (as
    `dfkd distill` decides for its teacher), fp32 otherwise.
    """
    from dfkd.methods import _recipes  # here: dfkd.methods imports this module (the real-data source's augment)

    macs = _recipes.heavy_model(model, spec) if name == "auto" else None
    resolved = resolve_precision(name, device, heavy=macs is not None)
    if name == "auto" and resolved == "bf16":
        tqdm.write(auto_bf16_line("model", millions(macs)))
    return Precision(resolved, device)


def batch_starts(n: int, batch_size: int) -> list[int]:
    """Where an epoch's batches begin, and `n` at the end; a last batch of one image joins the one before it.

    BatchNorm cannot train on a batch of one (129 images at batch 128 stopped the first epoch with a traceback).
    """
    bounds = [*range(0, n, batch_size), n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return bounds


def _epoch(model, data, spec, opt, sched, cfg, device, epoch, precision) -> float:  # noqa: ANN001
    model.train()
    order = torch.randperm(len(data))
    total, n = 0.0, 0
    bounds = batch_starts(len(data), cfg.batch_size)
    with progress_bar(iterable=range(len(bounds) - 1), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False) as bar:
        for b in bar:
            i = bounds[b]
            idx = order[i:bounds[b + 1]]
            x01 = spec.denormalize(to_model_input(data.x[idx], spec)).to(device)
            x = spec.normalize(augment(x01, flip=spec.channels == 3))
            with precision.autocast():  # weights, optimiser and loss in fp32; under bf16/fp16 the layers compute in it
                loss = F.cross_entropy(model(x).float(), data.y[idx].to(device))
                opt.zero_grad(set_to_none=True)
                backward(loss)
                step(opt)
            sched.step()
            value = loss.item()
            if not math.isfinite(value):  # the weights are spoilt from here on: nothing is written
                raise DfkdError(f"training diverged in epoch {epoch + 1} (batch {b + 1}): the loss "
                                f"became {value}; lower --lr (now {cfg.lr}) and run again; {cfg.out} was not written")
            total, n = total + value * len(idx), n + len(idx)
            bar.set_postfix(loss=f"{total / n:.4f}", refresh=on_terminal())
    return total / max(n, 1)
