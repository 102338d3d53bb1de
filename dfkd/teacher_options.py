"""The teacher options every command shares, and the one function that turns them into a loaded model.

`--teacher-arch`, `--arch-arg KEY=VALUE`, `--trust-pickle`, `--channels/--input-size/--mean/--std` mean the same on
`distill`, `evaluate`, `synthesize`, `fid-stats`, `methods --params` and `convert` (DESIGN §10); the click
decorator that declares them is `dfkd.cli.options.teacher_options`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from dfkd.archs import flag_spec
from dfkd.errors import DfkdError
from dfkd.spec import InputSpec
from dfkd.teacher import Teacher, load_teacher, warn_unused_arch


@dataclass(frozen=True)
class TeacherOptions:
    """How to read a model file that does not describe itself (see `dfkd.loading.load_user_model`).

    Args:
        arch: architecture of a plain state_dict: zoo name, `torchvision:NAME`, `timm:NAME` or `module:callable`.
        arch_args: its constructor arguments (`--arch-arg KEY=VALUE`).
        trust_pickle: allow a pickled module (unpickling runs code from the file).
        channels: input channels (`--channels`), with `size`, `mean` and `std` the input spec.
        size: input side in pixels, or (height, width) (`--input-size S` or `HxW`).
        mean: normalisation mean per channel.
        std: normalisation standard deviation per channel.
    """

    arch: str | None = None
    arch_args: dict[str, Any] = field(default_factory=dict)
    trust_pickle: bool = False
    channels: int | None = None
    size: int | tuple[int, int] | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def config_fields(self) -> dict[str, Any]:
        """The options as `DistillConfig` (and `SearchConfig`) fields."""
        return {"teacher_arch": self.arch, "arch_args": dict(self.arch_args), "trust_pickle": self.trust_pickle,
                "channels": self.channels, "input_size": self.size, "mean": tuple(self.mean) or None,
                "std": tuple(self.std) or None}

    def spec(self) -> InputSpec | None:
        """The input spec the flags give (completed from timm's config), None without spec flags."""
        return flag_spec(self.channels, self.size, self.mean, self.std, self.arch, self.arch_args)


def load_with_options(path: str | os.PathLike, options: TeacherOptions | None = None,
                      device: str | torch.device = "cpu", flag: str = "--teacher", warn_unused: bool = True) -> Teacher:
    """Load any model file (DESIGN §4) as a frozen `Teacher`, reading it as `options` say.

    Args:
        path: the file.
        options: the shared teacher options (None: the file must describe itself).
        device: where the model runs.
        flag: the option that named the file ("--teacher", "--model"), for messages.
        warn_unused: warn when the architecture options do not apply to this file (a command that reads two files
            with one set of options warns once, of both: `warn_unused_arch`).

    Raises:
        DfkdError: one readable line naming `flag` and the file.
    """
    o = options or TeacherOptions()
    if flag == "--teacher":
        teacher = load_teacher(path, o.arch, o.trust_pickle, o.spec(), device, o.arch_args)
        if warn_unused:
            warn_unused_arch(o.arch, o.arch_args, [teacher])
        return teacher
    try:  # the loader's errors, warnings and notes name the usual flag: they name `flag` instead
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            teacher = load_teacher(path, o.arch, o.trust_pickle, o.spec(), device, o.arch_args)
    except DfkdError as e:
        raise DfkdError(_renamed(str(e), flag)) from None
    finally:
        for w in caught:  # shown as the caller's filters say
            warnings.warn_explicit(_renamed(str(w.message), flag), w.category, w.filename, w.lineno)
    teacher.notes = [_renamed(n, flag) for n in teacher.notes]
    if warn_unused:
        warn_unused_arch(o.arch, o.arch_args, [teacher])
    return teacher


def _renamed(message: str, flag: str) -> str:
    return flag + message.removeprefix("--teacher") if message.startswith("--teacher ") else message
