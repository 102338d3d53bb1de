"""Run checkpoints: atomic, versioned, tensors and plain types only (they load with weights_only=True)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dfkd.errors import DfkdError
from dfkd.io import atomic_torch_save

CHECKPOINT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """Every RNG the run draws from (all randomness goes through torch)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, *, config: dict[str, Any], step: int, elapsed: float, method_state: dict[str, Any],
                    finished: bool, extra: dict[str, Any] | None = None) -> None:
    """Write everything a resume needs, atomically."""
    atomic_torch_save({
        "version": CHECKPOINT_VERSION, "config": config, "step": step, "elapsed": elapsed,
        "method": method_state, "rng": rng_state(), "finished": finished, "extra": extra or {},
    }, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with weights_only=True; a clear error for a missing, corrupt or newer one."""
    from dfkd.loading import read_weights_only

    if not path.exists():
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
    return ckpt
