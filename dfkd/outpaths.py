"""Output paths checked before the work starts: a run folder that is new or empty, a file that can be written."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dfkd.errors import DfkdError

#: What a dfkd run folder holds once it has started (a folder with one of these is a run, to resume or leave).
#: The file every `dfkd distill` run folder holds from its first step (a student.pt alone may be the user's model).
RUN_MARKER = "checkpoint.pt"


def unstarted_run(d: Path) -> bool:
    """Whether folder `d` holds only what a `dfkd distill` run writes before its first checkpoint.

    A run killed there (kill -9, a lost machine) left its config.json, an empty log and a TensorBoard file: a
    folder `--resume` refused (no checkpoint) and the same command refused (not empty). Nothing else may be in it
    (a file of the user's keeps the folder refused), and its config.json must be a run's.
    """
    try:
        entries = list(d.iterdir())
    except OSError:
        return False
    runs = all(e.is_file() and (e.name in ("config.json", "metrics.jsonl") or e.name.startswith("events.out.tfevents.")
                                or (e.name.startswith(".") and ".tmp" in e.name)) for e in entries)
    if not entries or not runs or (d / RUN_MARKER).exists() or not (d / "config.json").is_file():
        return False
    try:
        config = json.loads((d / "config.json").read_text())
        log = (d / "metrics.jsonl").read_text().splitlines() if (d / "metrics.jsonl").exists() else []
        steps = {json.loads(line).get("step") for line in log if line.strip()}
    except (OSError, ValueError, AttributeError):
        return False
    # a log past step 0 is a run's record (a finished run whose checkpoint the user deleted): not cleared
    return isinstance(config, dict) and {"method", "teachers", "params"} <= set(config) and steps <= {0}


def clear_unstarted(d: Path) -> None:
    """Remove what a run stopped before its first checkpoint wrote (`unstarted_run`), so a run can start there."""
    for e in d.iterdir():
        e.unlink(missing_ok=True)


def _nearest_existing(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def probe_writable(folder: Path, what: str) -> None:
    """Create and delete a file in `folder`: the one check that holds for root, read-only mounts and /proc."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise DfkdError(f"{what}: cannot write into {folder} ({e.strerror}); pick a writable place") from None


#: What a temporary name adds to an output's name while it is written: "." + name + "." + 8 random characters +
#: ".tmp", and for an export the name's own suffix again (".tmp.onnx").
TEMP_NAME_EXTRA = 14


def name_max(out: Path) -> int:
    """The longest file name the folder of `out` takes (255 where the system does not say)."""
    try:
        return os.pathconf(next(p for p in out.absolute().parents if p.exists()), "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError, StopIteration):  # no pathconf (Windows), or no answer
        return 255


def check_output_file(path: str | os.PathLike, flag: str = "--out", force: bool | None = False) -> Path:
    """Refuse an output file that cannot be written, or that exists and `force` is not given.

    Not writable: a folder, a device, a read-only or missing place. An existing file is the user's and is never
    replaced without --force (`force` None: the command has no --force, and the message does not offer it).
    Missing parent folders are fine (they are created when the file is written) as long as the nearest existing
    one is a writable folder.
    """
    p = Path(path)
    what = f"{flag} {p}"
    if not str(path).strip():
        raise DfkdError(f"{flag}: empty path; give a file name")
    if str(path).endswith(("/", os.sep)):  # Path() drops the slash: `--out newdir/` wrote a file named newdir
        raise DfkdError(f"{flag} {path}: names a folder (it ends in a slash); give a file name inside it")
    try:
        p.exists()
    except OSError as e:  # ENAMETOOLONG: a name (or path) longer than the system takes; a traceback before
        raise DfkdError(f"{flag} {str(p)[:60]}...: {e.strerror}; give a shorter name") from None
    longest, extra = name_max(p), TEMP_NAME_EXTRA + len(os.fsencode(p.suffix))
    if len(os.fsencode(p.name)) + extra > longest:  # its temporary name failed after all the work
        raise DfkdError(f"{flag} {str(p)[:60]}...: the file name is {len(os.fsencode(p.name))} bytes, and its "
                        f"temporary name while it is written {extra} more than the {longest} a name may have here; "
                        "give a shorter name")
    if p.is_symlink() and not p.exists():  # a dangling link was replaced by a file, unsaid
        raise DfkdError(f"{what}: is a link to {os.readlink(p)}, which does not exist; remove the link or give "
                        "another name")
    if p.is_dir():
        raise DfkdError(f"{what}: is a folder; give a file name inside it")
    if p.exists() and not p.is_file():
        raise DfkdError(f"{what}: is not a regular file (a device or pipe?); give a file path")
    if p.exists() and not force:
        how = "add --force to overwrite it" if force is not None else "remove it (dfkd never overwrites it)"
        raise DfkdError(f"{what}: already exists; choose another name or {how}")
    base = _nearest_existing(p.parent)
    if not base.is_dir():
        raise DfkdError(f"{what}: {base} is a file, not a folder; give a path inside a folder")
    probe_writable(base, what)
    return p


def _resume_command_of(run_dir: Path) -> str:
    """The command that continues the run in `run_dir`: its process count (torchrun) and --trust-pickle, as made.

    Plain `dfkd distill --resume` was advised for a run of 2 processes, which it refuses.
    """
    from dfkd.distributed import resume_command
    from dfkd.runlog import parse_record, read_lines

    world, trust = 1, False
    try:
        trust = json.loads((run_dir / "config.json").read_text()).get("trust_pickle") is True
        records = map(parse_record, read_lines(run_dir / "metrics.jsonl"))
        world = next((int(r["processes"]) for r in records if r and "processes" in r), 1)
    except (OSError, ValueError, TypeError, AttributeError):  # a damaged folder: the resume itself says what is wrong
        pass
    return resume_command(run_dir, world, trust)


def prepare_run_dir(path: str | os.PathLike, flag: str = "--out") -> tuple[Path, bool]:
    """Create the run folder `path`, which must be new or empty; returns (folder, whether it was created).

    A folder holding a run is refused with the `--resume` command; a folder holding anything else is refused so
    that no file of the user's is overwritten.
    """
    d = Path(path)
    what = f"{flag} {d}"
    if not str(path).strip():
        raise DfkdError(f"{flag}: empty path; give a folder for the run")
    if d.is_symlink() and not d.exists():  # it said "cannot create the folder (File exists)"
        raise DfkdError(f"{what}: is a link to {os.readlink(d)}, which does not exist (an unmounted disk?); mount or "
                        "make its target, or give another --out")
    if d.exists() and not d.is_dir():
        raise DfkdError(f"{what}: is a file, not a folder; give a folder for the run (it is created when missing)")
    if d.is_dir():
        if (d / RUN_MARKER).exists():
            raise DfkdError(f"{what}: already holds a dfkd distill run ({RUN_MARKER}); continue it with "
                            f"`{_resume_command_of(d)}`, or pick another {flag}")
        if unstarted_run(d):  # killed before its first checkpoint: nothing of it is kept, the folder is reused
            with folder_lock(d, f"{what}: {{pid}} is starting a run in this folder; wait for it, or pick another "
                                f"{flag}"):  # not one still in its first seconds
                clear_unstarted(d)
            warnings.warn(f"{what}: held a run stopped before its first checkpoint (nothing of it was kept); "
                          "starting anew there", stacklevel=3)
        try:
            entries = sorted(e.name for e in d.iterdir())
        except OSError as e:
            raise DfkdError(f"{what}: cannot read the folder ({e.strerror})") from None
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise DfkdError(f"{what}: the folder is not empty (holds {shown}); dfkd writes a run only into a new "
                            "or empty folder, so pick another --out")
        probe_writable(d, what)
        return d, False
    base = _nearest_existing(d)
    if not base.is_dir():
        raise DfkdError(f"{what}: {base} is a file, not a folder; give a path inside a folder")
    probe_writable(base, what)
    try:
        d.mkdir(parents=True)
    except OSError as e:
        raise DfkdError(f"{what}: cannot create the folder ({e.strerror}); pick a writable place") from None
    return d, True


@contextmanager
def folder_lock(folder: Path, busy: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` for the block, so that a second dfkd process cannot work in it too.

    The lock is a `flock` on the folder itself: no lock file to leave behind, and the operating system drops it
    when the process ends, however it ends (a kill -9 leaves no stale lock). Where there is no `flock` (Windows) or
    the file system refuses it (some network mounts), the block runs unguarded.

    Raises:
        DfkdError: `busy`, when another process holds the lock; its `{pid}` becomes "process N" where the system
            tells which process holds it, else "another process".
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = lock_holder(folder)
            raise DfkdError(busy.format(pid=f"process {pid}" if pid else "another process")) from None
        except OSError:
            pass  # a file system without locks: go on unguarded
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def lock_holder(folder: Path) -> int | None:
    """The process id holding a `flock` on `folder`, read from Linux's /proc/locks; None where it does not say."""
    try:
        st = os.stat(folder)
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():  # "1: FLOCK  ADVISORY  WRITE 27593 fe:00:2228247 0 EOF" ("->" marks a waiter)
        fields = line.split()
        if "FLOCK" in fields and "->" not in fields and ident in fields:
            pid = fields[fields.index(ident) - 1]
            return int(pid) if pid.isdigit() and int(pid) > 0 else None
    return None
