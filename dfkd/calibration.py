"""Calibration images for post-training quantization, from a data-free method, a file, or noise.

`--calibration` takes:
  - a registered method name (zeroq, deepinversion, dfq, zskd, dfad, ...): images synthesized from the teacher
    alone through `dfkd.transfer.synthesize`, exactly as `dfkd synthesize` makes them;
  - a `.npz`: a `dfkd synthesize` transfer file, or real images (x, y) as `dfkd evaluate --data` reads them;
  - `noise`: uniform random pixels (the lower reference a data-free calibration must beat).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from dfkd.errors import DfkdError
from dfkd.io import open_npz
from dfkd.spec import InputSpec
from dfkd.teacher import Teacher

NOISE = "noise"


def noise_pixels(spec: InputSpec, num: int, seed: int = 0) -> torch.Tensor:
    """Uniform random uint8 pixels, shape (num, C, S, S)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, spec.shape(num), generator=g, dtype=torch.uint8)


def file_pixels(path: Path, num: int, seed: int = 0) -> torch.Tensor:
    """uint8 pixels of a transfer file or an image-data .npz (a random subset of `num` when it holds more)."""
    from dfkd.data import load_images
    from dfkd.transfer import load_transfer

    with open_npz(path, "--calibration") as d:
        is_transfer = "probs" in d.files
    x = load_transfer(path, "--calibration").x if is_transfer else load_images(path, "--calibration").x
    if len(x) > num:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:num]]
    return x


def synthesized_pixels(teacher: Teacher, method: str, num: int, seed: int = 0, device: str | torch.device = "cpu",
                       params: dict[str, Any] | None = None, steps: int | None = None) -> torch.Tensor:
    """`num` uint8 images a data-free method synthesizes from `teacher` (see `dfkd.transfer.synthesize`)."""
    from dfkd.transfer import synthesize

    with tempfile.TemporaryDirectory(prefix="dfkd-calib-") as d:
        data = synthesize(teacher, method, num, Path(d) / "calibration.npz", params=params, seed=seed, device=device,
                          steps=steps, progress=True)
        return data.x.clone()


def calibration_pixels(source: str, num: int, spec: InputSpec, teacher: Teacher | None = None, seed: int = 0,
                       device: str | torch.device = "cpu", params: dict[str, Any] | None = None,
                       steps: int | None = None) -> torch.Tensor:
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

    Raises:
        DfkdError: for an unknown source, a missing teacher, or an unreadable file.
    """
    from dfkd.methods import get_method, list_methods

    if num < 1:
        raise DfkdError(f"--num-calibration {num}: give a positive number of images")
    if source == NOISE:
        return noise_pixels(spec, num, seed)
    p = Path(source)
    if p.suffix == ".npz" or p.exists():
        if not p.is_file():
            raise DfkdError(f"--calibration {p}: no such file")
        return file_pixels(p, num, seed)
    if source not in list_methods():
        get_method(source)  # the registry's error lists the methods
    if teacher is None:
        raise DfkdError(f"--calibration {source}: synthesizing calibration images needs the teacher; add --teacher T")
    return synthesized_pixels(teacher, source, num, seed, device, params, steps)
