"""Which of a method's paper settings a teacher gets: chosen from its input size and channels.

Papers give settings per dataset: MNIST (1 x 32 x 32 LeNets), CIFAR (3 x 32 x 32 ResNets/WRNs) and, for some,
ImageNet (224 px). A method's `default_params(teacher)` picks the set whose inputs look like the teacher's:
`input_kind(spec)` is "mnist" for at most 1 x 32 x 32 values, "imagenet" from 64 px a side, "cifar" otherwise.
Where a paper has no ImageNet-size setting, its CIFAR setting applies with batches of at most `LARGE_BATCH`.
LeNet-scale teachers (`dfkd.teacher.is_small_teacher`) then get each method's measured CPU recipe on top.
"""

from __future__ import annotations

from typing import Any

from dfkd.spec import InputSpec

#: Batch size at ImageNet-size inputs where a paper gives none: DeepInversion's ImageNet default
#: (NVlabs `imagenet_inversion.py --bs 64`) and DFAD's 224 px Caltech-101 setting (`--batch_size 64`).
LARGE_BATCH = 64


def input_kind(spec: InputSpec | None) -> str | None:
    """The kind of a teacher's inputs: "mnist", "cifar" or "imagenet" (None without a teacher)."""
    if spec is None:
        return None
    if spec.size >= 64:
        return "imagenet"
    return "mnist" if spec.channels * spec.size * spec.size <= 32 * 32 else "cifar"


def teacher_kind(teacher: Any) -> str | None:
    """`input_kind` of a teacher's spec (None for no teacher)."""
    return None if teacher is None else input_kind(teacher.spec)


def cap_batches(p: dict[str, Any], keys: tuple[str, ...] = ("batch_size", "synth_batch_size")) -> None:
    """Cap every batch-size setting in `p` at LARGE_BATCH (in place)."""
    for k in keys:
        if p.get(k):
            p[k] = min(int(p[k]), LARGE_BATCH)
