"""Peak resident memory of this process, for run logs and the benchmark tables."""

from __future__ import annotations

import sys


def peak_rss_mib() -> float:
    """The most resident memory (RSS) this process has used so far, in MiB (0.0 where it cannot be read).

    `resource.getrusage` (Linux reports KiB, macOS bytes); psutil's peak working set on Windows.
    """
    try:
        import resource
    except ImportError:  # Windows
        try:
            import psutil

            return float(getattr(psutil.Process().memory_info(), "peak_wset", 0)) / 2**20
        except ImportError:
            return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def peak_device_mib(device: object) -> float | None:
    """The most memory PyTorch's allocator has held on a CUDA `device` so far, in MiB (None elsewhere)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def out_of_memory(e: BaseException) -> str | None:
    """What to say of `e` when it is an allocation that failed (CUDA, CPU or MPS), else None.

    torch raises `torch.OutOfMemoryError` on a GPU and a plain RuntimeError from its CPU allocator ("can't allocate
    memory: you tried to allocate N bytes"); both reached the user as a traceback.
    """
    import torch

    text = str(e)
    if not (isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and (
            "can't allocate memory" in text or "out of memory" in text.lower()))):
        return None
    asked = text.split("you tried to allocate ", 1)[-1].split(" bytes", 1)[0] if "you tried to allocate" in text \
        else ""
    size = f" ({int(asked) / 2**30:,.1f} GiB asked for at once)" if asked.isdigit() else ""
    where = "GPU" if isinstance(e, torch.OutOfMemoryError) or "CUDA" in text else "memory"
    return f"out of {where}{size}"
