"""The Synthesizer interface: what every family of transfer-data synthesis provides to the loop."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

LossDict = dict[str, torch.Tensor]


class Synthesizer(ABC):
    """Makes transfer data for the student.

    `synthesize()` runs the synthesis steps of one round (generator updates or input optimisation) and returns
    the batch it made with a loss dict `{"loss": total, "loss/<term>": ...}`; `sample(n)` serves transfer data for
    student steps (fresh from a generator, or from a pool). `state_dict()` / `load_state_dict()` carry everything a
    resume needs.
    """

    @abstractmethod
    def synthesize(self) -> tuple[torch.Tensor, LossDict]:
        """Run one round of synthesis steps; return (batch, losses of the last step)."""

    @abstractmethod
    def sample(self, n: int) -> torch.Tensor:
        """Return `n` transfer images (no gradient)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
