"""FID monitoring inside a run (`FIDMonitors`), TensorBoard hparams, and reference statistics from real data.

`dfkd fid-stats` calls `compute_fid_stats`; the engine builds `FIDMonitors.for_run` once, calls
`measure_method` every `fid_every` steps and `log_hparams` at the end.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dfkd.errors import DfkdError
from dfkd.fid import (
    BNFID,
    FEATURE_KINDS,
    FIDStats,
    FrechetMonitor,
    InceptionFID,
    InceptionUnavailable,
    TeacherFID,
    input_key,
)
from dfkd.spec import InputSpec
from dfkd.teacher import Teacher

if TYPE_CHECKING:
    from dfkd.teacher_options import TeacherOptions


class FIDMonitors:
    """The FID monitors of one run, measured together; `measure` returns {tag: distance}.

    Args:
        monitors: the metrics (BN-FID, teacher-feature FID, Inception FID), any subset.
    """

    def __init__(self, monitors: list[FrechetMonitor]) -> None:
        self.monitors = monitors
        self.last: tuple[int, dict[str, float]] | None = None
        self.fresh = False

    def __bool__(self) -> bool:
        return bool(self.monitors)

    @classmethod
    def for_run(cls, teacher: Teacher, fid_ref: str | os.PathLike | None,
                device: torch.device | str = "cpu") -> FIDMonitors:
        """BN-FID whenever the teacher has BatchNorm; teacher or Inception FID when `fid_ref` holds that kind.

        A reference file of the wrong kind or dimension is an error here, before training; missing Inception
        weights give one warning and the run goes on without that metric.
        """
        monitors: list[FrechetMonitor] = [BNFID(teacher)] if teacher.bn_paths() else []
        ref = FIDStats.load(fid_ref) if fid_ref else None
        if ref is not None and ref.features == "teacher":
            monitors.append(TeacherFID(teacher, ref))
        elif ref is not None:
            try:
                with torch.random.fork_rng(devices=[]):  # building InceptionV3 draws random init weights
                    monitors.append(InceptionFID(teacher.spec, ref, device=device))
            except InceptionUnavailable as e:
                warnings.warn(f"Inception FID skipped: {e}", stacklevel=2)
        return cls(monitors)

    def measure(self, images: torch.Tensor, chunk: int | None = None) -> dict[str, float]:
        """Every metric on a set of synthetic images (teacher's normalised space), `chunk` images per forward."""
        chunk = chunk or images.shape[0]
        return {m.tag: m.measure_chunked(images, chunk) for m in self.monitors}

    def measure_method(self, method: Any, n: int, step: int, chunk: int | None = None) -> dict[str, float]:
        """Every metric on `n` fresh images of the method's synthesizer (else its last batch) at `step`.

        Images are made and measured `chunk` at a time (the run's batch size): at 224 px, 256 images in one
        forward would need tens of GB.

        The random draws happen on forked RNG streams, so monitoring leaves the run's own randomness (and so
        its results and an exact resume) unchanged. A second call at the same step returns the first call's
        values with `fresh` False (the end of a run need not log them twice).
        """
        self.fresh = False
        if self.last is not None and self.last[0] == step:
            return self.last[1]
        if not self.monitors:
            return {}
        device = next((p.device for p in method.student.parameters()), torch.device("cpu"))
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            images = synthetic_batch(method, n, chunk)
        if images is None:
            return {}
        self.last, self.fresh = (step, self.measure(images, chunk)), True
        return self.last[1]


def synthetic_batch(method: Any, n: int, chunk: int | None = None) -> torch.Tensor | None:
    """`n` transfer images from the method's synthesizer (`sample`, `chunk` at a time), else its `last_images`.

    None before there are any.
    """
    synth = getattr(method, "synth", None)
    if synth is not None and hasattr(synth, "sample"):
        sizes = [min(chunk or n, n - i) for i in range(0, n, chunk or n)]
        with torch.no_grad():
            return torch.cat([synth.sample(k) for k in sizes])
    last = getattr(method, "last_images", None)
    return None if last is None else last[:n]


def log_hparams(tb: Any, config: dict[str, Any], final: dict[str, float], step: int | None = None) -> None:
    """TensorBoard hparams: the method, its scalar parameters, teacher, student and steps, with final metrics.

    Written into the run's own folder (not a timestamped sub-run), metrics under `hparam/` at `step`.
    """
    hp: dict[str, Any] = {"method": config.get("method"), "student": config.get("student"),
                          "teacher": Path((config.get("teachers") or ["?"])[0]).name, "steps": config.get("steps")}
    for k, v in (config.get("params") or {}).items():
        hp[k] = v if isinstance(v, (bool, int, float, str)) else str(v)
    hp = {k: (v if v is not None else "none") for k, v in hp.items()}
    metrics = {f"hparam/{k}": float(v) for k, v in final.items()}
    tb.add_hparams(hp, metrics or {"hparam/steps": float(config.get("steps") or 0)}, run_name=".", global_step=step)


def compute_fid_stats(data: str | os.PathLike, out: str | os.PathLike, features: str,
                      teacher: str | os.PathLike | None = None, options: TeacherOptions | None = None,
                      device: str = "auto", batch_size: int | None = None, force: bool = False) -> FIDStats:
    """Reference statistics (mu, sigma) of real images in pytorch-fid's .npz format, plus their feature kind.

    Args:
        data: real images (.npz or ImageFolder directory, as `dfkd.data.load_images` reads).
        out: the .npz to write (atomically).
        features: "teacher" (the teacher's penultimate features; needs `teacher`) or "inception".
        teacher: teacher file; for Inception FID it only sets the image size (as synthetic images will have).
        options: how to read the teacher file (`--teacher-arch`, `--arch-arg`, spec flags, `--trust-pickle`).
        device: where to compute features.
        batch_size: images per forward (None: `dfkd.evaluate.default_batch` of the input size).
        force: replace `out`; else a file that appeared there while the features were computed is kept.

    Returns:
        The statistics written.
    """
    from dfkd.data import load_images, to_model_input
    from dfkd.evaluate import default_batch
    from dfkd.teacher_options import load_with_options
    from dfkd.utils import pick_device

    if features not in FEATURE_KINDS:
        raise DfkdError(f"--features {features}: use one of {', '.join(FEATURE_KINDS)}")
    if features == "teacher" and not teacher:
        raise DfkdError("--features teacher needs --teacher FILE (the teacher whose features are compared)")
    dev = pick_device(device)
    images = load_images(data, "DATA")
    if len(images) < 2:
        raise DfkdError(f"DATA {data}: holds {len(images)} image(s); FID statistics need a covariance of many "
                        "(thousands of real images, at least 2)")
    t = load_with_options(teacher, options, dev) if teacher else None
    if features == "teacher":
        extractor, spec = TeacherFID(t), t.spec
    else:
        height, width = t.spec.hw if t else (int(images.x.shape[-2]), int(images.x.shape[-1]))
        spec = InputSpec(3, height, (0.0,), (1.0,), width)
        extractor = InceptionFID(spec, device=dev)
    bs = batch_size or default_batch(spec)
    feats = torch.cat([extractor.features(to_model_input(images.x[i:i + bs], spec).to(dev))
                       for i in range(0, len(images), bs)])
    stats = FIDStats.from_features(feats, features)
    if features == "teacher":
        stats.teacher_sha256, stats.teacher_input = t.sha256, input_key(t.spec)
    stats.save(out, replace=force)  # a file that appeared at `out` meanwhile is kept (--force replaces it)
    return stats
