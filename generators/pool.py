"""A bounded pool of synthesized images (and optional soft labels) that the student samples minibatches from.

Inversion methods (DeepInversion, ADI, ZeroQ-style synthesis) optimise one batch at a time and keep every batch;
the student learns from uniform minibatches of everything kept so far. The reference code writes PNGs to disk and
rebuilds a DataLoader each round; here the pool is a ring buffer in memory (or, optionally, a memory-mapped file),
stored in float16 by default (finer than the reference's 8-bit PNGs, half the memory of float32).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

_NP = {torch.float16: np.float16, torch.float32: np.float32}


class ImagePool:
    """Keeps up to `capacity` images; once full, each new image overwrites the oldest (first in, first out).

    Args:
        capacity: the most images kept.
        dtype: storage dtype of the images (float16 or float32); samples come back as float32.
        root: a folder for on-disk mode (images in a memory-mapped `pool.bin` there, so a pool larger than memory
            works); None keeps everything in memory. On disk, `state_dict()` holds the file's path and counters,
            not the images: the file must stay where it is for a resume.

    Shape:
        - add: images (B, C, H, W), labels (B, K) or None
        - sample: (n, C, H, W) and (n, K) or None
    """

    def __init__(self, capacity: int, dtype: torch.dtype = torch.float16,
                 root: str | os.PathLike | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"pool capacity must be >= 1, got {capacity}")
        if dtype not in _NP:
            raise ValueError(f"pool dtype must be float16 or float32, got {dtype}")
        self.capacity, self.dtype = int(capacity), dtype
        self.root = Path(root) if root is not None else None
        self.images: Tensor | None = None
        self._mm: np.memmap | None = None
        self.labels: Tensor | None = None
        self.size = 0  # images held
        self.next = 0  # slot the next image goes to
        self.added = 0  # images ever added

    def __len__(self) -> int:
        return self.size

    # --- storage ------------------------------------------------------------------------------------------
    def _allocate(self, shape: tuple[int, ...], num_labels: int | None) -> None:
        if self.root is None:
            # torch.empty does not touch its pages: memory grows as the pool fills, not at allocation.
            self.images = torch.empty((self.capacity, *shape), dtype=self.dtype)
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            mm = np.memmap(self.root / "pool.bin", dtype=_NP[self.dtype], mode="w+" if self.size == 0 else "r+",
                           shape=(self.capacity, *shape))
            self._mm, self.images = mm, torch.from_numpy(mm)
        self.labels = None if num_labels is None else torch.empty((self.capacity, num_labels), dtype=torch.float32)

    def _check(self, images: Tensor, labels: Tensor | None) -> None:
        if images.dim() != 4:
            raise ValueError(f"pool.add expects a (B, C, H, W) batch, got shape {tuple(images.shape)}")
        if self.images is not None and tuple(images.shape[1:]) != tuple(self.images.shape[1:]):
            raise ValueError(f"pool holds {tuple(self.images.shape[1:])} images, got {tuple(images.shape[1:])}")
        if self.images is not None and (labels is None) != (self.labels is None):
            raise ValueError("pool.add: give labels with every batch or with none")
        if labels is not None and labels.shape[0] != images.shape[0]:
            raise ValueError(f"pool.add: {images.shape[0]} images but {labels.shape[0]} labels")

    def add(self, images: Tensor, labels: Tensor | None = None) -> None:
        """Store a batch (detached, on CPU); the oldest images make room once the pool is full.

        Args:
            images: the batch, in the teacher's normalised input space.
            labels: optional soft labels (e.g. the teacher's logits) for the same images.
        """
        self._check(images, labels)
        if self.images is None:
            self._allocate(tuple(images.shape[1:]), None if labels is None else labels.shape[1])
        images = images.detach().to("cpu", self.dtype)[-self.capacity:]
        labels = None if labels is None else labels.detach().to("cpu", torch.float32)[-self.capacity:]
        idx = (self.next + torch.arange(images.shape[0])) % self.capacity
        self.images[idx] = images
        if labels is not None:
            self.labels[idx] = labels
        self.next = int((self.next + images.shape[0]) % self.capacity)
        self.size = min(self.size + images.shape[0], self.capacity)
        self.added += images.shape[0]

    # --- sampling -----------------------------------------------------------------------------------------
    def sample(self, n: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor | None]:
        """A uniform minibatch: `n` distinct images when the pool holds that many, else drawn with replacement.

        Args:
            n: minibatch size.
            device: where the minibatch goes.

        Returns:
            (images as float32, their soft labels or None).
        """
        if self.size == 0:
            raise RuntimeError("the image pool is empty: synthesize a batch before sampling")
        idx = torch.randperm(self.size)[:n] if n <= self.size else torch.randint(0, self.size, (n,))
        x = self.images[idx].to(device, torch.float32)
        y = None if self.labels is None else self.labels[idx].to(device)
        return x, y

    def newest(self, n: int) -> Tensor:
        """The `n` most recently added images (float32), oldest first."""
        n = min(n, self.size)
        idx = (self.next - n + torch.arange(n)) % self.capacity
        return self.images[idx].float()

    # --- checkpoint ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters plus the images (in memory mode) or the file path (on-disk mode); plain types and tensors."""
        state: dict[str, Any] = {"capacity": self.capacity, "size": self.size, "next": self.next,
                                 "added": self.added, "dtype": str(self.dtype).removeprefix("torch."),
                                 "shape": None if self.images is None else list(self.images.shape[1:]),
                                 "num_labels": None if self.labels is None else int(self.labels.shape[1])}
        if self.root is not None:
            if self._mm is not None:
                self._mm.flush()
            state["root"] = str(self.root)
        else:
            state["images"] = None if self.images is None else self.images[:self.size].clone()
        state["labels"] = None if self.labels is None else self.labels[:self.size].clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict()` returned (the same mode: memory or disk)."""
        self.capacity, self.dtype = int(state["capacity"]), getattr(torch, state["dtype"])
        self.size, self.next, self.added = int(state["size"]), int(state["next"]), int(state["added"])
        self.images = self.labels = None
        if state["shape"] is None:
            return
        if "root" in state:
            self.root = Path(state["root"])
        self._allocate(tuple(state["shape"]), state["num_labels"])
        if self.root is None:
            self.images[:self.size] = state["images"]
        if self.labels is not None:
            self.labels[:self.size] = state["labels"]


class PoolServed:
    """Mixin for synthesizers whose transfer data is served from an `ImagePool` they fill.

    `sample(n)` draws uniformly from `self.pool`; the pool and the count of batches made so far are the state.
    """

    pool: ImagePool
    device: Any
    batches: int

    def sample(self, n: int) -> Any:
        return self.pool.sample(n, self.device)[0]

    def state_dict(self) -> dict[str, Any]:
        return {"pool": self.pool.state_dict(), "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pool.load_state_dict(state["pool"])
        self.batches = int(state["batches"])
