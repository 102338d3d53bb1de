"""Atomic file writing: a temp file in the same folder, fsync, then `os.replace` (never a half-written file)."""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from dfkd.errors import DfkdError

#: A full disk, a file-size limit, a quota, a read-only or failing disk: the write cannot succeed as it is.
DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO}


class WriteFailed(DfkdError):
    """A file could not be written (disk full, file-size limit, ...); the file it replaces is intact."""


def disk_error(e: OSError, path: str | os.PathLike | None = None) -> WriteFailed | None:
    """The one-line error for a write that failed for lack of room or permission (else None: something else)."""
    where = path or e.filename or "a file"
    if e.errno in (errno.EACCES, errno.EPERM):
        return WriteFailed(f"cannot write {where}: {os.strerror(e.errno)}; make it and its folder writable (chmod "
                           "u+w; chattr -i for an immutable file)")
    if e.errno == errno.EROFS:  # it said "free some space"
        return WriteFailed(f"cannot write {where}: {os.strerror(e.errno)} (a read-only mount); write somewhere "
                           "writable")
    if e.errno == errno.ENAMETOOLONG:
        shown = str(where) if len(str(where)) <= 80 else f"{str(where)[:60]}..."
        return WriteFailed(f"cannot write {shown}: {os.strerror(e.errno)}; give a shorter name")
    if e.errno not in DISK_ERRNOS:
        return None
    return WriteFailed(f"cannot write {where}: {os.strerror(e.errno)}; free some space (or raise the file-size "
                       "limit, `ulimit -f`)")


def usual_permissions(path: str | os.PathLike) -> None:
    """Give a file the permissions a new file gets under the umask (mkstemp makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def place_file(tmp: str | os.PathLike, path: str | os.PathLike, replace: bool = True) -> None:
    """Move a finished temporary file `tmp` to `path` (same folder), atomically.

    `replace` False (an output the user names, without --force): a file that appeared at `path` while the work ran
    (a second run on the same --out, or the user's own) is never replaced: the start's check was all that stood
    between them, and the last process to finish won unsaid. A hard link takes the name only if it is free; a file
    system without hard links gets a check just before the move.
    """
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except OSError as e:
        if not isinstance(e, FileExistsError) and not os.path.lexists(path):  # no hard links (FAT, some shares)
            os.replace(tmp, path)
            return
        raise DfkdError(f"{path}: a file appeared there while this ran (another run with the same output, or "
                        "yours); it is left as it is and this result was not written: run again with another "
                        "name") from None
    os.unlink(tmp)


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], replace: bool = True) -> None:
    path = Path(path)
    tmp: str | None = None
    try:  # a read-only or full disk at the folder, the temporary file or the write: one line (`disk_error`)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        usual_permissions(tmp)
        place_file(tmp, path, replace)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        err = disk_error(e, path) if isinstance(e, OSError) else None
        if err is None:
            raise
        raise err from None


#: What `_atomic_write` names its temporary file: "." + the file's name + mkstemp's 8 characters + ".tmp".
_TEMP = re.compile(r"^\.(.+)\.[A-Za-z0-9_]{8}\.tmp$")


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temporary files a killed write left in `folder` (call it only while no one else writes there).

    A process killed (kill -9, out of memory) mid-write leaves its hidden `.NAME.XXXXXXXX.tmp`, as large as the file.
    """
    stale = [p for p in folder.glob(".*.tmp") if p.is_file() and _TEMP.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_torch_save(obj: Any, path: str | os.PathLike, replace: bool = True) -> None:
    """`torch.save(obj, path)`, atomically.

    The bytes are made in memory first: torch's writer turns a failed write into an opaque RuntimeError, while
    Python's keeps the OSError (ENOSPC, EFBIG) that says what went wrong.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic_write(path, lambda f: f.write(buf.getbuffer()), replace)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path`, atomically."""
    _atomic_write(path, lambda f: f.write(text.encode()))


def atomic_save_npz(path: str | os.PathLike, arrays: dict[str, Any]) -> None:
    """`np.savez_compressed` of `arrays` to exactly `path` (no ".npz" appended), atomically."""
    import numpy as np

    _atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike, replace: bool = True) -> None:
    """Copy `src` to `dst`, atomically (`replace` False: never over a file at `dst`, see `place_file`)."""
    with open(src, "rb") as g:
        _atomic_write(dst, lambda f: shutil.copyfileobj(g, f), replace)


#: PNG text key naming what a dfkd picture was drawn from: such a file may be drawn again, any other is the user's.
DRAWN_FROM = "dfkd-drawn-from"


def read_json_object(path: str | os.PathLike, fix: str) -> dict[str, Any]:
    """A JSON object a run wrote (its settings), or one line naming the damaged file and `fix` (a traceback before)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        value = e
    if not isinstance(value, dict):
        why = f"not JSON ({value})" if isinstance(value, Exception) else f"a JSON {type(value).__name__}, not an object"
        raise DfkdError(f"{path}: damaged ({why}); {fix}")
    return value


def drawn_from(kind: str, source: str | os.PathLike) -> str:
    """What a dfkd PNG records it was drawn from: the kind of picture and the absolute path of its input."""
    return f"{kind} {Path(source).resolve()}"


def _same_mark(stored: str, mark: str, out: Path) -> bool:
    """Whether a picture at `out` marked `stored` was drawn from the input `mark` names.

    The same input by path; or, for a picture beside its input, an input of the same name: a folder moved with its
    pictures keeps them dfkd's (they were "not a picture dfkd drew", and refused), while a picture elsewhere of
    another file of that name stays another input's.
    """
    if stored == mark:
        return True
    kind, _, was = stored.partition(" ")
    want_kind, _, now = mark.partition(" ")
    return kind == want_kind and Path(was).name == Path(now).name and out.resolve().parent == Path(now).parent


def image_free(out: Path, mark: str) -> bool:
    """Whether `out` may be written: absent, or a PNG dfkd drew from the same input (`mark`, see `atomic_save_png`)."""
    from PIL import Image

    if not out.exists():
        return True
    try:
        with Image.open(out) as im:
            return _same_mark(str(getattr(im, "text", {}).get(DRAWN_FROM, "")), mark, out)
    except Exception:  # noqa: BLE001 - not an image PIL reads: not one dfkd drew
        return False


def check_image_free(out: Path, mark: str, where: str, how: str = "give another file name") -> None:
    """Refuse an existing `out` unless it is a PNG dfkd drew from the same input (`mark`, see `atomic_save_png`)."""
    if not image_free(out, mark):
        raise DfkdError(f"{where}: already exists and is not a picture dfkd drew from this input; {how} or remove "
                        "it (dfkd never overwrites a file it did not write)")


def atomic_save_png(image: Any, out: str | os.PathLike, mark: str = "") -> None:
    """Save a PIL image as PNG, atomically, recording `mark` (what it was drawn from) so a rerun may redraw it."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(DRAWN_FROM, mark)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    _atomic_write(out, lambda f: f.write(buf.getbuffer()))


def atomic_save_figure(fig: Any, out: str | os.PathLike, mark: str = "", dpi: int = 100) -> None:
    """Save a matplotlib figure as PNG, atomically, recording `mark` as `atomic_save_png` does."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={DRAWN_FROM: mark})
    _atomic_write(out, lambda f: f.write(buf.getbuffer()))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read once while the file is unchanged (same inode, size and mtime).

    A resume with a moved teacher hashed it twice, and every trial of a search hashed the teacher again: seconds
    each for a teacher of hundreds of MB.
    """
    st = os.stat(path)
    return _sha256_of(os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)


def same_data(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two data paths are one file or folder, or byte-equal files (hashed only when their sizes agree)."""
    try:
        if os.path.samefile(a, b):
            return True
        return os.path.isfile(a) and os.path.isfile(b) and os.path.getsize(a) == os.path.getsize(b) and \
            sha256_file(a) == sha256_file(b)
    except OSError:
        return False


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, inode: int, size: int, mtime_ns: int) -> str:
    del inode, size, mtime_ns  # the cache key: a changed file is read again
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def open_npz(path: Path, flag: str, holds: str = "named arrays") -> Iterator[Any]:
    """An .npz opened without pickle; a file numpy cannot read becomes one DfkdError naming `flag` and the file.

    Errors while the block reads an array (a truncated member) are caught too; a DfkdError raised inside the
    block (a missing array, say) passes through unchanged. `holds` says what the file should hold, for the
    message about a bare .npy array.
    """
    if Path(path).exists() and not Path(path).is_file() and not Path(path).is_dir():  # np.load would wait on a pipe
        raise DfkdError(f"{flag} {path}: not a regular file (a pipe, socket or device); give an .npz file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DfkdError(f"{flag} {path}: holds a single array (.npy), not an .npz with {holds}")
        if any(n.endswith("data.pkl") for n in loaded.files):  # a torch.save zip opens as an .npz too
            loaded.close()
            raise DfkdError(f"{flag} {path}: is a PyTorch file (a model or checkpoint?), not an .npz with {holds}")
        with loaded as d:
            yield _Arrays(d, f"{flag} {path}")
    except DfkdError:
        raise
    except MemoryError:  # a header declaring more than the machine holds (numpy allocates before it reads)
        raise DfkdError(f"{flag} {path}: an array's header declares more data than fits in memory; the file is "
                        "corrupt, or too large to read whole (store it with np.savez, which is read in place)") \
            from None
    except (OSError, ValueError, zipfile.BadZipFile, zlib.error, EOFError, KeyError, AttributeError,
            OverflowError) as e:
        text = str(e)
        if "Object arrays cannot be loaded" in text:  # numpy's advice (allow_pickle) is never passed on
            raise DfkdError(f"{flag} {path}: holds an array of Python objects (dtype object), which dfkd does not "
                            "unpickle; store numbers (images as uint8, labels as integers)") from None
        if "pickled" in text:  # not a zip of arrays nor a .npy: numpy took it for a pickle
            raise DfkdError(f"{flag} {path}: not a readable .npz file (no zip of arrays, no .npy header: truncated "
                            f"or corrupt, or another kind of file); give an .npz with {holds}") from None
        raise DfkdError(f"{flag} {path}: not a readable .npz file ({text[:120]}); is it truncated or "
                        "corrupt?") from None


class _Arrays:
    """An open .npz whose members must be arrays: numpy hands a member that is not an .npy back as raw bytes."""

    def __init__(self, npz: Any, where: str) -> None:
        self._npz, self._where = npz, where

    @property
    def files(self) -> list[str]:
        return self._npz.files

    def __contains__(self, key: str) -> bool:
        return key in self._npz

    def __getitem__(self, key: str) -> np.ndarray:
        value = self._npz[key]
        if not isinstance(value, np.ndarray):
            raise DfkdError(f"{self._where}: its member {key!r} is not an .npy array (truncated or corrupt?)")
        return value


#: A compressed .npz member larger than this (uncompressed) is decompressed to a temporary file and mapped from
#: there rather than read into memory (1 GiB: the pools' default RAM budget).
SPILL_BYTES = 1 << 30


def memmap_member(path: str | os.PathLike, name: str) -> np.ndarray | None:
    """An .npy member of an .npz mapped from disk (copy-on-write), so memory grows with the batch read, not the file.

    A stored (`np.savez`) member is mapped in place. A compressed (`np.savez_compressed`) member is decompressed,
    a block at a time, to an unnamed temporary file (in `TMPDIR`) and mapped from there when it is larger than
    `SPILL_BYTES`; below that, and for Fortran-ordered or object members, the answer is None: read it whole.
    """
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            if info.file_size <= SPILL_BYTES:
                return None
            with zf.open(info) as f:
                return _spill(f, path, name)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        f.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30],
                                                                                                 "little"))
        shape, fortran, dtype = _npy_header(f)
        offset = f.tell()
    if fortran or dtype.hasobject:
        return None
    return np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape)


def _npy_header(f: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


def _spill(f: IO[bytes], path: str | os.PathLike, name: str) -> np.ndarray | None:
    """Copy the array data of the .npy stream `f` to an unlinked temporary file and map it (None: read it whole)."""
    shape, fortran, dtype = _npy_header(f)
    if fortran or dtype.hasobject:
        return None
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    fix = "set TMPDIR to a disk with room, or write the file with np.savez (uncompressed), which is read in place"
    try:
        fd, tmp = tempfile.mkstemp(prefix="dfkd-", suffix=f".{name}.npy-data")
    except OSError as e:
        raise DfkdError(f"{path}: cannot make a temporary file in {tempfile.gettempdir()} to read its compressed "
                        f"member {name!r} a batch at a time ({e.strerror}); {fix}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(f, out, 1 << 22)  # 4 MiB blocks: the copy's own memory stays small
            if out.tell() != size:
                raise ValueError(f"member {name!r} holds {out.tell()} of its {size} bytes")
        return np.memmap(tmp, dtype=dtype, mode="c", shape=shape) if size else np.empty(shape, dtype)
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        raise DfkdError(f"{path}: its compressed member {name!r} ({size / 2**30:.1f} GiB) is decompressed to "
                        f"{tempfile.gettempdir()} to be read a batch at a time, and there is no room there "
                        f"({os.strerror(e.errno)}); {fix}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)  # the map keeps the data until the array is freed
