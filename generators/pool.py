"""A bounded pool of synthesized images (and optional soft labels) that the student samples minibatches from.

Inversion methods (DeepInversion, ADI, ZeroQ-style synthesis) optimise one batch at a time and keep every batch;
the student learns from uniform minibatches of everything kept so far. The reference code writes PNGs to disk and
rebuilds a DataLoader each round; here the pool is a `RecordStore`: it grows as it fills, stays in memory up to a
RAM budget (1 GiB by default) and is read from disk beyond it, and in a run it is appended to files in the run
folder, so a checkpoint records only how many images were made. Images and labels are stored in float16 by default
(finer than the reference's 8-bit PNGs, half the memory of float32).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from dfkd.generators.store import DEFAULT_RAM_BUDGET_MIB, RecordStore, to_device

DTYPES = (torch.float16, torch.float32)


class ImagePool:
    """Keeps up to `capacity` images; once full, each new image replaces the oldest (first in, first out).

    Args:
        capacity: the most images kept (nothing is allocated for them up front).
        dtype: storage dtype of images and labels (float16 or float32); samples come back as float32.
        root: a folder for the pool's files (a run attaches its run folder: `attach`); None keeps the pool in
            memory until it passes `ram_budget_mib`, then in a private temporary folder.
        ram_budget_mib: the pool is served from memory while it takes at most this many MiB, else from disk.

    Shape:
        - add: images (B, C, H, W), labels (B, K) or None
        - sample: (n, C, H, W) and (n, K) or None
    """

    def __init__(self, capacity: int, dtype: torch.dtype = torch.float16, root: str | os.PathLike | None = None,
                 ram_budget_mib: float = DEFAULT_RAM_BUDGET_MIB) -> None:
        if capacity < 1:
            raise ValueError(f"pool capacity must be >= 1, got {capacity}")
        if dtype not in DTYPES:
            raise ValueError(f"pool dtype must be float16 or float32, got {dtype}")
        self.dtype = dtype
        self.store = RecordStore(capacity, "pool", ram_budget_mib, root)

    def __len__(self) -> int:
        return len(self.store)

    @property
    def capacity(self) -> int:
        return self.store.capacity

    @property
    def added(self) -> int:
        """Images ever added."""
        return self.store.added

    @property
    def size(self) -> int:
        return len(self.store)

    @property
    def next(self) -> int:
        """The ring slot the next image goes to (for inspection: storage is append-only)."""
        return self.store.added % self.store.capacity

    @property
    def has_labels(self) -> bool:
        return self.store.fields is not None and len(self.store.fields) == 2

    def attach(self, folder: str | os.PathLike) -> None:
        """Keep the pool's files in `folder` (the run folder) from now on."""
        self.store.attach(folder)

    def add(self, images: Tensor, labels: Tensor | None = None) -> None:
        """Store a batch (detached, on CPU); the oldest images make room once the pool is full.

        Args:
            images: the batch, in the teacher's normalised input space.
            labels: optional soft labels (e.g. the teacher's logits) for the same images.
        """
        if images.dim() != 4:
            raise ValueError(f"pool.add expects a (B, C, H, W) batch, got shape {tuple(images.shape)}")
        fields = self.store.fields
        if fields is not None and tuple(images.shape[1:]) != fields[0][0]:
            raise ValueError(f"pool holds {fields[0][0]} images, got {tuple(images.shape[1:])}")
        if fields is not None and (labels is None) == self.has_labels:
            raise ValueError("pool.add: give labels with every batch or with none")
        if labels is not None and labels.shape[0] != images.shape[0]:
            raise ValueError(f"pool.add: {images.shape[0]} images but {labels.shape[0]} labels")
        tensors = (images,) if labels is None else (images, labels)
        self.store.append(*(t.detach().to("cpu", self.dtype) for t in tensors))

    def sample(self, n: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor | None]:
        """A uniform minibatch: `n` distinct images when the pool holds that many, else drawn with replacement.

        Args:
            n: minibatch size.
            device: where the minibatch goes.

        Returns:
            (images as float32, their soft labels as float32 or None).
        """
        if len(self) == 0:
            raise RuntimeError("the image pool is empty: synthesize a batch before sampling")
        idx = torch.randperm(len(self))[:n] if n <= len(self) else torch.randint(0, len(self), (n,))
        rows = self.store.gather(idx)
        y = to_device(rows[1], device) if len(rows) > 1 else None
        return to_device(rows[0], device), y

    def newest(self, n: int) -> Tensor:
        """The `n` most recently added images (float32), oldest first."""
        n = min(n, len(self))
        return self.store.gather(torch.arange(len(self) - n, len(self)))[0].float()

    def close(self) -> None:
        self.store.close()

    def state_dict(self) -> dict[str, Any]:
        """Counters (and, with no folder to keep them in, the images): plain types and tensors."""
        return {"dtype": str(self.dtype).removeprefix("torch."), "store": self.store.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict()` returned (a pool with files reads them from its folder)."""
        self.dtype = getattr(torch, state["dtype"])
        self.store.load_state_dict(state["store"] if "store" in state else legacy_pool_state(state))


def legacy_pool_state(state: dict[str, Any]) -> dict[str, Any]:
    """A store state from an in-memory pool checkpoint of dfkd before the record store (images in the state)."""
    size, cap, nxt = int(state["size"]), int(state["capacity"]), int(state["next"])
    order = torch.arange(size) if size < cap else (nxt + torch.arange(cap)) % cap  # oldest first
    if state.get("images") is None:
        raise ValueError("this checkpoint's pool was in a memory-mapped file of an older dfkd; it cannot be resumed")
    records = [state["images"][order]] + ([] if state["labels"] is None else [state["labels"][order]])
    fields = None if state["shape"] is None else [[list(r.shape[1:]), str(r.dtype).removeprefix("torch.")]
                                                  for r in records]
    return {"capacity": cap, "added": int(state["added"]), "fields": fields, "records": records}


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
