"""What a run writes while it goes: metrics.jsonl and TensorBoard events (tags grouped loss/, synthetic/, ...)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from dfkd.errors import DfkdError
from dfkd.io import atomic_write_text, disk_error
from dfkd.spec import InputSpec


def parse_record(line: str) -> dict[str, Any] | None:
    """One metrics.jsonl record (an event, or values at an integer step); None for anything else.

    Anything else: a blank line, one a failed write cut short, or a line damaged on disk.
    """
    try:
        rec = json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None
    if not isinstance(rec, dict):
        return None
    step = rec.get("step", 0 if "event" in rec else None)
    return rec if isinstance(step, int) and not isinstance(step, bool) else None


def read_lines(path: Path) -> list[str]:
    """metrics.jsonl's lines; bytes that are not UTF-8 (damage on disk) become U+FFFD, so such a line is no record."""
    try:
        return path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except IsADirectoryError:
        raise DfkdError(f"{path}: is a folder, not the run's metrics log; move it out of the run folder") from None


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
            records = (parse_record(ln) for ln in read_lines(self.path))  # what is no record is dropped
            keep = [json.dumps(r) for r in records if r is not None and r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))
        self.file = self.path.open("a")
        self.tb = SummaryWriter(str(run_dir), purge_step=resume_step)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        """One metrics.jsonl record and one TensorBoard scalar per value (tag = prefix + key)."""
        record = {"step": step, **{prefix + k: v for k, v in values.items()}}
        self._write(record)
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
        self._write({"step": step, **fields})

    def _write(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl, flushed; a full disk is named with the file (it said "cannot write a file")."""
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:
            err = disk_error(e, self.path)
            if err is None:
                raise
            raise err from None

    def close(self, quiet: bool = False) -> None:
        """Flush and close; `quiet` (after another error): a failure here is dropped, not put in that error's place."""
        try:
            self.tb.flush()
            self.tb.close()
            self.file.close()
        except OSError:
            if not quiet:
                raise


class NullLog:
    """The run log of a torchrun rank other than 0: the same calls, nothing written (rank 0 writes the run's log)."""

    tb = None

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        del step, values, prefix

    def synthetic(self, step: int, images: torch.Tensor, spec: InputSpec, teacher_logits: torch.Tensor) -> None:
        del step, images, spec, teacher_logits

    def event(self, step: int, **fields: Any) -> None:
        del step, fields

    def close(self, quiet: bool = False) -> None:
        pass
