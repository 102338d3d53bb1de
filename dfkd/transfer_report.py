"""`dfkd report FILE.npz`: what a transfer file holds and where it came from, and a PNG of its samples per class.

Shows the provenance (teacher file, hash and top-1, method, settings, labels, dfkd version, date), the student
recipe the receiver adopts, the class histogram (by the stored labels' argmax) and label statistics, and writes
`<stem>_samples.png` beside the file: one row per class (the first `MAX_ROWS` classes), `PER_ROW` images a row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dfkd.errors import DfkdError
from dfkd.io import atomic_save_png, check_image_free, drawn_from
from dfkd.transfer import TransferData, load_transfer
from dfkd.transfer_parts import KEY_FILE, part_files, parts_folder

PER_ROW, MAX_ROWS = 10, 20


@dataclass
class TransferSummary:
    """What `dfkd report` says about a transfer file; `text()` renders it."""

    data: TransferData
    counts: list[int]
    png: Path | None
    unwritten: str | None = None  # why the samples picture was not written (the report is printed anyway)

    def text(self) -> str:
        """The summary, one fact a line."""
        d, prov = self.data, self.data.provenance
        s = d.spec
        lines = [f"file:     {d.path}",
                 f"images:   {len(d)} of {s.describe()} (uint8), {d.num_classes} classes"]
        if not prov:
            lines.append(f"made by:  method {d.method}, teacher sha256 {d.teacher_sha256[:16] or '?'} (a version-1 "
                         "file: no further provenance)")
        else:
            lines += _provenance_lines(prov, d.teacher_sha256)
        if d.recipe:
            lines.append("recipe:   " + ", ".join(f"{k}={v}" for k, v in d.recipe.items()))
        top = d.probs.max(1).values
        nonzero = (d.probs > 0).sum(1).float()
        lines.append(f"labels:   mean top probability {top.mean():.3f}, non-zero classes a row {nonzero.mean():.2f}")
        lines.append("classes:  " + "  ".join(f"{c}:{n}" for c, n in enumerate(self.counts)))
        lo, hi = min(self.counts), max(self.counts)
        lines.append(f"balance:  smallest class {lo}, largest {hi}, {sum(n == 0 for n in self.counts)} classes empty")
        if self.png is not None:
            lines.append(f"wrote:    {self.png}")
        if self.unwritten:
            lines.append(f"not written: {self.unwritten}")
        return "\n".join(lines)


def _provenance_lines(prov: dict, sha: str) -> list[str]:
    t = _mapping(prov.get("teacher"))
    top1 = t.get("top1")
    acc = f", top-1 {100 * top1:.2f}% ({t.get('top1_on')})" if isinstance(top1, (int, float)) else ", top-1 unknown"
    return [f"teacher:  {t.get('file', '?')} sha256 {sha[:16]}...{acc}",
            f"made by:  method {prov.get('method')}, {prov.get('steps')} training steps, seed {prov.get('seed')}, "
            f"labels {prov.get('labels')}" + _sampling(prov),
            f"dfkd:     version {prov.get('dfkd_version')}, {prov.get('date')}",
            "settings: " + ", ".join(f"{k}={v}" for k, v in sorted(_mapping(prov.get("settings")).items()))]


def _mapping(value: Any) -> dict:
    """A provenance entry that should be a JSON object; a damaged one reads as empty (its facts unknown)."""
    return value if isinstance(value, dict) else {}


def _sampling(prov: dict) -> str:
    """How the images were drawn (files before views and class balance say nothing)."""
    views = prov.get("views")
    out = f", {views} views an image" if isinstance(views, int) and views > 1 else ""
    return out + (", class-balanced" if prov.get("class_balanced") else "")


def class_counts(data: TransferData) -> list[int]:
    """Images per class, by the argmax of the stored labels."""
    return torch.bincount(data.probs.argmax(1), minlength=data.num_classes).tolist()


def write_class_grid(data: TransferData, out: Path, mark: str = "") -> bool:
    """PNG with one row per class (first MAX_ROWS classes), up to PER_ROW samples each; False if no images."""
    from PIL import Image
    from torchvision.utils import make_grid

    labels = data.probs.argmax(1)
    tiles = []
    for c in range(min(data.num_classes, MAX_ROWS)):
        idx = (labels == c).nonzero().flatten()[:PER_ROW]
        row = data.x[idx]
        pad = torch.zeros((PER_ROW - len(row), *data.x.shape[1:]), dtype=torch.uint8)
        tiles.append(torch.cat([row, pad]))
    grid = make_grid(torch.cat(tiles).float() / 255, nrow=PER_ROW, padding=2, pad_value=0.5)
    atomic_save_png(Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy()), out, mark)
    return True


def unfinished_synthesis(path: str | os.PathLike) -> str | None:
    """Why `path` (a transfer file, or its `.parts` folder) is not there yet: a stopped `dfkd synthesize`, else None."""
    p = Path(path)
    out = p.with_name(p.name.removesuffix(".parts")) if p.name.endswith(".parts") else p
    folder = parts_folder(out)
    if out.is_file() or not (folder / KEY_FILE).is_file():
        return None
    done = len(part_files(folder))
    return (f"FILE {out}: not written yet: a `dfkd synthesize --out {out}` run stopped with {done} part(s) done in "
            f"{folder}; run the same command again to finish it")


def report_transfer(path: str | os.PathLike, png: bool = True) -> TransferSummary:
    """Read a transfer file, summarise it and write `<stem>_samples.png` beside it.

    Raises:
        DfkdError: the file is missing, unreadable or not a transfer file.
    """
    if why := unfinished_synthesis(path):
        raise DfkdError(why)
    data = load_transfer(path, "FILE")
    out = Path(path).with_name(Path(path).stem + "_samples.png")
    mark = drawn_from("samples", path)
    wrote, why = False, None
    if png:  # a receiver on a read-only share still gets the report: the picture is extra
        try:
            check_image_free(out, mark, f"the samples picture {out}", "rename that file")
            wrote = write_class_grid(data, out, mark)
        except (DfkdError, OSError) as e:
            why = str(e)
    return TransferSummary(data, class_counts(data), out if wrote else None, why)
