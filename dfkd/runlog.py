"""What a run writes while it goes: metrics.jsonl and TensorBoard events (tags grouped loss/, synthetic/, ...)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from dfkd.spec import InputSpec


def _step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity (dropped on resume) for a blank line or one a failed write cut."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return math.inf
    return rec.get("step", 0) if isinstance(rec, dict) else math.inf


class RunLog:
    """Appends metrics to `metrics.jsonl` and mirrors them to TensorBoard.

    Args:
        run_dir: the run folder.
        resume_step: on resume, drop records after this step (they are replayed) and purge TensorBoard events.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines() if _step(ln) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        self.file = self.path.open("a")
        self.tb = SummaryWriter(str(run_dir), purge_step=resume_step)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        """One metrics.jsonl record and one TensorBoard scalar per value (tag = prefix + key)."""
        record = {"step": step, **{prefix + k: v for k, v in values.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(prefix + k, v, step)

    @torch.no_grad()
    def synthetic(self, step: int, images: torch.Tensor, spec: InputSpec, teacher_logits: torch.Tensor) -> None:
        """Image grid (denormalised to [0, 1]) and the class histogram of the teacher's predictions.

        Coverage, confidence and agreement scalars come from the collapse watch (dfkd.watch), on its own cadence.
        """
        from torchvision.utils import make_grid

        x = spec.denormalize(images[:64].float()).clamp(0, 1).cpu()
        self.tb.add_image("synthetic/images", make_grid(x, nrow=8, padding=1), step)
        classes = teacher_logits.argmax(1).cpu()
        self.tb.add_histogram("synthetic/teacher_class", classes, step, bins=teacher_logits.shape[1])

    def event(self, step: int, **fields: Any) -> None:
        """A non-scalar record (start, resume, finish) in metrics.jsonl."""
        self.file.write(json.dumps({"step": step, **fields}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.tb.flush()
        self.tb.close()
        self.file.close()


class NullLog:
    """The run log of a torchrun rank other than 0: the same calls, nothing written (rank 0 writes the run's log)."""

    tb = None

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        del step, values, prefix

    def synthetic(self, step: int, images: torch.Tensor, spec: InputSpec, teacher_logits: torch.Tensor) -> None:
        del step, images, spec, teacher_logits

    def event(self, step: int, **fields: Any) -> None:
        del step, fields

    def close(self) -> None:
        pass
