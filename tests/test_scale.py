"""Evaluation at any input size: forwards of at most the batch size asked for, a default that shrinks with size."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dfkd.data import ImageData
from dfkd.evaluate import accuracy, default_batch
from dfkd.spec import CIFAR10_SPEC, MNIST_SPEC, InputSpec


def test_default_batch_shrinks_with_the_input() -> None:
    big = InputSpec(3, 224, (0.5,) * 3, (0.5,) * 3)
    assert default_batch(MNIST_SPEC) == default_batch(CIFAR10_SPEC) == 1000
    assert 10 <= default_batch(big) <= 25


def test_accuracy_forwards_at_most_batch_size_images() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 10))
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda m, inp: sizes.append(inp[0].shape[0]))
    rng = np.random.default_rng(0)
    data = ImageData(torch.from_numpy(rng.integers(0, 256, (50, 1, 32, 32), dtype=np.uint8)),
                     torch.from_numpy(rng.integers(0, 10, 50)))
    whole = accuracy(model, data, MNIST_SPEC, "cpu")
    sizes.clear()
    chunked = accuracy(model, data, MNIST_SPEC, "cpu", batch_size=16)
    assert sizes == [16, 16, 16, 2] and chunked == whole
