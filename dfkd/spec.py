"""The input spec of a classifier: channels, image size and normalisation.

Images are square unless the spec says otherwise: `size` is the height, `width` defaults to it. A non-square
teacher (`--input-size 28x56`, a file whose spec records `width`) gets non-square synthetic images, students and
resized evaluation data; square specs are written exactly as before (no `width` key), so older files and readers
are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dfkd.errors import DfkdError

#: The largest image side and channel count an input spec may declare: past them a single probe batch of the
#: teacher would not fit in memory (a file that declares 100,000 px asks for 120 GB), so the spec is refused.
MAX_SIZE = 4096
MAX_CHANNELS = 512


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: `channels` x `size` x `width` images normalised as (pixel/255 - mean) / std.

    Args:
        channels: image channels (1 or 3 for the zoo).
        size: height in pixels (and the width, unless `width` is given).
        mean: per-channel mean in [0, 1] pixel units (one value per channel).
        std: per-channel standard deviation, same units.
        width: width in pixels; None (the default) for a square image.
    """

    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    width: int | None = None

    def __post_init__(self) -> None:
        if self.width is None:
            object.__setattr__(self, "width", self.size)
        if self.channels < 1 or self.size < 1 or self.width < 1:
            raise DfkdError(f"input spec needs positive channels and size, got {self.channels} and {self.dims}")
        if self.channels > MAX_CHANNELS or max(self.hw) > MAX_SIZE:
            raise DfkdError(f"input spec of {self.channels} channels x {self.dims} px is past what dfkd takes (at most "
                            f"{MAX_CHANNELS} channels and {MAX_SIZE} px a side)")
        for name in ("mean", "std"):
            v = tuple(float(a) for a in getattr(self, name))
            if len(v) == 1 and self.channels > 1:
                v = v * self.channels
            if len(v) != self.channels:
                want = "1 value" if self.channels == 1 else f"1 or {self.channels} values (one per channel)"
                raise DfkdError(f"input spec: {name} needs {want} for {self.channels} channel(s), got {len(v)}")
            if not all(math.isfinite(a) for a in v):
                raise DfkdError(f"input spec: {name} must be finite numbers, got {v}")
            object.__setattr__(self, name, v)
        if any(s <= 0 for s in self.std):
            raise DfkdError(f"input spec: std values must be positive, got {self.std}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        """Inverse of `to_dict` (a dict without `width` is a square spec)."""
        width = d.get("width")
        return cls(int(d["channels"]), int(d["size"]), tuple(d["mean"]), tuple(d["std"]),
                   None if width is None else int(width))

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so the dict survives `torch.load(weights_only=True)` and JSON.

        `width` only when the images are not square: a square spec's dict is what dfkd always wrote.
        """
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.square:
            del d["width"]
        return d

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return (self.size, self.width)

    @property
    def square(self) -> bool:
        """Whether height and width are equal."""
        return self.size == self.width

    @property
    def side(self) -> int:
        """The shorter side in pixels (what decides a stem's downsampling and the input kind's size class)."""
        return min(self.size, self.width)

    @property
    def dims(self) -> str:
        """The image size in words: "32" for a square image, "28x56" (height x width) otherwise."""
        return str(self.size) if self.square else f"{self.size}x{self.width}"

    @property
    def pixels(self) -> int:
        """Values an image: channels x height x width."""
        return self.channels * self.size * self.width

    def describe(self) -> str:
        """C x H x W, as the run's messages print it ("1x32x32")."""
        return f"{self.channels}x{self.size}x{self.width}"

    def shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        """The NCHW shape of a batch."""
        return (batch, self.channels, self.size, self.width)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        s = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        return m, s

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] -> the model's input space."""
        m, s = self._stats(x01)
        return (x01 - m) / s

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The model's input space -> pixels (in [0, 1] for real images)."""
        m, s = self._stats(x)
        return x * s + m

    @property
    def black(self) -> tuple[float, ...]:
        """A 0 pixel in the model's input space, per channel: what padding adds around a real image."""
        return tuple(-m / sd for m, sd in zip(self.mean, self.std, strict=True))

    def clip(self, x: torch.Tensor) -> torch.Tensor:
        """Clamp normalised images to the valid pixel range [0, 1], per channel."""
        m, s = self._stats(x)
        return torch.max(torch.min(x, (1 - m) / s), -m / s)


def parse_size(text: str | int | list[int] | tuple[int, ...]) -> int | tuple[int, int]:
    """`--input-size` in any form: 32, "32", "28x56" (height x width), [28, 56]; a square pair gives one int.

    Raises:
        DfkdError: anything else.
    """
    if isinstance(text, bool):
        raise DfkdError(f"input size {text!r}: give pixels, S or HxW (height x width), e.g. 32 or 28x56")
    if isinstance(text, int):
        return text
    parts = list(text) if isinstance(text, (list, tuple)) else str(text).strip().lower().replace("*", "x").split("x")
    try:
        nums = [int(str(a).strip()) for a in parts]
    except ValueError:
        nums = []
    if len(nums) not in (1, 2):
        raise DfkdError(f"input size {text!r}: give pixels, S or HxW (height x width), e.g. 32 or 28x56")
    return nums[0] if len(nums) == 1 or nums[0] == nums[1] else (nums[0], nums[1])


def split_size(size: int | tuple[int, int] | list[int]) -> tuple[int, int | None]:
    """The (size, width) arguments of `InputSpec` for a parsed input size (width None when square)."""
    size = parse_size(size)
    return (size, None) if isinstance(size, int) else (size[0], size[1])


MNIST_SPEC = InputSpec(1, 32, (0.1307,), (0.3081,))
CIFAR10_SPEC = InputSpec(3, 32, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
