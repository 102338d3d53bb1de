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
