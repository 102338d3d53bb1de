"""A model exported at a fixed batch of 1, run on whole batches: one image at a time, vectorised where it can be.

`torch.onnx.export` and `torch.export.export` without dynamic shapes fix the batch dimension to 1. Where only
Reshape targets hold that 1, `dfkd.onnxgraph` frees it; a ViT's class token concatenated at batch 1, a ConvNeXt's
layer norms or a torch.export archive's shape guards hold it too, and such a file runs only on one image. The
owner may not be able to re-export it (they hold the file, not the code), so dfkd runs it on each image of a batch:
with `torch.func.vmap`, which runs the batch through the model's operators at once, where they allow it and give
the loop's logits, else with a Python loop. Gradients reach the input either way (the generators and inversion
need them). Forward and backward at batch 64 on a 2-core CPU, timm's ViT and DeiT and torchvision's ConvNeXt-T
(32 px) exported at batch 1: vmap 28, 51 and 286 ms, the same files exported with a dynamic batch 27, 51 and
274 ms, the loop 185, 336 and 2870 ms.

Module hooks see one image at a time here (under vmap, tensors that may not leave the mapped function), so such a
teacher has none: BatchNorm-statistics methods match the input statistics instead, as for a graph whose
BatchNorm was folded away.
"""

from __future__ import annotations

import torch
from torch import nn


class PerImage(nn.Module):
    """Runs `inner`, which takes a batch of exactly one image, on a batch of any size.

    Args:
        inner: the fixed-batch model, (1, C, H, W) -> (1, K).
        probe: a few images; vmap is used when it gives the loop's logits on them.

    Shape:
        - Input: (B, C, H, W).
        - Output: (B, K).
    """

    def __init__(self, inner: nn.Module, probe: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        #: The dtype the graph was exported in. Its images are handed over in it: under vmap, a bf16 batch reached
        #: the first convolution uncast by autocast ("Input type (CPUBFloat16Type) and weight type (FloatTensor)
        #: should be the same"), while an fp32 one is autocast as without vmap.
        self.in_dtype = next((t.dtype for t in (*inner.parameters(), *inner.buffers()) if t.is_floating_point()), None)
        self.vectorised = False
        with torch.no_grad():
            looped = self(probe)
            try:
                mapped = torch.func.vmap(self._one)(probe)
            except Exception:  # noqa: BLE001 - an operator vmap has no rule for, a data-dependent shape, ...
                return
        self.vectorised = mapped.shape == looped.shape and torch.allclose(mapped, looped, rtol=1e-4, atol=1e-5)

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.unsqueeze(0)).squeeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_dtype is not None and x.is_floating_point():
            x = x.to(self.in_dtype)
        if self.vectorised:
            return torch.func.vmap(self._one)(x)
        return torch.cat([self.inner(x[i:i + 1]) for i in range(len(x))])

    def extra_repr(self) -> str:
        return f"vectorised={self.vectorised}"
