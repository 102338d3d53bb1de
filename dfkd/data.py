"""Real image data (the .npz layout of shared/data, or ImageFolder directories) brought to a model's input spec."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dfkd.errors import DfkdError
from dfkd.io import memmap_member, open_npz
from dfkd.spec import InputSpec

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageData:
    """Images as uint8 (N, C, H, W) and labels as int64 (N,), with optional class names.

    `x` is a tensor (an .npz's, mapped from disk where it was stored or is large) or, for an image folder, a
    `FolderImages` that decodes the images indexed; index it, do not take the whole of it.
    """

    x: torch.Tensor | FolderImages
    y: torch.Tensor
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return int(self.y.numel())

    @property
    def num_classes(self) -> int:
        return int(self.y.max().item()) + 1 if len(self) else 0

    def subset(self, key: slice | torch.Tensor) -> ImageData:
        """The images and labels at `key` (an image folder's stay undecoded)."""
        x = self.x.take(key) if isinstance(self.x, FolderImages) else self.x[key]
        return ImageData(x, self.y[key], self.class_names)


def load_images(path: str | os.PathLike, flag: str = "--data") -> ImageData:
    """Load an .npz (x: uint8 N x H x W [x C], y: int N) or an ImageFolder directory (one folder per class).

    An .npz written with `np.savez` (members stored, not compressed) has its images mapped from disk and an image
    folder's are decoded when indexed, so only the batches read sit in memory (an ImageNet-size validation set is
    ~7.5 GB); a compressed .npz (`np.savez_compressed`) is read whole up to 1 GiB of images and past that
    decompressed once to a temporary file and mapped from there (`dfkd.io.memmap_member`).
    """
    if not str(path).strip():  # Path("") is the working folder, read as an image folder
        raise DfkdError(f"{flag}: an empty path; give an .npz file or an image folder")
    p = Path(path)
    if not p.exists():
        raise DfkdError(f"{flag} {p}: no such file or directory")
    return _load_folder(p, flag) if p.is_dir() else _load_npz(p, flag)


def as_nchw(x: np.ndarray) -> np.ndarray:
    """Images as stored (N x H x W, N x H x W x C or N x C x H x W) -> N x C x H x W, a view (other ranks kept)."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return x.transpose(0, 3, 1, 2)
    return x


def _load_npz(p: Path, flag: str) -> ImageData:
    with open_npz(p, flag, "arrays 'x' (images) and 'y' (labels); write it with "
                  "np.savez(path, x=images, y=labels)") as d:
        if "x" not in d or "y" not in d:
            raise DfkdError(f"{flag} {p}: an .npz needs arrays 'x' (images) and 'y' (labels); it has "
                            f"{sorted(d.files)}")
        x = memmap_member(p, "x")  # a stored (np.savez) member is mapped, not read: memory grows with the batch
        x, y = (d["x"] if x is None else x), d["y"]
    stored, x = x.shape, as_nchw(x)
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
        raise DfkdError(f"{flag} {p}: expected x of shape N x H x W [x C] and y of shape N, "
                        f"got {stored} and {y.shape}")
    if x.dtype != np.uint8:
        raise DfkdError(f"{flag} {p}: x must be uint8 pixels (0..255), got {x.dtype}")
    if 0 in x.shape[1:]:
        raise DfkdError(f"{flag} {p}: x of shape {stored} holds images without pixels (a side or channel count of "
                        "0); store N x H x W [x C] images")
    _, a, b, c = x.shape
    if a not in (1, 3) and a == b and c < a:  # N x 28 x 28 x 2 read as 28 channels of 28 x 2 pixels, unsaid
        raise DfkdError(f"{flag} {p}: x of shape {stored} looks like N x H x W x C with {c} channels last, and only "
                        f"1 or 3 channels may come last (read as N x C x H x W it would be images of {a} channels "
                        f"of {b} x {c} pixels): store it as N x C x H x W")
    x = x if isinstance(x, np.memmap) else np.ascontiguousarray(x)  # a mapped N x H x W x C file stays a view
    return ImageData(torch.from_numpy(x), torch.from_numpy(_int_labels(y, f"{flag} {p}")))


def _int_labels(y: np.ndarray, where: str) -> np.ndarray:
    """Labels as int64: integers as they are, whole-number floats with a warning, anything else refused."""
    if y.dtype.kind in "iub":
        return y.astype(np.int64)
    if y.dtype.kind != "f":
        raise DfkdError(f"{where}: labels 'y' must be integer class indices 0..K-1, got dtype {y.dtype}; map class "
                        "names to indices first")
    if not np.isfinite(y).all() or (y != np.round(y)).any():
        bad = y[~np.isfinite(y) | (y != np.round(y))][0]
        raise DfkdError(f"{where}: labels 'y' must be whole class indices 0..K-1, found {bad}")
    warnings.warn(f"{where}: labels 'y' are stored as {y.dtype}; read as integer class indices", stacklevel=3)
    return y.astype(np.int64)


def _load_folder(p: Path, flag: str) -> ImageData:
    from PIL import Image

    classes = sorted(d.name for d in p.iterdir() if d.is_dir())
    if not classes:
        raise DfkdError(f"{flag} {p}: an image folder needs one sub-folder per class")
    files, ys, shapes = [], [], []
    for label, name in enumerate(classes):
        for f in sorted((p / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                try:
                    with Image.open(f) as im:  # reads the header only
                        shapes.append((1 if im.mode in GREY_MODES else 3, im.height, im.width))
                except (OSError, SyntaxError, ValueError) as e:
                    raise _unreadable(flag, f, e) from None
                files.append(f)
                ys.append(label)
    if not files:
        raise DfkdError(f"{flag} {p}: no images found in its class folders")
    channels = max(c for c, _, _ in shapes)  # colour if any image is: the grey ones are read as colour
    sizes = {(h, w) for _, h, w in shapes}
    if len(sizes) == 1:
        return ImageData(FolderImages(files, (channels, *sizes.pop()), flag), torch.tensor(ys), classes)
    side = min(int(np.median([round(CROP * min(h, w)) for _, h, w in shapes])), MAX_SIDE)
    warnings.warn(f"{flag} {p}: its images differ in size; each is read as its centre square ({CROP:.1%} of its "
                  f"shorter side, the usual evaluation crop) resized to {side}x{side}", stacklevel=3)
    return ImageData(FolderImages(files, (channels, side, side), flag, crop=True), torch.tensor(ys), classes)


#: The centre crop of an image folder of several sizes: this share of each image's shorter side (timm's and
#: torchvision's evaluation view: resize to 256, crop 224), and the largest side it is kept at (memory).
CROP, MAX_SIDE = 0.875, 512


GREY_MODES = ("L", "1", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N")


def _eight_bit(im):  # noqa: ANN001, ANN202 - a PIL image in, a PIL image out (PIL is imported lazily)
    """A 16-bit grey image (Pillow's mode I;16, or I for older Pillows' 16-bit PNGs) scaled to 8 bits.

    PIL's `convert("L")` clips such an image at 255 instead of scaling it, so a 16-bit scan would read as almost
    white. A 32-bit float image (mode F) has no agreed range and is refused, and so is a 32-bit integer image
    (mode I) with values past 16 bits: scaling it as 16-bit would clip it.
    """
    from PIL import Image

    if im.mode == "F":
        raise ValueError("32-bit float pixels; save it as an 8- or 16-bit image")
    if im.mode != "I" and not im.mode.startswith("I;16"):
        return im
    a = np.asarray(im).astype(np.float64)
    if a.size and (a.min() < 0 or a.max() > 65535):
        raise ValueError("32-bit integer pixels past the 16-bit range; save it as an 8- or 16-bit image")
    a /= 257.0  # 0..65535 -> 0..255
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def _unreadable(flag: str, f: Path, e: Exception) -> DfkdError:
    return DfkdError(f"{flag} {f}: not a readable image ({str(e)[:100]}); remove or replace it")


class FolderImages:
    """An image folder's pictures as a uint8 (N, C, H, W) array that decodes only the images indexed.

    Indexing with an int gives one (C, H, W) tensor; with a slice, index tensor, list or boolean mask a
    (K, C, H, W) tensor. `take` gives a lazy subset. So memory grows with the batch read, not with the folder.
    With `crop`, each image is read as its centre square (CROP of its shorter side) resized to the shape's H x W:
    how a folder of several sizes is given one.
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(self, files: list[Path], shape: tuple[int, int, int], flag: str = "--data",
                 crop: bool = False) -> None:
        self.files, self.flag, self.crop = list(files), flag, crop
        self.shape = torch.Size((len(self.files), *shape))

    def __len__(self) -> int:
        return len(self.files)

    def _indices(self, key: slice | torch.Tensor | np.ndarray | list[int]) -> Sequence[int]:
        if isinstance(key, slice):
            return range(len(self))[key]  # a range: no list of every index for each batch of a large folder
        key = torch.as_tensor(key)
        return key.nonzero().flatten().tolist() if key.dtype == torch.bool else key.flatten().tolist()

    def __getitem__(self, key: int | slice | torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
        if isinstance(key, (int, np.integer)) or (isinstance(key, torch.Tensor) and key.ndim == 0
                                                   and key.dtype != torch.bool):
            return self._read(self.files[int(key)])
        idx = self._indices(key)
        if not idx:
            return torch.empty(0, *self.shape[1:], dtype=torch.uint8)
        return torch.stack([self._read(self.files[i]) for i in idx])

    def take(self, key: slice | torch.Tensor | list[int]) -> FolderImages:
        """The images at `key`, still undecoded."""
        return FolderImages([self.files[i] for i in self._indices(key)], tuple(self.shape[1:]), self.flag, self.crop)

    def _read(self, f: Path) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(f) as im:
                im = _eight_bit(im).convert("L" if self.shape[1] == 1 else "RGB")
                if self.crop:  # the centre square, CROP of the shorter side, at the folder's side (antialiased)
                    c = max(round(CROP * min(im.size)), 1)
                    left, top = (im.width - c) // 2, (im.height - c) // 2
                    im = im.crop((left, top, left + c, top + c)).resize(tuple(self.shape[2:]), Image.BILINEAR)
                a = np.asarray(im)
        except (OSError, SyntaxError, ValueError) as e:
            raise _unreadable(self.flag, f, e) from None
        if a.shape[:2] != tuple(self.shape[2:]):
            raise DfkdError(f"{self.flag} {f}: {a.shape[1]}x{a.shape[0]} px, the folder's other images are "
                            f"{self.shape[3]}x{self.shape[2]}; bring them to one size first")
        return torch.from_numpy(np.array(a[None] if a.ndim == 2 else a.transpose(2, 0, 1)))  # a writable copy


def to_model_input(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float, channels and size as `spec` says, normalised.

    Grey images are repeated to 3 channels and colour images averaged to 1 when the model wants it; other sizes
    are resized bilinearly (28x28 MNIST -> 32x32 as in DAFL/DFAD).
    """
    x = x.float().div_(255.0)
    if x.shape[1] != spec.channels:
        if x.shape[1] == 1:
            x = x.expand(-1, spec.channels, -1, -1)
        elif spec.channels == 1:
            x = x.mean(1, keepdim=True)
        else:
            raise DfkdError(f"data has {x.shape[1]} channels, the model wants {spec.channels}")
    if tuple(x.shape[-2:]) != spec.hw:
        x = F.interpolate(x, size=spec.hw, mode="bilinear", align_corners=False, antialias=True)
    return spec.normalize(x)


def iterate_batches(data: ImageData, spec: InputSpec, batch_size: int, device: torch.device | str,
                    shuffle: bool = False, generator: torch.Generator | None = None):  # noqa: ANN201
    """Yield (x, y) model-ready batches."""
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        yield to_model_input(data.x[idx], spec).to(device), data.y[idx].to(device)


def check_training_labels(data: ImageData, flag: str, path: str) -> int:
    """The class count of labelled training data, refusing data a classifier cannot be trained on.

    Labels must be the indices 0..K-1 of at least 2 classes, each with an image: a class without one would be
    an output the model never learns (labels 1..10 read as 11 classes, say).
    """
    if len(data) == 0:
        raise DfkdError(f"{flag} {path}: holds no images")
    present = torch.unique(data.y)  # sorted
    if int(present[0]) < 0:
        raise DfkdError(f"{flag} {path}: labels must be class indices 0..K-1, found {int(present[0])}")
    if len(present) < 2:
        raise DfkdError(f"{flag} {path}: every image has label {int(present[0])}; a classifier needs images of at "
                        "least 2 classes")
    k = int(present[-1]) + 1
    if len(present) < k:
        missing = sorted(set(range(k)) - {int(c) for c in present})
        if data.class_names and len(data.class_names) == k:  # an image folder: its sub-folders are the classes
            folders = ", ".join(repr(data.class_names[c]) for c in missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise DfkdError(f"{flag} {path}: class folder(s) {folders} hold no image; remove them or add images")
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise DfkdError(f"{flag} {path}: labels run {int(present[0])}..{k - 1}, read as class indices 0..{k - 1}, "
                        f"but class(es) {shown} have no image; relabel the {len(present)} classes "
                        f"0..{len(present) - 1}")
    return k


def load_for(path: str, flag: str, num_classes: int, spec: InputSpec, names: list[str] | None) -> ImageData:
    """Real images for a model of `num_classes` classes, `spec` inputs and class `names` (None: unknown).

    Read (`load_images`), labelled by class name where the model records names (`by_name`), and refused where they
    cannot fit the model (`check_fits`).
    """
    data = by_name(load_images(path, flag), names, flag, path)
    check_fits(data, num_classes, spec, flag, path)
    return data


def by_name(data: ImageData, names: list[str] | None, flag: str, path: str) -> ImageData:
    """An image folder's classes read by name where the model records its classes' names.

    A folder's labels are its sorted sub-folders' positions, so a test folder that lacks one of the model's
    classes (or holds a class the model's training folder did not) would be labelled shifted from there on, and the
    accuracy measured against the wrong classes. A model file that records class names (`dfkd train-teacher` on a
    folder, and every student distilled from it) gets each folder's images labelled with the index of its name. A
    folder named after no class of the model is refused; folders that share no name with the model's classes
    (another naming: "0".."9" beside "airplane"..) are read by position, as before.
    """
    if names is None or data.class_names is None or list(data.class_names) == list(names)[:len(data.class_names)]:
        return data
    index = {n: i for i, n in enumerate(names)}
    unknown = [n for n in data.class_names if n not in index]
    if len(unknown) == len(data.class_names):
        return data
    if unknown:
        known = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        raise DfkdError(f"{flag} {path}: class folder(s) {', '.join(unknown[:5])} name no class of the model (it "
                        f"knows {known}); remove or rename them")
    warnings.warn(f"{flag} {path}: its {len(data.class_names)} class folders are read by name as the model's "
                  f"classes (the model knows {len(names)}, in another order or more of them)", stacklevel=2)
    relabel = torch.tensor([index[n] for n in data.class_names])
    return ImageData(data.x, relabel[data.y], list(names))


def check_fits(data: ImageData, num_classes: int, spec: InputSpec, flag: str, path: str) -> None:
    """Refuse data whose labels or channels cannot match the model, before any training starts."""
    if len(data) == 0:
        raise DfkdError(f"{flag} {path}: holds no images")
    lo, hi = int(data.y.min()), int(data.y.max())
    if lo < 0 or hi >= num_classes:
        raise DfkdError(f"{flag} {path}: labels run {lo}..{hi} but the model has {num_classes} classes (labels "
                        f"0..{num_classes - 1}); this data does not belong to this model")
    check_channels(tuple(data.x.shape), spec, flag, path)


def check_channels(shape: tuple[int, ...], spec: InputSpec, flag: str, path: str) -> None:
    """Refuse N x C x H x W images whose C cannot be read as the model's (grey <-> colour can, others cannot)."""
    c = shape[1]
    if c != spec.channels and (c not in (1, 3) or 1 not in (c, spec.channels)):
        layout = f" (x of shape {shape} is read as N x C x H x W; only 1 or 3 channels may come last)" \
            if len(shape) == 4 and c > 4 else ""
        raise DfkdError(f"{flag} {path}: images have {c} channels{layout}, the model wants {spec.channels}")
