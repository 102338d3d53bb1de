"""Real images as transfer data: shuffled epochs of a labelled set, with the train-teacher augmentation."""

from __future__ import annotations

from typing import Any

import torch

from dfkd.data import ImageData, to_model_input
from dfkd.generators.base import LossDict, Synthesizer
from dfkd.spec import InputSpec
from dfkd.train_teacher import augment


class RealData(Synthesizer):
    """Serves batches of real images in place of a synthesizer (`--data TRAIN`).

    Each epoch is a fresh permutation (drawn from torch's global RNG, which checkpoints restore); a batch that would
    run past the end starts the next epoch. Images get `dfkd train-teacher`'s augmentation (random shifts, and
    flips for colour images) unless `augment` is False.

    Args:
        data: uint8 images and labels (from `dfkd.data.load_images`).
        spec: the teacher's input spec (channels, size, normalisation).
        batch_size: images per `synthesize()` batch.
        device: where batches go.
        augment: apply the augmentation.
    """

    def __init__(self, data: ImageData, spec: InputSpec, batch_size: int, device: torch.device,
                 augment: bool = True) -> None:
        self.data, self.spec, self.batch_size, self.device, self.augment = data, spec, batch_size, device, augment
        self.perm = torch.empty(0, dtype=torch.long)
        self.pos, self.epoch = 0, 0

    def indices(self, n: int) -> torch.Tensor:
        """The next `n` indices of the current epoch (a new permutation when it runs out)."""
        n = min(n, len(self.data))
        if self.pos + n > len(self.perm):
            self.perm, self.pos, self.epoch = torch.randperm(len(self.data)), 0, self.epoch + 1
        idx = self.perm[self.pos:self.pos + n]
        self.pos += n
        return idx

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` model-ready (augmented, normalised) images and their labels."""
        idx = self.indices(n)
        x = to_model_input(self.data.x[idx], self.spec).to(self.device)
        if self.augment:
            x = self.spec.normalize(augment(self.spec.denormalize(x), flip=self.spec.channels == 3))
        return x, self.data.y[idx].to(self.device)

    def synthesize(self) -> tuple[torch.Tensor, LossDict]:
        return self.batch(self.batch_size)[0], {}

    def sample(self, n: int) -> torch.Tensor:
        return self.batch(n)[0]

    def state_dict(self) -> dict[str, Any]:
        return {"perm": self.perm.clone(), "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.perm, self.pos, self.epoch = state["perm"].clone(), int(state["pos"]), int(state["epoch"])
