"""Small shared helpers: device choice, seeding and progress bars."""

from __future__ import annotations

import random
import sys
from typing import Any

import numpy as np
import torch

from dfkd.errors import DfkdError


def pick_device(name: str = "auto", flag: str = "--device") -> torch.device:
    """`auto` picks CUDA when present, else CPU; anything else is passed to torch (with a clear error).

    `flag` names the setting in messages (a config file's key, say).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise DfkdError(f"{flag} {name!r}: not a device name (try cpu, cuda, cuda:0 or auto)") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise DfkdError(f"{flag} {name}: dfkd runs on cpu, cuda, cuda:N, mps or auto, not on {device.type}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DfkdError(f"{flag} {name}: MPS is not available on this machine; use cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DfkdError(f"{flag} {name}: CUDA is not available on this machine; use cpu")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


#: Seconds between progress-bar redraws when stderr is no terminal (a log file, a scheduler's output): each redraw
#: is a line there, and a 10-minute run wrote thousands.
LOG_REDRAW_SECONDS = 30.0


def progress_bar(**kwargs: Any) -> Any:
    """A tqdm bar on stderr; redrawn at most every `LOG_REDRAW_SECONDS` when stderr is not a terminal."""
    from tqdm import tqdm

    if not on_terminal():  # tqdm's monitor thread also redraws every maxinterval (10 s by default)
        kwargs.setdefault("mininterval", LOG_REDRAW_SECONDS)
        kwargs.setdefault("maxinterval", LOG_REDRAW_SECONDS)
    return tqdm(**kwargs)


def on_terminal() -> bool:
    """Whether stderr is a terminal: a bar redraws at once there (`set_postfix(refresh=on_terminal())`)."""
    return _is_tty(sys.stderr)


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False
