"""`dfkd audit`: before a transfer file leaves, check that its images do not reproduce the owner's training images.

For every synthetic image the audit finds its nearest real training image in two spaces: pixels (RMS distance
per pixel in [0, 1], after the training images are brought to the teacher's channels and size and quantised to
8 bits exactly as a transfer file stores images) and, with `--teacher`, the teacher's penultimate features (L2
distance of unit-normalised features, so 0 = same direction, 2 = opposite). Distances are compared with a
real-vs-real baseline: the nearest-training-image distances of the owner's own held-out images (`--test`, else
`BASELINE_HOLDOUT` training images measured against the other ones), which are different real images that merely
look alike. The synthetic images are searched against every training image, and a copy names its index in the file.

The baseline only means something if the held-out images are not themselves training images: a `--test` that is
(or overlaps) `--against` has distance 0, the threshold collapses to 0, and a file of verbatim copies PASSes. So
held-out images are compared with the training images byte for byte (a hash of each image after the same
preprocessing): more than `OVERLAP_MAX` (1 %) of them identical to a training image is refused (DfkdError: --test
must be images the owner held out of training; without --test, --against holds duplicates); up to that share is
tolerated, since real datasets hold a few exact duplicates, and those images are left out of the baseline (the
report says how many), so they cannot pull the threshold towards 0.

Verdict: FAIL when any synthetic image is closer in pixels to a training image than `COPY_FACTOR` times the
baseline's 1st percentile (no genuinely different real image comes that close, so such a pair is a copy or a
near copy); WARN when more than `FEATURE_WARN` of the synthetic images are that close in feature space only;
PASS otherwise. The closest pairs are drawn in a PNG (synthetic left, its nearest training image right).

Memory is bounded: neighbours are found with chunked matrix products (`Q_CHUNK` x `R_CHUNK` distances at a time,
never a full N x M matrix), and the training pixels are held as uint8. Optionally, `--student` runs a
loss-threshold membership-inference attack on a student distilled from the file: the AUC of "lower loss means
member" on training vs held-out images (0.5: the student's losses do not tell members apart).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from dfkd.data import ImageData, check_channels, load_images, to_model_input
from dfkd.errors import DfkdError
from dfkd.io import atomic_save_png, check_image_free, drawn_from
from dfkd.spec import InputSpec
from dfkd.teacher import Teacher
from dfkd.transfer import TransferData, from_pixels, load_transfer, to_pixels

COPY_FACTOR = 0.5
FEATURE_WARN = 0.01
BASELINE_HOLDOUT = 1000
OVERLAP_MAX = 0.01
Q_CHUNK, R_CHUNK = 1024, 8192
PAIRS_SHOWN = 16


@dataclass
class Space:
    """Nearest-neighbour distances of the synthetic images and of the baseline in one space, and the flags."""

    name: str
    dist: Tensor  # (N,) each synthetic image's distance to its nearest training image
    idx: Tensor  # (N,) that training image's index
    baseline: Tensor  # (B,) each held-out real image's distance to its nearest training image
    threshold: float = field(init=False)

    def __post_init__(self) -> None:
        self.threshold = COPY_FACTOR * float(torch.quantile(self.baseline, 0.01))

    @property
    def flagged(self) -> Tensor:
        """Indices of the synthetic images closer to a training image than the threshold, closest first."""
        hit = (self.dist < self.threshold).nonzero().flatten()
        return hit[self.dist[hit].argsort()]

    def line(self) -> str:
        q = torch.tensor([0.01, 0.5])
        s, b = torch.quantile(self.dist, q).tolist(), torch.quantile(self.baseline, q).tolist()
        return (f"{self.name + ':':9s} synthetic->train nearest min {self.dist.min():.4f} p1 {s[0]:.4f} median "
                f"{s[1]:.4f} | real held-out->train p1 {b[0]:.4f} median {b[1]:.4f} | threshold {self.threshold:.4f}"
                f" | {len(self.flagged)} flagged")


@dataclass
class AuditResult:
    """What `dfkd audit` found; `text()` renders it, `verdict` is PASS, WARN or FAIL."""

    transfer: str
    against: str
    n_synthetic: int
    n_train: int
    baseline_from: str
    pixel: Space
    feature: Space | None
    png: Path | None = None
    mia_auc: float | None = None

    @property
    def verdict(self) -> str:
        if len(self.pixel.flagged):
            return "FAIL"
        if self.feature is not None and len(self.feature.flagged) > FEATURE_WARN * self.n_synthetic:
            return "WARN"
        return "PASS"

    def text(self) -> str:
        """The report, ending with the verdict line."""
        lines = [f"audit:    {self.transfer} ({self.n_synthetic} synthetic) against {self.against} "
                 f"({self.n_train} training images); baseline: {self.baseline_from}", self.pixel.line()]
        lines.append(self.feature.line() if self.feature else "feature:  skipped (give --teacher for the teacher's "
                     "feature space)")
        for i in self.pixel.flagged[:PAIRS_SHOWN].tolist():
            lines.append(f"copy:     synthetic #{i} ~ training #{int(self.pixel.idx[i])} (pixel distance "
                         f"{float(self.pixel.dist[i]):.4f})")
        if self.mia_auc is not None:
            lines.append(f"membership: loss-threshold attack AUC {self.mia_auc:.3f} on the student (0.5: members "
                         "and held-out images look alike)")
        if self.png is not None:
            lines.append(f"wrote:    {self.png} (closest pairs: synthetic left, nearest training image right)")
        lines.append(self._verdict_line())
        return "\n".join(lines)

    def _verdict_line(self) -> str:
        why = {"FAIL": f"{len(self.pixel.flagged)} synthetic images are closer in pixels to a training image than "
                       f"{COPY_FACTOR:g} x the 1st percentile of real held-out distances ({self.pixel.threshold:.4f});"
                       " do not release this file",
               "WARN": f"{len(self.feature.flagged) if self.feature else 0} synthetic images (more than "
                       f"{100 * FEATURE_WARN:g} %) are closer in teacher features than {COPY_FACTOR:g} x the "
                       "baseline's 1st percentile; inspect the PNG before release",
               "PASS": f"no synthetic image is closer to a training image than {COPY_FACTOR:g} x the 1st percentile"
                       f" of real held-out distances (pixel {self.pixel.threshold:.4f}"
                       + (f", feature {self.feature.threshold:.4f}" if self.feature else "") + ")"}
        return f"verdict:  {self.verdict}: {why[self.verdict]}"


# --- nearest neighbours ---------------------------------------------------------------------------------------------
def _float(x: Tensor) -> Tensor:
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def nearest(queries: Tensor, refs: Tensor, q_chunk: int = Q_CHUNK, r_chunk: int = R_CHUNK) -> tuple[Tensor, Tensor]:
    """Each query row's nearest reference row (Euclidean), by chunked matrix products.

    uint8 rows are read as pixels in [0, 1]; at most `q_chunk` x `r_chunk` distances exist at a time.

    Shape:
        - queries: (N, D), refs: (M, D), uint8 or float.
        - output: distances (N,) and indices into refs (N,).
    """
    dist = torch.empty(len(queries))
    idx = torch.empty(len(queries), dtype=torch.long)
    for i in range(0, len(queries), q_chunk):
        a = _float(queries[i:i + q_chunk])
        a2 = (a * a).sum(1, keepdim=True)
        best = torch.full((len(a),), math.inf)
        arg = torch.zeros(len(a), dtype=torch.long)
        for j in range(0, len(refs), r_chunk):
            b = _float(refs[j:j + r_chunk])
            d = (a2 + (b * b).sum(1) - 2 * a @ b.T).clamp_min_(0)
            m, k = d.min(1)
            better = m < best
            best, arg = torch.where(better, m, best), torch.where(better, k + j, arg)
        dist[i:i + len(a)], idx[i:i + len(a)] = best.sqrt(), arg
    return dist, idx


def real_pixels(data: ImageData, spec: InputSpec, chunk: int = 4096) -> Tensor:
    """Real images as a transfer file would store them for `spec`: uint8 (N, C, S, S) at its channels and size."""
    return torch.cat([to_pixels(to_model_input(data.x[i:i + chunk], spec), spec)
                      for i in range(0, len(data), chunk)]) if len(data) else torch.empty(0, *spec.shape(1)[1:])


@torch.no_grad()
def features(teacher: Teacher, pixels: Tensor, spec: InputSpec, batch: int = 512) -> Tensor:
    """The teacher's penultimate features of uint8 images, unit-normalised (N, F)."""
    out = [teacher.forward_with_features(from_pixels(pixels[i:i + batch], spec))[1].flatten(1)
           for i in range(0, len(pixels), batch)]
    return torch.nn.functional.normalize(torch.cat(out).float(), dim=1)


def _pixel_space(synth: Tensor, train: Tensor, held: Tensor, rest: Tensor | None) -> Space:
    """Synthetic images against every training image; the baseline's held-out ones against the `rest` of them."""
    per_pixel = math.sqrt(synth[0].numel())  # RMS per pixel: comparable across image sizes
    d, i = nearest(synth.flatten(1), train.flatten(1))
    b, _ = nearest(held.flatten(1), (train if rest is None else train[rest]).flatten(1))
    return Space("pixel", d / per_pixel, i, b / per_pixel)


def _feature_space(teacher: Teacher, spec: InputSpec, synth: Tensor, train: Tensor, held: Tensor,
                   rest: Tensor | None) -> Space:
    f_train = features(teacher, train, spec)
    d, i = nearest(features(teacher, synth, spec), f_train)
    b, _ = nearest(features(teacher, held, spec), f_train if rest is None else f_train[rest])
    return Space("feature", d, i, b)


# --- the audit ------------------------------------------------------------------------------------------------------
def write_pairs(synth: Tensor, train: Tensor, space: Space, out: Path, n: int = PAIRS_SHOWN,
                mark: str = "") -> None:
    """PNG of the `n` closest pairs in `space`: synthetic, then its nearest training image, 4 pairs a row."""
    from PIL import Image
    from torchvision.utils import make_grid

    order = space.dist.argsort()[:n]
    tiles = torch.stack([t for i in order.tolist() for t in (synth[i], train[int(space.idx[i])])])
    grid = make_grid(tiles.float() / 255, nrow=8, padding=2, pad_value=0.5)
    atomic_save_png(Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy()), out, mark)


def _digests(pixels: Tensor) -> list[bytes]:
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in pixels.flatten(1).numpy()]


def _split(train: Tensor, test: Tensor | None, seed: int) -> tuple[Tensor | None, Tensor]:
    """(indices of the training images the baseline is measured against (None: all), the baseline's real images).

    Without `test`, `BASELINE_HOLDOUT` training images are the baseline's and are measured against the rest; the
    synthetic images are still searched against all of them (a copy of a held-out image went unseen: a file of
    such copies PASSed).
    """
    if test is not None:
        return None, test
    if len(train) < 2 * BASELINE_HOLDOUT:
        raise DfkdError(f"--against holds {len(train)} images: give --test OWNER_TEST for the real-vs-real baseline "
                        f"(holding out {BASELINE_HOLDOUT} needs at least {2 * BASELINE_HOLDOUT})")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return perm[BASELINE_HOLDOUT:].sort().values, train[perm[:BASELINE_HOLDOUT]]


def _without_training_images(train: Tensor, held: Tensor, against: str, test: str | None) -> tuple[Tensor, int]:
    """The held-out images that are not byte-identical to a training image, and how many were left out.

    Raises:
        DfkdError: more than `OVERLAP_MAX` of them are training images (the baseline would collapse towards 0).
    """
    seen = set(_digests(train))
    keep = torch.tensor([d not in seen for d in _digests(held)], dtype=torch.bool)
    n = len(held) - int(keep.sum())
    if n <= OVERLAP_MAX * len(held):
        return held[keep], n
    if test is not None:
        raise DfkdError(f"--test {test}: {n} of its {len(held)} images are also in --against {against} (identical "
                        f"after preprocessing; at most {100 * OVERLAP_MAX:g} % may be); --test must be images the "
                        "model owner held out of training")
    raise DfkdError(f"--against {against}: {n} of the {len(held)} images held out for the baseline also appear among "
                    f"the rest (duplicates; at most {100 * OVERLAP_MAX:g} % may); remove the duplicates or give --test "
                    "OWNER_TEST, images the model owner held out of training")


def _owner_images(path: str | os.PathLike, flag: str, spec: InputSpec) -> ImageData:
    """The owner's images, refused when empty or of channels the transfer file's images cannot be compared with."""
    data = load_images(path, flag)
    if not len(data):
        what = "training images" if flag == "--against" else "held-out images"
        raise DfkdError(f"{flag} {path}: holds no images; give the owner's {what}")
    check_channels(tuple(data.x.shape), spec, flag, str(path))  # 5 channels were averaged to one and PASSed
    return data


def _png_path(png: str | os.PathLike | None, transfer: str | os.PathLike) -> Path:
    """Where the pairs are drawn, checked before the audit runs: a writable file name with an extension PIL writes."""
    from PIL import Image

    out = Path(png) if png else Path(transfer).with_name(Path(transfer).stem + "_audit.png")
    where = f"--png {out}" if png else f"TRANSFER {transfer}: the pairs' PNG {out}"
    Image.init()
    if out.is_dir():
        raise DfkdError(f"{where}: is a directory; give a file name, such as {out / 'audit.png'}")
    if Image.registered_extensions().get(out.suffix.lower()) not in Image.SAVE:
        raise DfkdError(f"{where}: PIL writes no '{out.suffix}' files; give a file name ending in .png")
    if not out.parent.is_dir():
        why = "is a file, not a folder" if out.parent.exists() else "does not exist"
        raise DfkdError(f"{where}: its folder {out.parent} {why}; give a file name in an existing folder")
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise DfkdError(f"{where}: not writable; give --png in a folder you can write to")
    check_image_free(out, drawn_from("audit", transfer), where, "give --png ANOTHER.png")
    return out


def _check_student(student: Teacher, sets: list[tuple[str, str | os.PathLike, ImageData]]) -> None:
    """The membership attack scores the student's loss on the owner's labels: they must be classes of the student."""
    for flag, path, data in sets:
        lo, hi = int(data.y.min()), int(data.y.max())
        if lo < 0 or hi >= student.num_classes:
            raise DfkdError(f"--student {student.source}: has {student.num_classes} classes, but {flag} {path} has "
                            f"labels {lo}..{hi}; give the student distilled from this file (a model of the owner's "
                            "classes)")


def _check_teacher(teacher: Teacher, data: TransferData, transfer: str | os.PathLike) -> None:
    if teacher.spec.shape()[1:] != data.spec.shape()[1:]:
        raise DfkdError(f"--teacher {teacher.source}: takes {teacher.spec.describe()} inputs, but TRANSFER {transfer} "
                        f"holds {data.spec.describe()} images; give the teacher the file was made from")


def audit(transfer: str | os.PathLike, against: str | os.PathLike, teacher: Teacher | None = None,
          test: str | os.PathLike | None = None, student: Teacher | None = None,
          png: str | os.PathLike | None = None, seed: int = 0) -> AuditResult:
    """Audit a transfer file against the owner's training images (see the module docstring).

    Args:
        transfer: the transfer .npz.
        against: the owner's training images (.npz or ImageFolder).
        teacher: the teacher, for the feature space (None: pixels only).
        test: the owner's held-out images for the baseline (None: hold out images of `against`).
        student: a student distilled from the file, for the membership-inference AUC (needs `test`).
        png: where to draw the closest pairs (None: `<transfer stem>_audit.png` beside the file).
        seed: the held-out split's seed.

    Returns:
        The result; its `verdict` is PASS, WARN or FAIL.

    Raises:
        DfkdError: before the audit runs, for an unwritable `png`, a teacher that does not take the file's images,
            an empty `against` or `test`; and when more than `OVERLAP_MAX` (1 %) of the held-out images are
            byte-identical to training images (`test` overlaps `against`, or `against` holds duplicates): such a
            baseline is 0 and would pass verbatim copies. A share up to 1 % (real datasets hold a few exact
            duplicates) is left out of the baseline instead.
    """
    data = load_transfer(transfer, "TRANSFER")
    if student is not None and test is None:
        raise DfkdError("--student needs --test OWNER_TEST: the membership attack compares training with held-out "
                        "images")
    out = _png_path(png, transfer)
    if teacher is not None:
        _check_teacher(teacher, data, transfer)
    owner = _owner_images(against, "--against", data.spec)
    owner_test = _owner_images(test, "--test", data.spec) if test else None
    if student is not None and owner_test is not None:
        _check_student(student, [("--against", against, owner), ("--test", test, owner_test)])
    train = real_pixels(owner, data.spec)
    rest, held = _split(train, real_pixels(owner_test, data.spec) if owner_test is not None else None, seed)
    held, n_dup = _without_training_images(train if rest is None else train[rest], held, str(against),
                                           str(test) if test else None)
    baseline_from = str(test) if test else (f"{BASELINE_HOLDOUT} images of --against against the rest (the synthetic "
                                            "images against all)")
    if n_dup:
        baseline_from += f" ({n_dup} identical to training images left out)"
    pixel = _pixel_space(data.x, train, held, rest)
    feature = _feature_space(teacher, data.spec, data.x, train, held, rest) if teacher is not None else None
    write_pairs(data.x, train, pixel, out, mark=drawn_from("audit", transfer))
    auc = None
    if student is not None and owner_test is not None:
        from dfkd.membership import loss_threshold_auc

        auc = loss_threshold_auc(student, owner, owner_test, seed=seed)
    return AuditResult(str(transfer), str(against), len(data), len(train), baseline_from, pixel, feature, out, auc)
