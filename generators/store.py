"""An append-only store of fixed-shape records (images, labels, feature rows): in memory up to a budget, else on disk.

The image pool and CMI's memory bank keep the newest `capacity` records of everything a run has made. Both grow as
they fill (nothing is allocated in proportion to the capacity up front), stay in memory while they fit a RAM budget
and are read from disk beyond it, so a pool of 256,000 ImageNet-size images (77 GB in float16) works on a laptop.

With a folder (the run folder: `attach`), every record is also appended to files there, `NAME-00000.bin`,
`NAME-00001.bin`, ... (segments of about 256 MiB, record i at a fixed offset). A record is written once and never
changed, so a checkpoint needs only the count of records made (`state_dict()` holds no data): a resume reads the
newest `capacity` records before that count back, whatever the interrupted run wrote after it. Segments that
neither the live store nor the last checkpoint can need are deleted. The disk is read with `os.pread`, not a
memory map: pages of a mapped file count towards the process's resident memory, and the RAM budget is meant to
bound that.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dfkd.errors import DfkdError

#: Records a store keeps in memory before it serves them from disk: 1 GiB (`-p ram_budget_mib=...` per method).
DEFAULT_RAM_BUDGET_MIB = 1024
SEGMENT_BYTES = 256 * 2**20


def to_device(rows: Tensor, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Tensor:
    """Host rows on `device` as `dtype`: on a GPU through pinned memory, copied without waiting (non_blocking).

    The cast happens on the device, after the copy, so a half-precision store moves half the bytes.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return rows.to(device, dtype)
    return rows.pin_memory().to(device, non_blocking=True).to(dtype)


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(str(dtype).removeprefix("torch."))


class RecordStore:
    """The newest `capacity` records appended, each a tuple of tensors of fixed shapes and dtypes.

    Args:
        capacity: the most records kept; older ones drop out first in, first out.
        name: file name stem of the on-disk segments.
        ram_budget_mib: records are served from memory while they take at most this many MiB, else from disk.
        folder: where the segment files go (None: memory only until the budget is exceeded, then a private
            temporary folder).

    Shape:
        - append: tensors (B, *shape_f) for each field f
        - gather: indices (n,) in [0, len) (0 = oldest kept) -> tensors (n, *shape_f)
    """

    def __init__(self, capacity: int, name: str, ram_budget_mib: float = DEFAULT_RAM_BUDGET_MIB,
                 folder: str | os.PathLike | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"{name} capacity must be >= 1, got {capacity}")
        self.capacity, self.name = int(capacity), name
        self.budget = int(float(ram_budget_mib) * 2**20)
        self.folder = Path(folder) if folder is not None else None
        self.fields: list[tuple[tuple[int, ...], torch.dtype]] | None = None
        self.added = 0
        self.ram: list[Tensor] | None = []  # None: served from disk
        self._tmp: str | None = None
        self._fds: dict[int, int] = {}
        self._kept_from = 0  # the oldest record the last state_dict() (the last checkpoint) needs

    def __len__(self) -> int:
        return min(self.added, self.capacity)

    # --- layout ---------------------------------------------------------------------------------------------
    @property
    def record_bytes(self) -> int:
        assert self.fields is not None
        return sum(int(np.prod(s, dtype=np.int64)) * _np_dtype(d).itemsize for s, d in self.fields)

    @property
    def per_segment(self) -> int:
        return max(1, SEGMENT_BYTES // self.record_bytes)

    @property
    def on_disk(self) -> bool:
        return self.ram is None

    def nbytes_in_memory(self) -> int:
        return 0 if not self.ram else sum(t.numel() * t.element_size() for t in self.ram)

    def attach(self, folder: str | os.PathLike) -> None:
        """Append records to files in `folder` from now on (records already held are written there first)."""
        old = self._files_folder()
        self._close_fds()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if len(self):
            rows = self._read(torch.arange(self.added - len(self), self.added), old)
            self._write(self.added - len(self), rows)
        for key in [k for k in self._fds if k < 0]:
            os.close(self._fds.pop(key))
        self._drop_tmp()

    # --- writing --------------------------------------------------------------------------------------------
    def append(self, *tensors: Tensor) -> None:
        """Store a batch of records (detached, on the CPU, cast to the store's dtypes)."""
        if self.fields is None:
            self.fields = [(tuple(t.shape[1:]), t.dtype) for t in tensors]
        self._check(tensors)
        rows = [t.detach().to("cpu", d)[-self.capacity:].contiguous() for t, (_, d) in zip(tensors, self.fields)]
        n, start = rows[0].shape[0], self.added + tensors[0].shape[0] - rows[0].shape[0]
        if self.ram is not None and not self._grow(min(start + n, self.capacity)):
            self._spill()
        if self.ram is not None:
            slots = torch.arange(start, start + n) % self.capacity
            for buf, r in zip(self.ram, rows):
                buf[slots] = r
        if self._files_folder() is not None:
            self._write(start, rows)
        self.added = start + n

    def _check(self, tensors: tuple[Tensor, ...]) -> None:
        assert self.fields is not None
        if len(tensors) != len(self.fields):
            raise ValueError(f"{self.name}: {len(self.fields)} fields per record, got {len(tensors)}")
        for t, (shape, _) in zip(tensors, self.fields):
            if tuple(t.shape[1:]) != shape:
                raise ValueError(f"{self.name} holds records of shape {shape}, got {tuple(t.shape[1:])}")
            if t.shape[0] != tensors[0].shape[0]:
                raise ValueError(f"{self.name}: fields of one batch differ in length")

    def _grow(self, rows: int) -> bool:
        """Make room for `rows` records in memory; False when that would pass the budget."""
        have = 0 if not self.ram else self.ram[0].shape[0]
        if rows <= have:
            return True
        if rows * self.record_bytes > self.budget:
            return False
        new = min(self.capacity, max(rows, min(2 * have, self.budget // self.record_bytes)))
        bufs = [torch.empty((new, *s), dtype=d) for s, d in self.fields]
        for b, old in zip(bufs, self.ram or []):
            b[:have] = old
        self.ram = bufs
        return True

    def _spill(self) -> None:
        """Serve from disk from now on: into a private temporary folder when no folder is attached."""
        if self.folder is None and self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix=f"dfkd-{self.name}-")
            if len(self):
                self._write(self.added - len(self), self._ram_rows(torch.arange(self.added - len(self), self.added)))
        self.ram = None

    def _write(self, start: int, rows: list[Tensor]) -> None:
        data = np.concatenate([r.reshape(r.shape[0], -1).numpy().view(np.uint8) for r in rows], axis=1)
        per, i = self.per_segment, 0
        while i < data.shape[0]:
            seg, off = divmod(start + i, per)
            k = min(per - off, data.shape[0] - i)
            os.pwrite(self._fd(seg), data[i:i + k].tobytes(), off * self.record_bytes)
            i += k

    # --- reading --------------------------------------------------------------------------------------------
    def gather(self, idx: Tensor) -> list[Tensor]:
        """Records at logical positions `idx` (0 = the oldest kept), one tensor per field."""
        absolute = idx.long() + (self.added - len(self))
        return self._ram_rows(absolute) if self.ram is not None else self._read(absolute, self._files_folder())

    def _ram_rows(self, absolute: Tensor) -> list[Tensor]:
        slots = absolute % self.capacity
        return [buf[slots] for buf in self.ram]

    def _read(self, absolute: Tensor, folder: Path | None) -> list[Tensor]:
        if self.ram is not None and folder is None:
            return self._ram_rows(absolute)
        rb, per = self.record_bytes, self.per_segment
        buf = bytearray(rb * absolute.numel())
        for j, a in enumerate(absolute.tolist()):
            seg, off = divmod(a, per)
            chunk = os.pread(self._fd(seg, folder), rb, off * rb)
            if len(chunk) != rb:
                raise DfkdError(self._short(self._path(seg, folder)))
            buf[j * rb:(j + 1) * rb] = chunk
        raw, out, col = np.frombuffer(buf, dtype=np.uint8).reshape(-1, rb), [], 0
        for shape, dtype in self.fields:
            width = int(np.prod(shape, dtype=np.int64)) * _np_dtype(dtype).itemsize
            field = raw[:, col:col + width].copy().view(_np_dtype(dtype)).reshape(-1, *shape)
            out.append(torch.from_numpy(field))
            col += width
        return out

    # --- files ----------------------------------------------------------------------------------------------
    def _files_folder(self) -> Path | None:
        return self.folder if self.folder is not None else (Path(self._tmp) if self._tmp else None)

    def _short(self, path: Path) -> str:
        return (f"{path} is shorter than the records the run wrote into it (truncated, or overwritten?): the run "
                f"folder's {self.name} files are damaged and the run cannot resume from them: put the file back, or "
                "start a new run")

    def _path(self, seg: int, folder: Path | None = None) -> Path:
        return (folder or self._files_folder()) / f"{self.name}-{seg:05d}.bin"

    def _fd(self, seg: int, folder: Path | None = None) -> int:
        folder = folder or self._files_folder()
        if folder != self._files_folder():
            return self._open_elsewhere(seg, folder)
        if seg not in self._fds:
            folder.mkdir(parents=True, exist_ok=True)
            self._fds[seg] = os.open(self._path(seg), os.O_RDWR | os.O_CREAT, 0o644)
        return self._fds[seg]

    def _open_elsewhere(self, seg: int, folder: Path) -> int:
        key = -1 - seg  # a read of the files this store is moving away from (attach)
        self._fds.setdefault(key, os.open(self._path(seg, folder), os.O_RDONLY))
        return self._fds[key]

    def _close_fds(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def _drop_tmp(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _prune(self) -> None:
        """Delete segments older than both the live window and what the last checkpoint needs."""
        if self.folder is None or self.fields is None:
            return
        keep_from = min(self._kept_from, self.added - len(self)) // self.per_segment
        for seg in [s for s in self._fds if 0 <= s < keep_from]:
            os.close(self._fds.pop(seg))
        for path in self.folder.glob(f"{self.name}-*.bin"):
            stem = path.stem.rsplit("-", 1)[-1]
            if stem.isdigit() and int(stem) < keep_from:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        """Close files; a private temporary folder is deleted (a run folder's files stay for a resume)."""
        self._close_fds()
        self._drop_tmp()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown
            pass

    # --- checkpoint -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters and field layout; the records themselves only when there is no folder to keep them in."""
        state: dict[str, Any] = {
            "capacity": self.capacity, "added": self.added,
            "fields": None if self.fields is None else [[list(s), str(d).removeprefix("torch.")]
                                                        for s, d in self.fields]}
        if self.folder is None:
            state["records"] = None if self.fields is None else self.gather(torch.arange(len(self)))
            return state
        for fd in self._fds.values():
            os.fsync(fd)
        self._prune()
        self._kept_from = self.added - len(self)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict()` returned: the records from the state, else from this store's folder."""
        self._close_fds()
        self.capacity, self.added = int(state["capacity"]), 0
        self.fields = None if state["fields"] is None else [(tuple(s), getattr(torch, d)) for s, d in state["fields"]]
        self.ram = []
        if self.fields is None:
            return
        if "records" in state:
            self.added = int(state["added"]) - len(state["records"][0])
            if len(state["records"][0]):
                self.append(*state["records"])
            return
        self._load_files(int(state["added"]))

    def _load_files(self, added: int) -> None:
        if self.folder is None:
            raise ValueError(f"{self.name}: its records are in files; attach() the run folder before loading")
        self.added = added
        self._kept_from = added - len(self)
        missing = [self._path(s) for s in range(self._kept_from // self.per_segment,
                                                 (added - 1) // self.per_segment + 1) if not self._path(s).exists()]
        if len(self) and missing:
            raise DfkdError(f"{missing[0]} is missing: the run folder's {self.name} files are incomplete; the run "
                            "cannot resume without them: put the file back, or start a new run")
        for seg in range(self._kept_from // self.per_segment, (added - 1) // self.per_segment + 1) if len(self) else ():
            last = min(added, (seg + 1) * self.per_segment) - seg * self.per_segment
            if self._path(seg).stat().st_size < last * self.record_bytes:
                raise DfkdError(self._short(self._path(seg)))
        if len(self) * self.record_bytes > self.budget:
            self.ram = None
            return
        self.ram = []
        self._grow(len(self))
        rows = self._read(torch.arange(self._kept_from, added), self.folder)
        for buf, r in zip(self.ram, rows):
            buf[torch.arange(self._kept_from, added) % self.capacity] = r
