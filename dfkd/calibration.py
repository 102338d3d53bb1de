"""Calibration images for post-training quantization, from a data-free method, a file, or noise.

`--calibration` takes:
  - a registered method name (zeroq, deepinversion, dfq, zskd, dfad, ...): images synthesized from the teacher
    alone through `dfkd.transfer.synthesize`, exactly as `dfkd synthesize` makes them;
  - a `.npz`: a `dfkd synthesize` transfer file, or real images (x, y) as `dfkd evaluate --data` reads them;
  - `noise`: uniform random pixels (the lower reference a data-free calibration must beat).

The default, `DEFAULT_CALIBRATION`, is ZSKD's data impressions (Nayak et al., ICML 2019: inputs optimised so the
teacher's softmax matches Dirichlet targets drawn around its own class similarities). They need nothing of the
teacher but its logits, and on the two MNIST demo teachers, with and without BatchNorm, three students and three
seeds, they kept int8 nearly as close to float as 512 real training images do (top-1 the same as float on 99.11-99.78 %
of the test images, real images 99.21-99.79 %, noise 95.18-98.21 %). The BatchNorm-matching sources depend on
the teacher: DeepInversion is as good on the BatchNorm teacher and far worse than noise without BatchNorm (81.7 %),
ZeroQ is no better than noise even with it (README, "int8 students").
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from dfkd.errors import DfkdError
from dfkd.io import open_npz
from dfkd.spec import InputSpec
from dfkd.teacher import Teacher

NOISE = "noise"
DEFAULT_CALIBRATION = "zskd"


def noise_pixels(spec: InputSpec, num: int, seed: int = 0) -> torch.Tensor:
    """Uniform random uint8 pixels, shape (num, C, S, S)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, spec.shape(num), generator=g, dtype=torch.uint8)


def file_pixels(path: Path, num: int, seed: int = 0) -> torch.Tensor:
    """uint8 pixels of a transfer file, an image-data .npz or an image folder (a random `num` when it holds more)."""
    from dfkd.data import load_images
    from dfkd.transfer import load_transfer

    is_transfer = False
    if not path.is_dir():  # an image folder (one sub-folder per class) is image data
        with open_npz(path, "--calibration") as d:
            is_transfer = "probs" in d.files
    x = load_transfer(path, "--calibration").x if is_transfer else load_images(path, "--calibration").x
    if len(x) > num:
        return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:num]]
    return x if torch.is_tensor(x) else x[torch.arange(len(x))]  # an image folder's, decoded


def calibration_params(teacher: Teacher, method: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """`params` with `s_steps` 0 for a method that makes images batch by batch (not a generator method).

    Such a method trains its student `s_steps` steps between two batches, a student calibration throws away: its
    images are the same without those steps (up to the student-dependent terms of adaptive methods), at a
    fraction of the time. A generator method's generator learns against the student, so it keeps its recipe,
    and so does an `s_steps` the user gave.
    """
    from dfkd.methods import get_method
    from dfkd.methods._gan import GANMethod

    params = dict(params or {})
    cls = get_method(method)
    if "s_steps" not in params and not issubclass(cls, GANMethod) and \
            "s_steps" in cls.default_params(teacher, params.get("recipe")):
        params["s_steps"] = 0
    return params


def synthesized_pixels(teacher: Teacher, method: str, num: int, seed: int = 0, device: str | torch.device = "cpu",
                       params: dict[str, Any] | None = None, steps: int | None = None) -> torch.Tensor:
    """`num` uint8 images a data-free method synthesizes from `teacher` (see `dfkd.transfer.synthesize`).

    A method that makes images batch by batch runs with `s_steps` 0 unless `params` says otherwise
    (`calibration_params`).
    """
    from dfkd.transfer import synthesize

    params = calibration_params(teacher, method, params)
    with tempfile.TemporaryDirectory(prefix="dfkd-calib-") as d:
        data = synthesize(teacher, method, num, Path(d) / "calibration.npz", params=params, seed=seed, device=device,
                          steps=steps, progress=True)
        return data.x.clone()


def check_teacher(teacher: Teacher, spec: InputSpec, num_classes: int | None = None) -> None:
    """Refuse a `--teacher` of another channel count or class count than the model to quantize.

    Its images would be of another kind (CIFAR colour images calibrating an MNIST model) and its answers, compared
    with the model's, of other classes. Another image size is read as everywhere in dfkd: resized.
    """
    if teacher.spec.channels != spec.channels:
        raise DfkdError(f"--teacher {teacher.source}: takes {teacher.spec.describe()} inputs, the model "
                        f"{spec.describe()}; give the teacher the model was distilled from")
    if num_classes is not None and teacher.num_classes != num_classes:
        raise DfkdError(f"--teacher {teacher.source}: has {teacher.num_classes} classes, the model {num_classes}; "
                        "give the teacher the model was distilled from")


def calibration_pixels(source: str, num: int, spec: InputSpec, teacher: Teacher | None = None, seed: int = 0,
                       device: str | torch.device = "cpu", params: dict[str, Any] | None = None,
                       steps: int | None = None, num_classes: int | None = None) -> torch.Tensor:
    """uint8 calibration images (N, C, H, W) from `source`: a method name, a .npz file or "noise".

    Args:
        source: what `--calibration` says (see the module docstring).
        num: how many images.
        spec: the input spec of the model to calibrate ("noise" images have its shape).
        teacher: the teacher (needed for a method name).
        seed: random seed.
        device: where synthesis runs.
        params: method overrides (`-p`) for a method name.
        steps: student steps before collecting (generator methods train their generator this long).
        num_classes: the model's class count, which the teacher's must equal (None: not checked).

    Raises:
        DfkdError: for an unknown source, a missing teacher, a teacher or a file of other images than the model's,
            or an unreadable file.
    """
    from dfkd.methods import list_methods

    if num < 1:
        raise DfkdError(f"--num-calibration {num}: give a positive number of images")
    if teacher is not None:
        check_teacher(teacher, spec, num_classes)
    if source == NOISE:
        return noise_pixels(spec, num, seed)
    p = Path(source)
    if p.suffix == ".npz" or p.exists() or os.sep in source or source.startswith("."):  # a path: no method's name
        if not p.exists():
            raise DfkdError(f"--calibration {source}: no such file or folder")
        x = file_pixels(p, num, seed)
        if len(x) == 0:  # an int8 file calibrated on nothing has scales that mean nothing
            raise DfkdError(f"--calibration {p}: holds no images; give a file of images like the model's inputs, a "
                            "method name or noise")
        if x.shape[1] != spec.channels:  # the ranges of colour images averaged to grey are not the model's inputs'
            raise DfkdError(f"--calibration {p}: images have {x.shape[1]} channels, the model takes {spec.channels} "
                            f"({spec.describe()}); give images like the model's inputs, a method name or noise")
        return x
    if source not in list_methods():  # a missing file without "/" (calib.npy) reads as a name too
        raise DfkdError(f"--calibration {source}: neither a method ({', '.join(list_methods())}) nor an existing "
                        "file or folder; give one of those, a .npz file, an image folder or noise")
    if teacher is None:
        raise DfkdError(f"--calibration {source}: synthesizing calibration images needs the teacher; add --teacher T "
                        "(or give --calibration FILE.npz or noise)")
    return synthesized_pixels(teacher, source, num, seed, device, params, steps)
