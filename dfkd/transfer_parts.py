"""A transfer file in the making: numbered part files beside the output, resumable, assembled without RAM for all.

`dfkd synthesize --out F.npz` writes each finished chunk of images (with the teacher's labels on them) to
`F.npz.parts/part-NNNNNN.npz` and the method's state (generator, student, pool counts, RNG) to `state.pt`
after it; the pool itself lives in files there too. Run the same command again after a crash or Ctrl-C and it
continues from the last part; other settings than the folder's `key.json` are refused. When all images are there,
the parts are streamed into F.npz (uncompressed .npy members written chunk by chunk, so a file larger than RAM
never sits in memory), then the folder is removed. `dfkd.io.memmap_member` lets a reader map such a member instead
of loading it.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfkd.errors import DfkdError
from dfkd.io import atomic_save_npz, atomic_torch_save, place_file
from dfkd.outpaths import name_max

#: The settings file of a parts folder: a folder holding it is an unfinished synthesis.
KEY_FILE = "key.json"


def parts_folder(out: str | os.PathLike) -> Path:
    """Where the parts of the transfer file `out` are kept until it is assembled: `out` + ".parts"."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def part_files(folder: Path) -> list[Path]:
    """The finished parts in a parts folder, in order."""
    return sorted(folder.glob("part-*.npz"))


def check_name(out: str | os.PathLike) -> None:
    """Refuse an output name too long for its parts folder beside it (it was a "File name too long" traceback)."""
    out = Path(out)
    longest = name_max(out)
    if len(os.fsencode(parts_folder(out).name)) > longest:
        raise DfkdError(f"--out {out.name[:40]}...: a name of {len(out.name)} characters leaves no room for its "
                        f"parts folder (NAME.parts; {longest} characters at most in a name here); give a shorter name")


def check_room(out: str | os.PathLike, num: int, image_bytes: int, classes: int) -> None:
    """Refuse a synthesis whose parts and assembled file would not fit on the disk of `out`.

    Each image takes `image_bytes` plus its labels (`classes` float32 probabilities and an int64 class), twice: in
    the parts and in the file streamed from them; parts already written count as done.
    """
    check_name(out)
    out = Path(out).absolute()
    per = image_bytes + 4 * classes + 8
    folder = parts_folder(out)
    had = sum(f.stat().st_size for f in part_files(folder)) if folder.is_dir() else 0
    need = max(2 * num * per - had, 0)
    where = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(where).free
    if need > free:
        raise DfkdError(f"--num {num}: the images need about {_size(need)} on disk at {where} (the parts, then the "
                        f"file made from them) and {_size(free)} are free; give a smaller --num or an --out on a "
                        "larger disk")


def _size(n: int) -> str:
    """Bytes for a message: GiB from a quarter GiB up (one decimal), else whole MiB, KiB or bytes."""
    if n >= 2**28:
        return f"{n / 2**30:.1f} GiB"
    units = ((20, "MiB"), (10, "KiB"), (0, "bytes"))
    return next(f"{round(n / 2**e)} {unit}" for e, unit in units if n >= 2**e or not e)


class Parts:
    """The parts folder of an output file: what is done, adding a part, the state to resume from, assembly.

    Args:
        out: the transfer file to make.
        key: the settings that must match to resume (method, teacher hash, seed, num, params, labels, ...).
    """

    def __init__(self, out: str | os.PathLike, key: dict[str, Any]) -> None:
        self.out = Path(out)
        self.folder = parts_folder(self.out)
        check_name(self.out)
        self.key = json.loads(json.dumps(key))
        if self.folder.exists():
            saved = self._saved_key()
            if saved != self.key:
                diff = sorted(k for k in set(saved) | set(self.key) if saved.get(k) != self.key.get(k))
                raise DfkdError(f"--out {self.out}: {self.folder} holds an unfinished synthesis with other settings"
                                f" ({', '.join(diff)}); give the same flags to resume, or delete the folder")
        else:
            self.folder.mkdir(parents=True)
            (self.folder / KEY_FILE).write_text(json.dumps(self.key, sort_keys=True))

    def _saved_key(self) -> dict[str, Any]:
        try:
            return json.loads((self.folder / KEY_FILE).read_text())
        except (OSError, ValueError):
            raise DfkdError(f"--out {self.out}: {self.folder} is not an unfinished dfkd synthesis (no readable "
                            "key.json); move it away") from None

    def files(self) -> list[Path]:
        """The finished parts, in order."""
        return part_files(self.folder)

    def done(self) -> int:
        """Images already written."""
        total = 0
        for f in self.files():
            with np.load(f) as d:
                total += len(d["probs"])
        return total

    def add(self, x: torch.Tensor, probs: torch.Tensor, state: dict[str, Any]) -> None:
        """Write one part (uint8 images, label rows), then the state that produced everything so far."""
        n = len(self.files())
        atomic_save_npz(self.folder / f"part-{n:06d}.npz", {"x": x.numpy(), "probs": probs.numpy()})
        atomic_torch_save({**state, "parts": n + 1}, self.folder / "state.pt")

    def state(self) -> dict[str, Any] | None:
        """The state saved with the last part (None before the first); parts written after it are dropped.

        A stop between a part and its state left a part the state did not know: the resumed run made its images
        again from the earlier state, and the file held them twice.
        """
        path = self.folder / "state.pt"
        state = torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None
        files = self.files()
        known = 0 if state is None else int(state.get("parts", len(files)))  # older folders: as they are
        for f in files[known:]:
            f.unlink()
        return state

    def assemble(self, extra: dict[str, Any], num: int, replace: bool = True) -> None:
        """Stream the first `num` images of the parts, their labels and `extra` arrays into the output, atomically.

        `replace` False: a file that appeared at the output meanwhile is kept, and this one is not written.
        """
        tmp = self.out.with_name(f".{self.out.name}.{os.getpid()}.tmp")  # one process's, hidden until replaced
        for stale in self.out.parent.glob(f".{glob.escape(self.out.name)}.*.tmp"):  # of a killed run (kill -9)
            if stale.name[len(self.out.name) + 2:-4].isdigit():
                stale.unlink(missing_ok=True)
        try:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                first = next(self._chunks("x", 1))
                _stream(zf, "x", (num, *first.shape[1:]), first.dtype, self._chunks("x", num))
                k = next(self._chunks("probs", 1)).shape[1]
                _stream(zf, "probs", (num, k), np.dtype(np.float32), self._chunks("probs", num))
                _stream(zf, "y", (num,), np.dtype(np.int64),
                        (p.argmax(1).astype(np.int64) for p in self._chunks("probs", num)))
                for k, v in extra.items():
                    with zf.open(f"{k}.npy", "w") as f:
                        np.lib.format.write_array(f, np.asanyarray(v), allow_pickle=False)
            try:
                place_file(tmp, self.out, replace)
            except DfkdError as e:  # the parts stay: the same command writes the file from them, without work
                raise DfkdError(f"{e} (or move that file away and run the same command again: the images are kept "
                                f"in {self.folder} and are not made again)") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        shutil.rmtree(self.folder)

    def _chunks(self, key: str, num: int) -> Iterator[np.ndarray]:
        left = num
        for f in self.files():
            if left <= 0:
                return
            with np.load(f) as d:
                a = d[key][:left]
            left -= len(a)
            yield a


def _stream(zf: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype,
            chunks: Iterator[np.ndarray]) -> None:
    """One .npy member of `shape` written one part at a time (only one part's array is in memory)."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_2_0(f, header)
        for a in chunks:
            f.write(np.ascontiguousarray(a, dtype=dtype).tobytes())
