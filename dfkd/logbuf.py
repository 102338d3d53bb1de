"""Loss logging without a host sync per step: sums stay on the device until a logging step reads them once.

A method's round returns its losses as tensors (`dfkd.methods.base.step_logs`) or plain numbers. `LossBuffer.add`
adds them to running sums on their device (no transfer); `LossBuffer.read` turns the window's means into floats
with one device-to-host copy, every `log_every` steps, before a checkpoint and at the end.
"""

from __future__ import annotations

import torch

Value = torch.Tensor | float


class LossBuffer:
    """Running sums of each loss term over the rounds since the last `read(reset=True)`."""

    def __init__(self) -> None:
        self.sums: dict[str, Value] = {}
        self.counts: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self.counts)

    def add(self, losses: dict[str, Value]) -> None:
        """Add one round's losses (tensors are detached and summed where they are, as fp32)."""
        for k, v in losses.items():
            v = v.detach().float() if torch.is_tensor(v) else float(v)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1

    def read(self, reset: bool = True) -> dict[str, float]:
        """The mean of each term over the window, as floats (one host sync for all device terms)."""
        keys = [k for k, v in self.sums.items() if torch.is_tensor(v)]
        values = dict(zip(keys, torch.stack([self.sums[k].reshape(()) for k in keys]).tolist())) if keys else {}
        out = {k: (values[k] if k in values else float(v)) / self.counts[k] for k, v in self.sums.items()}
        if reset:
            self.sums, self.counts = {}, {}
        return out
