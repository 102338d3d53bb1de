"""The privacy split: synthesize transfer data once where the teacher lives, distill from the file elsewhere.

A transfer file is an .npz written atomically by `synthesize()` (`dfkd synthesize`):

    x               uint8 (N, C, S, S)   the synthetic images as 8-bit pixels (denormalised; what a PNG would hold)
    probs           float32 (N, K)       the teacher's softmax (T = 1) on exactly those pixels
    y               int64 (N,)           argmax of probs, so `dfkd evaluate --data` and `train-teacher` read it too
    channels, size, mean, std, num_classes     the teacher's input spec
    method, teacher_sha256, format ("dfkd-transfer"), version
    provenance      JSON text: teacher (file name, sha256, top-1 if known), method, settings, labels, dfkd version, date
    recipe          JSON text: the method's student-side settings (optimizer, lr, batch, T, schedule, augmentation),
                    which `distill --transfer-data` adopts so the receiver trains as the method would in place

Version 1 files (no provenance, no recipe) still load. The stored probabilities are the teacher's softmax, or
less of it (`dfkd.labels`: top-k, hard, tempered, rounded) when the owner chose to ship less.

8-bit pixels are a quarter of float32 and lose nothing the teacher can see (the probabilities are computed on the
quantised images, so each pair matches exactly). `dfkd distill --transfer-data FILE --student ARCH` trains from it
with no teacher file (the "transfer" method, on the stored probabilities); adding `--teacher` recomputes the
teacher's logits on the stored images.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dfkd.errors import DfkdError
from dfkd.io import atomic_save_npz, memmap_member, open_npz
from dfkd.spec import InputSpec
from dfkd.teacher import Teacher

FORMAT, VERSION = "dfkd-transfer", 2
_KEYS = ("x", "probs", "channels", "size", "mean", "std", "num_classes", "method", "teacher_sha256", "version")


def to_pixels(x: Tensor, spec: InputSpec) -> Tensor:
    """Normalised images -> uint8 pixels (clipped to the valid range)."""
    return (spec.denormalize(x.detach().float().cpu()).clamp(0, 1) * 255).round().to(torch.uint8)


def from_pixels(x: Tensor, spec: InputSpec) -> Tensor:
    """uint8 pixels -> the normalised input space of `spec`."""
    return spec.normalize(x.float() / 255)


@dataclass
class TransferData:
    """A loaded transfer file: 8-bit images, the teacher's probabilities and the spec they were made for."""

    x: Tensor
    probs: Tensor
    spec: InputSpec
    method: str
    teacher_sha256: str
    path: str
    provenance: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.probs.shape[1])

    @property
    def class_names(self) -> list[str] | None:
        """The teacher's class names, where its file named them (checked by `load_transfer`)."""
        teacher = self.provenance.get("teacher")
        return teacher.get("class_names") if isinstance(teacher, dict) else None

    def subset(self, idx: Tensor) -> TransferData:
        """The images and labels at `idx` (the same spec, provenance and path)."""
        return TransferData(self.x[idx], self.probs[idx], self.spec, self.method, self.teacher_sha256, self.path,
                            self.provenance, self.recipe)

    def images(self, idx: Tensor, spec: InputSpec | None = None) -> Tensor:
        """Images `idx`, normalised for `spec` (default the file's own)."""
        return from_pixels(self.x[idx], spec or self.spec)

    def logits(self, idx: Tensor) -> Tensor:
        """Logits equivalent to the stored probabilities (log p: softmax at any T ignores the missing constant)."""
        return self.probs[idx].clamp_min(torch.finfo(torch.float32).tiny).log()


def save_transfer(path: str | os.PathLike, x: Tensor, probs: Tensor, spec: InputSpec, method: str,
                  teacher_sha256: str, provenance: dict[str, Any] | None = None,
                  recipe: dict[str, Any] | None = None) -> None:
    """Write a transfer file atomically (`x` uint8 pixels, `probs` the teacher's softmax on them, or less of it)."""
    atomic_save_npz(path, {
        "x": x.numpy(), "probs": probs.float().numpy(), "y": probs.argmax(1).numpy().astype(np.int64),
        **meta_arrays(spec, probs.shape[1], method, teacher_sha256, provenance, recipe)})


def meta_arrays(spec: InputSpec, num_classes: int, method: str, teacher_sha256: str,
                provenance: dict[str, Any] | None, recipe: dict[str, Any] | None) -> dict[str, np.ndarray]:
    """Every array of a transfer file but the images and labels."""
    return {"provenance": np.str_(json.dumps(provenance or {})), "recipe": np.str_(json.dumps(recipe or {})),
            "channels": np.int64(spec.channels), "size": np.int64(spec.size), "width": np.int64(spec.width),
            "mean": np.asarray(spec.mean, np.float64), "std": np.asarray(spec.std, np.float64),
            "num_classes": np.int64(num_classes), "method": np.str_(method),
            "teacher_sha256": np.str_(teacher_sha256), "format": np.str_(FORMAT), "version": np.int64(VERSION)}


def _read(p: Path, flag: str) -> dict[str, np.ndarray]:
    if p.is_dir():
        raise DfkdError(f"{flag} {p}: is a folder; give a transfer .npz file written by `dfkd synthesize`")
    if not p.is_file():
        raise DfkdError(f"{flag} {p}: no such file")
    with open_npz(p, flag) as d:
        if "format" not in d.files or str(d["format"]) != FORMAT:
            raise DfkdError(f"{flag} {p}: not a dfkd transfer file (write one with `dfkd synthesize`); it holds "
                            f"arrays {sorted(d.files)}")
        missing = [k for k in _KEYS if k not in d.files]
        if missing:
            raise DfkdError(f"{flag} {p}: transfer file lacks {missing}; write it again with `dfkd synthesize`")
        out = {k: d[k] for k in (*_KEYS, "provenance", "recipe", "width") if k in d.files and k != "x"}
        x = memmap_member(p, "x")  # mapped, not read (a large compressed one via a temp file): files beyond RAM load
        out["x"] = d["x"] if x is None else x
        return out


def load_transfer(path: str | os.PathLike, flag: str = "--transfer-data") -> TransferData:
    """Read and check a transfer file; every problem is a DfkdError naming the file and what is wrong."""
    p = Path(path)
    d = _read(p, flag)
    version = _whole(d, "version", flag, p)
    if version > VERSION:
        raise DfkdError(f"{flag} {p}: transfer format version {version} is newer than this dfkd; upgrade")
    try:
        spec = InputSpec(int(d["channels"]), int(d["size"]), tuple(d["mean"].tolist()), tuple(d["std"].tolist()),
                         int(d["width"]) if "width" in d else None)  # no width: a square file of before
    except (DfkdError, TypeError, ValueError) as e:
        raise DfkdError(f"{flag} {p}: its input spec is invalid ({e})") from None
    x, probs = d["x"], d["probs"]
    if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != spec.shape()[1:] or len(x) == 0:
        raise DfkdError(f"{flag} {p}: images must be uint8 of shape (N>0, {spec.channels}, {spec.size}, "
                        f"{spec.width}) as its spec says, got {x.dtype} {tuple(x.shape)}")
    k = _whole(d, "num_classes", flag, p)
    if probs.dtype.kind != "f":
        raise DfkdError(f"{flag} {p}: 'probs' must be floating-point probabilities, got {probs.dtype}; write the file "
                        "again with `dfkd synthesize`")
    if probs.ndim != 2 or probs.shape != (len(x), k) or not np.isfinite(probs).all() or (probs < 0).any() \
            or not np.allclose(probs.sum(1), 1.0, atol=1e-3):
        raise DfkdError(f"{flag} {p}: 'probs' must hold one probability row of {k} classes per image "
                        f"({len(x)} x {k}), got shape {tuple(probs.shape)} or rows that are not distributions")
    x = x if isinstance(x, np.memmap) else np.ascontiguousarray(x)
    data = TransferData(torch.from_numpy(x), torch.from_numpy(probs.astype(np.float32)), spec,
                        str(d["method"]), str(d["teacher_sha256"]), str(p), _json(d, "provenance", flag, p),
                        _checked_recipe(_json(d, "recipe", flag, p), flag, p))
    names = data.class_names
    if names is not None and (not isinstance(names, list) or len(names) != k or
                              not all(isinstance(n, str) for n in names)):
        raise DfkdError(f"{flag} {p}: its recorded class names are damaged (not {k} names); write the file again "
                        "with `dfkd synthesize`")
    return data


def _checked_recipe(recipe: dict[str, Any], flag: str, p: Path) -> dict[str, Any]:
    """The file's student recipe, its values held to the transfer method's rules (as `-p` values are).

    A damaged or hand-edited recipe (batch_size -3) ran until the first batch and failed there, a traceback and a
    run folder that looked resumable; -p given with it was blamed for values the user never gave.
    """
    from dfkd.methods import get_method
    from dfkd.validate import check_params

    defaults = get_method("transfer").default_params(None)
    try:
        check_params({k: v for k, v in recipe.items() if k in defaults}, defaults, "transfer", "recipe")
    except DfkdError as e:
        raise DfkdError(f"{flag} {p}: its recorded student recipe is damaged ({str(e).removeprefix('recipe: params.')}"
                        "); write the file again with `dfkd synthesize`") from None
    return recipe


def _whole(d: dict[str, np.ndarray], key: str, flag: str, p: Path) -> int:
    """A whole-number scalar entry of the file (a damaged one named, not a traceback)."""
    value = d[key]
    if value.ndim != 0 or value.dtype.kind not in "iu":
        raise DfkdError(f"{flag} {p}: its '{key}' entry must be one whole number, got {value.dtype} of shape "
                        f"{value.shape}; write the file again with `dfkd synthesize`")
    return int(value)


def _json(d: dict[str, np.ndarray], key: str, flag: str, p: Path) -> dict[str, Any]:
    if key not in d:
        return {}
    try:
        out = json.loads(str(d[key]))
    except ValueError:
        out = None
    if not isinstance(out, dict):
        raise DfkdError(f"{flag} {p}: its '{key}' entry is not a JSON object; write the file again with "
                        "`dfkd synthesize`")
    return out


def check_teacher_fits(teacher: Teacher, data: TransferData) -> None:
    """A teacher used with a transfer file must take its images and have its classes (a different file hash warns).

    The images are pixels, so a teacher with another normalisation still reads them (each side normalises its own).
    """
    if teacher.spec.shape()[1:] != data.spec.shape()[1:] or teacher.num_classes != data.num_classes:
        raise DfkdError(
            f"--transfer-data {data.path}: holds {data.spec.describe()} images over "
            f"{data.num_classes} classes, but --teacher {teacher.source} takes {teacher.spec.describe()} images and "
            f"has {teacher.num_classes} classes")
    if data.teacher_sha256 and teacher.sha256 and data.teacher_sha256 != teacher.sha256:
        def short(sha: str) -> str:  # an ensemble's is its members', comma-separated
            return " + ".join(f"{s[:12]}..." for s in sha.split(","))

        warnings.warn(f"--transfer-data {data.path} was made from another teacher (sha256 {short(data.teacher_sha256)}"
                      f", --teacher is {short(teacher.sha256)}); distilling anyway", stacklevel=2)


@torch.no_grad()
def teacher_probs(teacher: Teacher, x: Tensor, device: torch.device, batch: int = 256) -> Tensor:
    """The teacher's softmax on uint8 images `x`, in batches, on CPU."""
    out = [torch.softmax(teacher(from_pixels(x[i:i + batch], teacher.spec).to(device)).float(), 1).cpu()
           for i in range(0, len(x), batch)]
    return torch.cat(out)


# The owner's side lives in dfkd.synthesis; `dfkd.transfer.synthesize` stays its public name.
from dfkd.synthesis import check_synthesis_method, default_num, synthesize  # noqa: E402, F401
