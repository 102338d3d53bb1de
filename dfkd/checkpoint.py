"""Run checkpoints: atomic, versioned, tensors and plain types only (they load with weights_only=True)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dfkd.errors import DfkdError
from dfkd.io import atomic_torch_save

CHECKPOINT_VERSION = 1


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Every RNG the run draws from (all randomness goes through torch): the CPU's and the run's GPU's.

    Only the GPU the run uses is recorded, not every visible one, so a checkpoint resumes on a machine with
    fewer GPUs (or on another one, with `--device`).
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore `rng_state()`'s result; the GPU stream goes to the run's GPU (none when it now runs on the CPU).

    Checkpoints of older dfkd held a list, one state per visible GPU: the first one is used.
    """
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):
        if not cuda:
            return
        cuda = cuda[0]
    torch.cuda.set_rng_state(cuda, device)


def save_checkpoint(path: Path, *, config: dict[str, Any], step: int, elapsed: float, method_state: dict[str, Any],
                    finished: bool, extra: dict[str, Any] | None = None,
                    rng: dict[str, Any] | None = None) -> None:
    """Write everything a resume needs, atomically (`rng`: default this process's RNG state, CPU only)."""
    atomic_torch_save({
        "version": CHECKPOINT_VERSION, "config": config, "step": step, "elapsed": elapsed,
        "method": method_state, "rng": rng if rng is not None else rng_state(), "finished": finished,
        "extra": extra or {},
    }, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with weights_only=True; a clear error for a missing, corrupt or newer one."""
    from dfkd.loading import read_weights_only

    if not path.exists():
        from dfkd.outpaths import unstarted_run

        if unstarted_run(path.parent):
            raise DfkdError(f"--resume {path.parent}: the run was stopped before its first checkpoint, so nothing of "
                            "it is kept; start it again (the same command with --out "
                            f"{path.parent} takes the folder again)")
        raise DfkdError(f"--resume {path.parent}: no checkpoint.pt there; was the run started with dfkd distill?")
    ckpt = read_weights_only(path, "--resume")
    keys = ("version", "config", "step", "elapsed", "method", "rng", "finished")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in keys) or not isinstance(ckpt["config"], dict):
        if isinstance(ckpt, dict) and ckpt.get("format") == "dfkd-model":
            raise DfkdError(f"--resume {path}: holds a dfkd model file, not a run checkpoint; give the folder "
                            "`dfkd distill` wrote")
        raise DfkdError(f"--resume {path}: not a dfkd checkpoint")
    if not isinstance(ckpt["version"], int):
        raise DfkdError(f"--resume {path}: not a dfkd checkpoint (version {ckpt['version']!r})")
    if ckpt["version"] > CHECKPOINT_VERSION:
        raise DfkdError(f"--resume {path}: checkpoint version {ckpt['version']} is newer than this dfkd; upgrade")
    kinds = {"step": int, "elapsed": (int, float), "finished": bool, "method": dict}
    wrong = [k for k, kind in kinds.items() if not isinstance(ckpt[k], kind) or (k == "step" and ckpt[k] < 0)]
    if wrong:
        raise DfkdError(f"--resume {path}: a damaged checkpoint ({', '.join(wrong)} of the wrong kind); it cannot "
                        "be continued: start the run again")
    return ckpt
