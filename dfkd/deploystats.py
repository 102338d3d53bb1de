"""The numbers a deployer needs to choose between a float and an int8 model, measured in one process.

Both models run in onnxruntime on the CPU (the same runtime, so the comparison is of the models, not of PyTorch
against onnxruntime): top-1 on real test data, top-1 agreement with the teacher, file size, and latency per image
at batch size 1 on one thread (median of interleaved timings, so load on the machine hits both alike). The
quantization error itself is measured on the same test images: the fraction where int8 and float give the same
top-1 class, and the mean KL divergence of the int8 softmax from the float one (nats per image). Top-1 against
the labels moves by a few images of 10,000 with any change; these two see every image whose answer rounding moved.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dfkd.data import ImageData, iterate_batches
from dfkd.export import require
from dfkd.spec import InputSpec

LATENCY_SECONDS = 1.0  # timing budget per model
DEPLOY_JSON = "deploy.json"


@dataclass
class DeployStats:
    """Float vs int8: sizes in bytes, latency in ms per image, top-1/agreement as fractions (None: not measured)."""

    float_bytes: int
    int8_bytes: int
    float_ms: float
    int8_ms: float
    float_top1: float | None = None
    int8_top1: float | None = None
    float_agreement: float | None = None
    int8_agreement: float | None = None
    teacher_top1: float | None = None
    int8_float_agreement: float | None = None
    int8_float_kl: float | None = None
    eval_images: int = 0
    calibration: str = ""

    def lines(self) -> list[str]:
        """Human-readable lines, one fact each."""
        out = [f"size:      float {self.float_bytes / 1024:.1f} KiB, int8 {self.int8_bytes / 1024:.1f} KiB "
               f"(int8/float {self.int8_bytes / self.float_bytes:.3f})",
               f"latency:   float {self.float_ms:.3f} ms, int8 {self.int8_ms:.3f} ms per image (batch 1, one CPU "
               f"thread, onnxruntime; int8/float {self.int8_ms / self.float_ms:.2f})"]
        if self.float_top1 is not None:
            out.append(f"top-1:     float {100 * self.float_top1:.2f}%, int8 {100 * self.int8_top1:.2f}% "
                       f"({self.eval_images} test images)")
        if self.float_agreement is not None:
            out.append(f"agreement: with the teacher, float {100 * self.float_agreement:.2f}%, int8 "
                       f"{100 * self.int8_agreement:.2f}% (teacher top-1 {100 * self.teacher_top1:.2f}%)")
        if self.int8_float_agreement is not None:
            out.append(f"int8 vs float: same top-1 on {100 * self.int8_float_agreement:.2f}% of the test images, "
                       f"mean KL(float || int8) {self.int8_float_kl:.2e} nats")
        if self.calibration:
            out.append(f"calibration: {self.calibration}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        from dfkd.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def session(path: Path, threads: int = 0) -> Any:
    """An onnxruntime CPU session (`threads` 0: onnxruntime's default)."""
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_logits(sess: Any, data: ImageData, spec: InputSpec, batch: int = 500) -> torch.Tensor:
    """Logits of an onnxruntime session on every image of `data`."""
    name = sess.get_inputs()[0].name
    out = [torch.from_numpy(sess.run(None, {name: x.numpy()})[0]) for x, _ in iterate_batches(data, spec, batch, "cpu")]
    return torch.cat(out)


def latency_ms(float_path: Path, int8_path: Path, spec: InputSpec, seconds: float | None = None) -> tuple[float, float]:
    """Median ms per batch-1 inference of each model, on one thread, the two timed in alternation.

    Each model is timed for about `seconds` (default LATENCY_SECONDS), at least 20 times.
    """
    seconds = LATENCY_SECONDS if seconds is None else seconds
    sessions = [session(float_path, 1), session(int8_path, 1)]
    x = spec.normalize(torch.rand(spec.shape(1))).numpy()
    times: list[list[float]] = [[], []]
    for s in sessions:
        for _ in range(5):
            s.run(None, {"input": x})
    end = time.perf_counter() + 2 * seconds
    while time.perf_counter() < end or len(times[0]) < 20:
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, {"input": x})
            times[i].append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[0]), 1000 * statistics.median(times[1])


def _agreement(logits: torch.Tensor, teacher_pred: torch.Tensor) -> float:
    return float((logits.argmax(1) == teacher_pred).float().mean())


def mean_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over images of KL(softmax(reference) || softmax(other)), in nats: what `other` loses of `reference`."""
    log_p, log_q = reference.double().log_softmax(1), other.double().log_softmax(1)
    return float((log_p.exp() * (log_p - log_q)).sum(1).mean())


def measure(float_path: Path, int8_path: Path, spec: InputSpec, eval_data: ImageData | None = None,
            teacher_logits: torch.Tensor | None = None, calibration: str = "") -> DeployStats:
    """Sizes, latency and (with `eval_data`) accuracy and teacher agreement of a float and an int8 ONNX model.

    Args:
        float_path: the float ONNX model.
        int8_path: the int8 ONNX model.
        spec: their input spec.
        eval_data: real test images with labels, or None.
        teacher_logits: the teacher's logits on `eval_data` (for agreement), or None.
        calibration: a note on the calibration source, carried into the report.
    """
    f_ms, q_ms = latency_ms(float_path, int8_path, spec)
    stats = DeployStats(float_path.stat().st_size, int8_path.stat().st_size, f_ms, q_ms, calibration=calibration)
    if eval_data is None:
        return stats
    lf, lq = (onnx_logits(session(p), eval_data, spec) for p in (float_path, int8_path))
    y = eval_data.y
    stats.float_top1, stats.int8_top1 = (float((lg.argmax(1) == y).float().mean()) for lg in (lf, lq))
    stats.eval_images = len(y)
    stats.int8_float_agreement, stats.int8_float_kl = _agreement(lq, lf.argmax(1)), mean_kl(lf, lq)
    if teacher_logits is not None:
        t = teacher_logits.argmax(1)
        stats.float_agreement, stats.int8_agreement = _agreement(lf, t), _agreement(lq, t)
        stats.teacher_top1 = float((t == y).float().mean())
    return stats
