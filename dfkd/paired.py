"""Paired two-modality image files for cross-modal distillation (`--method crossmodal`), and a helper that makes them.

A paired file is an .npz with two uint8 image arrays of the same length, row i of one recording the same scene as
row i of the other:

    x_teacher   uint8 (N, H, W) or (N, H, W, C) or (N, C, H, W)   modality A, what the teacher was trained on
    x_student   uint8, same layouts, any channels and size           modality B, what the student will see

No labels are needed (a `y` array, if present, is ignored by training). `make_paired` builds such files from a
labelled image set: modality B is a Sobel edge map (`edges`, via kornia) or the grey version of colour images
(`gray`); with `student_only=True` it writes modality B with the labels instead (`x`, `y`), a test set for
`--eval-data`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from dfkd.data import ImageData, as_nchw, load_images
from dfkd.errors import DfkdError
from dfkd.io import atomic_save_npz, open_npz

KINDS = ("edges", "gray")


def _as_nchw(x: np.ndarray, key: str, p: Path) -> torch.Tensor:
    stored, x = x.shape, as_nchw(x)
    if x.ndim != 4 or x.dtype != np.uint8:
        raise DfkdError(f"--data {p}: '{key}' must be uint8 images N x H x W [x C], got {x.dtype} {stored}")
    return torch.from_numpy(np.ascontiguousarray(x))


def load_paired(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """The two modalities of a paired file as uint8 (N, C, H, W) tensors: (x_teacher, x_student).

    Raises:
        DfkdError: a missing, unreadable or unpaired file, in one line naming it.
    """
    p = Path(path)
    if not p.is_file():
        raise DfkdError(f"--data {p}: no such file; crossmodal needs an .npz with x_teacher and x_student")
    with open_npz(p, "--data") as d:
        if "x_teacher" not in d or "x_student" not in d:
            raise DfkdError(f"--data {p}: a paired file needs arrays 'x_teacher' (modality A) and 'x_student' "
                            f"(modality B); it has {sorted(d.files)} (make one with bench/make_paired.py)")
        a, b = _as_nchw(d["x_teacher"], "x_teacher", p), _as_nchw(d["x_student"], "x_student", p)
    if len(a) != len(b) or len(a) == 0:
        raise DfkdError(f"--data {p}: x_teacher has {len(a)} images and x_student {len(b)}; pairs need equal, "
                        "non-zero counts")
    return a, b


def to_modality(x: torch.Tensor, kind: str) -> torch.Tensor:
    """uint8 (N, C, H, W) images -> uint8 modality-B images: `edges` (Sobel magnitude, 1 channel) or `gray`."""
    import kornia

    x01 = x.float() / 255
    grey = kornia.color.rgb_to_grayscale(x01) if x.shape[1] == 3 else x01
    if kind == "gray":
        out = grey
    elif kind == "edges":
        out = kornia.filters.sobel(grey)
        out = out / out.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    else:
        raise DfkdError(f"--to {kind}: use one of {', '.join(KINDS)}")
    return (out.clamp(0, 1) * 255).round().to(torch.uint8)


def make_paired(src: str | os.PathLike, kind: str, out: str | os.PathLike, student_only: bool = False,
                limit: int | None = None) -> int:
    """Write a paired file (A = the images of `src`, B = `to_modality(A, kind)`) or B's labelled set.

    Args:
        src: a labelled .npz (x, y).
        kind: "edges" or "gray".
        out: the .npz to write (atomically).
        student_only: write modality B with the labels (`x`, `y`, for `--eval-data` or `train-teacher`).
        limit: keep the first `limit` images.

    Returns:
        The number of images written.
    """
    data: ImageData = load_images(src, "--data")
    x, y = data.x[:limit], data.y[:limit]
    b = torch.cat([to_modality(x[i:i + 4096], kind) for i in range(0, len(x), 4096)])
    arrays = {"x": b.numpy(), "y": y.numpy()} if student_only else {"x_teacher": x.numpy(), "x_student": b.numpy()}
    atomic_save_npz(out, arrays)
    return len(x)
