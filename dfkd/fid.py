"""Fréchet distances that watch the synthetic data (DESIGN §6): Inception FID, teacher-feature FID, BN-FID.

Every metric has one interface, `measure(images) -> float`, on a batch of synthetic images in the teacher's
normalised input space. Inception and teacher-feature FID compare against reference statistics (`FIDStats`,
pytorch-fid's `.npz` layout plus a `features` string naming the feature kind) made by `dfkd fid-stats`;
BN-FID needs no real data at all.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from dfkd.errors import DfkdError
from dfkd.io import _atomic_write, open_npz
from dfkd.losses.bn import batch_stats
from dfkd.spec import InputSpec
from dfkd.teacher import Teacher

FEATURE_KINDS = ("inception", "teacher")


class InceptionUnavailable(DfkdError):
    """pytorch-fid's InceptionV3 weights are not in the torch hub cache and could not be fetched."""


@dataclass
class FIDStats:
    """Gaussian statistics of features: `mu` (D,), `sigma` (D, D), and which features they are of.

    Teacher-feature statistics also keep the sha256 of the teacher file that made them and the inputs it was given
    (`input_key`: shape and normalisation; the same images at 28 and at 32 px were 17 times farther apart than two
    different real sets), "" where unknown: files written before they were kept, or by pytorch-fid.
    """

    mu: np.ndarray
    sigma: np.ndarray
    features: str = "inception"
    teacher_sha256: str = ""
    teacher_input: str = ""

    @classmethod
    def from_features(cls, feats: torch.Tensor, features: str) -> FIDStats:
        """Mean and (unbiased) covariance of features (N, D), in float64 as pytorch-fid computes them."""
        f = feats.detach().double().cpu().numpy()
        return cls(f.mean(0), np.atleast_2d(np.cov(f, rowvar=False)), features)

    def save(self, path: str | os.PathLike, replace: bool = True) -> None:
        """Write pytorch-fid's `.npz` (mu, sigma) plus `features` (and the teacher's hash), atomically.

        `replace` False: a file at `path` is never replaced (`dfkd.io.place_file`).
        """
        extra = {k: np.array(v) for k, v in (("teacher_sha256", self.teacher_sha256),
                                             ("teacher_input", self.teacher_input)) if v}
        _atomic_write(path, lambda f: np.savez(f, mu=self.mu, sigma=self.sigma, features=np.array(self.features),
                                               **extra), replace)

    @classmethod
    def load(cls, path: str | os.PathLike, flag: str = "--fid-ref") -> FIDStats:
        """Read a stats file; pytorch-fid's own files (no `features`) are Inception statistics."""
        p = Path(path)
        if not p.is_file():
            raise DfkdError(f"{flag} {p}: no such file; make one with `dfkd fid-stats DATA {p.name} --features ...`")
        with open_npz(p, flag, "arrays 'mu' and 'sigma' (make one with `dfkd fid-stats`)") as d:
            if "mu" not in d or "sigma" not in d:
                raise DfkdError(f"{flag} {p}: FID statistics need arrays 'mu' and 'sigma'; it has "
                                f"{sorted(d.files)}")
            kind = str(d["features"]) if "features" in d else "inception"
            stats = cls(d["mu"].astype(np.float64), np.atleast_2d(d["sigma"]).astype(np.float64), kind,
                        *(str(d[k]) if k in d else "" for k in ("teacher_sha256", "teacher_input")))
        if kind not in FEATURE_KINDS or stats.mu.ndim != 1 or stats.sigma.shape != (len(stats.mu), len(stats.mu)):
            raise DfkdError(f"{flag} {p}: features {kind!r}, mu {stats.mu.shape}, sigma {stats.sigma.shape}: not "
                            f"FID statistics dfkd understands (features one of {FEATURE_KINDS}, sigma D x D)")
        if why := _not_gaussian(stats):
            raise DfkdError(f"{flag} {p}: {why}, so it is no covariance of features; make the file again with "
                            "`dfkd fid-stats`")
        return stats


def input_key(spec: InputSpec) -> str:
    """A teacher's inputs as teacher-feature statistics record them: shape and normalisation."""
    return (f"{spec.describe()}, mean {[float(f'{m:.6g}') for m in spec.mean]}, "
            f"std {[float(f'{v:.6g}') for v in spec.std]}")


def _not_gaussian(stats: FIDStats) -> str | None:
    """What keeps (mu, sigma) from being a mean and a covariance: non-finite values, asymmetry, a negative variance."""
    if not (np.isfinite(stats.mu).all() and np.isfinite(stats.sigma).all()):
        return "mu or sigma holds NaN or infinite values"
    scale = max(float(np.abs(stats.sigma).max()), 1e-12)
    if np.abs(stats.sigma - stats.sigma.T).max() > 1e-6 * scale:
        return "sigma is not symmetric"
    if np.linalg.eigvalsh(stats.sigma).min() < -1e-6 * scale:
        return "sigma has negative eigenvalues"
    return None


def frechet_distance(a: FIDStats, b: FIDStats) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2), in float64.

    The trace of the square root is the sum of the square roots of the eigenvalues of S_a S_b, which are those
    of the symmetric S_a^1/2 S_b S_a^1/2 (Dowson & Landau 1982): two `torch.linalg.eigh` calls, with round-off
    negatives clamped to 0. It agrees with pytorch-fid's `calculate_frechet_distance` (tests check it), works on
    1-d statistics, and is much faster on CPU than scipy's `sqrtm`.
    """
    t = [torch.as_tensor(v, dtype=torch.float64) for v in (a.mu, a.sigma, b.mu, b.sigma)]
    if t[0].shape != t[2].shape or t[1].shape != t[3].shape:
        raise DfkdError(f"FID statistics of different dimensions: {tuple(t[0].shape)} and {tuple(t[2].shape)}")
    mu_a, s_a, mu_b, s_b = t
    w, v = torch.linalg.eigh((s_a + s_a.T) / 2)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    middle = root_a @ s_b @ root_a
    tr_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * tr_root)


class FrechetMonitor(ABC):
    """A Fréchet distance of synthetic images to what the real data looks like. `tag` names it in logs."""

    tag: ClassVar[str] = ""

    @abstractmethod
    def measure(self, images: torch.Tensor) -> float:
        """The distance for a batch (B, C, S, S) in the teacher's normalised input space."""

    def measure_chunked(self, images: torch.Tensor, chunk: int) -> float:
        """`measure(images)`, with no forward pass on more than `chunk` images at once (the same value)."""
        return self.measure(images)


class FeatureFID(FrechetMonitor):
    """FID in some feature space against reference statistics (None: only `features()` is usable)."""

    def __init__(self, ref: FIDStats | None, chunk: int = 256) -> None:
        if ref is not None and ref.features != self.tag:
            raise DfkdError(f"--fid-ref holds {ref.features} statistics, not {self.tag} ones; make them with "
                            f"`dfkd fid-stats DATA OUT.npz --features {self.tag}`")
        self.ref, self.chunk = ref, chunk

    @abstractmethod
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Features (B, D) of one chunk."""

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Features (N, D) of any number of images, a chunk at a time."""
        return torch.cat([self.embed(x).flatten(1).float().cpu() for x in images.split(self.chunk)])

    def check_dim(self, dim: int) -> None:
        if self.ref is not None and len(self.ref.mu) != dim:
            raise DfkdError(f"--fid-ref: its {self.tag} statistics are {len(self.ref.mu)}-dimensional but these "
                            f"features are {dim}-dimensional; were they made with another teacher?")

    def measure(self, images: torch.Tensor) -> float:
        if self.ref is None:
            raise DfkdError(f"{self.tag} FID needs reference statistics")
        return frechet_distance(FIDStats.from_features(self.features(images), self.tag), self.ref)

    def measure_chunked(self, images: torch.Tensor, chunk: int) -> float:
        old, self.chunk = self.chunk, max(1, min(self.chunk, chunk))
        try:
            return self.measure(images)
        finally:
            self.chunk = old


class TeacherFID(FeatureFID):
    """FID on the teacher's penultimate features: any teacher, channel count and image size, offline.

    Args:
        teacher: the frozen teacher (features from `Teacher.forward_with_features`).
        ref: reference statistics of kind "teacher" (or None to compute features only).
    """

    tag = "teacher"

    def __init__(self, teacher: Teacher, ref: FIDStats | None = None) -> None:
        super().__init__(ref)
        self.teacher = teacher
        first = getattr(teacher, "members", [teacher])[0]  # an ensemble's features are its first teacher's
        which = "--teacher" if first is teacher else f"the first --teacher ({first.source}), whose features it uses,"
        if ref is not None and ref.teacher_sha256 and first.sha256 and ref.teacher_sha256 != first.sha256:
            raise DfkdError(f"--fid-ref: its teacher statistics were made with another teacher file (sha256 "
                            f"{ref.teacher_sha256[:12]}..., {which} is {first.sha256[:12]}...): features of "
                            "another network are not comparable; make them with this teacher (dfkd fid-stats DATA "
                            f"OUT.npz --features teacher --teacher {first.source})")
        if ref is not None and ref.teacher_input and ref.teacher_input != input_key(teacher.spec):
            raise DfkdError(f"--fid-ref: its teacher statistics were made from inputs {ref.teacher_input}, and the "
                            f"run's teacher takes {input_key(teacher.spec)}: features of other inputs are not "
                            "comparable; make them with the run's teacher options (dfkd fid-stats DATA OUT.npz "
                            "--features teacher --teacher T [--input-size ... --mean ... --std ...])")
        device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
        self.check_dim(self.features(torch.zeros(teacher.spec.shape(2), device=device)).shape[1])

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher.forward_with_features(images)[1]


def inception_weights_path() -> Path:
    """Where pytorch-fid's InceptionV3 weights live: the torch hub cache's checkpoints folder."""
    from pytorch_fid.inception import FID_WEIGHTS_URL

    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_URL.rsplit("/", 1)[-1]


def load_inception(device: torch.device | str = "cpu", allow_download: bool = False) -> nn.Module:
    """pytorch-fid's InceptionV3 (2048-d pool features), from the torch hub cache.

    dfkd downloads nothing at run time (`allow_download` lets pytorch-fid fetch the weights, for a caller that
    says so): the user puts the file in the cache.

    Raises:
        InceptionUnavailable: naming the file and the folder to put it in.
    """
    from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3

    path = inception_weights_path()
    why = f"{path.name} is not in {path.parent} (dfkd downloads nothing)"
    if path.is_file() or allow_download:
        try:
            return InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval().to(device)
        except Exception as e:  # noqa: BLE001 - an unreadable file or a failed download come in many kinds
            why = f"{path.name} in {path.parent} could not be read ({str(e)[:100]})"
    raise InceptionUnavailable(f"Inception FID needs pytorch-fid's InceptionV3 weights: {why}; download "
                               f"{FID_WEIGHTS_URL} and put it there (the torch hub checkpoints folder, "
                               "$TORCH_HOME/hub/checkpoints)")


class InceptionFID(FeatureFID):
    """pytorch-fid's Inception FID: images denormalised to [0, 1] (grey repeated to 3 channels), resized to 299.

    Args:
        spec: the input spec of the images measured (to denormalise them).
        ref: reference statistics of kind "inception" (or None to compute features only).
        extractor: maps (B, 3, H, W) images in [0, 1] to features (B, D) or pytorch-fid's list of (B, D, 1, 1);
            default pytorch-fid's InceptionV3 (`load_inception`; raises `InceptionUnavailable`).
        device: where the default extractor runs.
        allow_download: let pytorch-fid download missing weights (dfkd's commands never do).
    """

    tag = "inception"

    def __init__(self, spec: InputSpec, ref: FIDStats | None = None, extractor: nn.Module | None = None,
                 device: torch.device | str = "cpu", allow_download: bool = False) -> None:
        super().__init__(ref, chunk=64)
        if spec.channels not in (1, 3):
            raise DfkdError(f"Inception FID needs 1- or 3-channel images, these have {spec.channels}; use the "
                            "teacher-feature FID (--features teacher) instead")
        self.spec = spec
        self.extractor = extractor if extractor is not None else load_inception(device, allow_download)
        if ref is not None:
            self.check_dim(2048 if extractor is None else self.features(torch.zeros(spec.shape(2))).shape[1])

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.spec.denormalize(images.float()).clamp(0, 1).expand(-1, 3, -1, -1)
        x = x.to(next(self.extractor.parameters(), x).device)
        out = self.extractor(x)
        return out[0] if isinstance(out, (list, tuple)) else out


def bn_fid(layers: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Data-free BN-FID of `(bn_input, running_mean, running_var)` per layer.

    Per channel, the Fréchet distance between N(mu, var) of the batch and N(running_mean, running_var) is, for
    these diagonal Gaussians in closed form, (mu - rm)^2 + (sqrt(var) - sqrt(rv))^2 (no matrix square root is
    involved). It is averaged over the channels of a layer, so wide layers do not dominate, and then over layers,
    so teachers of different depth read on one scale. Biased batch variance, as BatchNorm computes it.

    Shape:
        - bn_input: (B, C, *); running_mean, running_var: (C,)
        - output: ()
    """
    if not layers:
        raise ValueError("BN-FID got no layers: the teacher has no hooked BatchNorm layers")
    per_layer = []
    for x, rm, rv in layers:
        mu, var = batch_stats(x.float())
        per_layer.append(frechet_diagonal(mu, var, rm, rv).mean())
    return torch.stack(per_layer).mean()


def frechet_diagonal(mu: torch.Tensor, var: torch.Tensor, rm: torch.Tensor, rv: torch.Tensor) -> torch.Tensor:
    """Per-channel Fréchet distance between N(mu, var) and N(rm, rv): (mu - rm)^2 + (sqrt(var) - sqrt(rv))^2."""
    return (mu - rm.detach()).square() + (var.clamp_min(0).sqrt() - rv.detach().clamp_min(0).sqrt()).square()


class BNFID(FrechetMonitor):
    """Data-free BN-FID (`bn_fid`) of synthetic images against the teacher's BatchNorm running statistics.

    Args:
        teacher: a frozen teacher with BatchNorm layers.
    """

    tag = "bn"

    def __init__(self, teacher: Teacher) -> None:
        self.teacher, self.paths = teacher, teacher.bn_paths()
        if not self.paths:
            raise DfkdError(f"BN-FID: the teacher {teacher.source} has no (hookable) BatchNorm layers")

    def measure(self, images: torch.Tensor) -> float:
        return self.measure_chunked(images, images.shape[0])

    @torch.no_grad()
    def measure_chunked(self, images: torch.Tensor, chunk: int) -> float:
        """BN-FID of all `images`, their per-channel statistics accumulated over forwards of `chunk` images."""
        sums: dict[str, list[torch.Tensor]] = {}
        with self.teacher.tap(self.paths) as taps:
            for x in images.split(max(1, chunk)):
                self.teacher(x)
                for p in self.paths:
                    if p in taps.inputs:
                        h = taps.inputs[p].double().transpose(0, 1).flatten(1)
                        s = [h.sum(1), h.square().sum(1), torch.tensor(float(h.shape[1]))]
                        sums[p] = s if p not in sums else [a + b for a, b in zip(sums[p], s)]
                taps.clear()
        if not sums:
            raise ValueError("BN-FID got no layers: the teacher has no hooked BatchNorm layers")
        per_layer = []
        for p, (s1, s2, n) in sums.items():
            mu = s1 / n
            rm, rv = self._running(p)
            d = frechet_diagonal(mu, s2 / n - mu.square(), rm.double(), rv.double())
            per_layer.append(d.mean())
        return float(torch.stack(per_layer).mean())

    def _running(self, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.teacher.module_at(path)
        return m.running_mean, m.running_var
