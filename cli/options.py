"""The click options every command that takes a model shares (DESIGN §10): one decorator, one parser."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

_OPTIONS = (
    click.option("--teacher-arch", default=None, metavar="NAME",
                 help="Architecture of a plain state_dict: zoo NAME (`dfkd models`), torchvision:NAME, timm:NAME "
                      "(pip install -e \".[timm]\") or module:callable (your class or factory function)."),
    click.option("--arch-arg", "arch_args", multiple=True, metavar="KEY=VALUE",
                 help="Constructor argument of --teacher-arch (repeat; JSON values). num_classes defaults to the "
                      "state_dict's classifier size."),
    click.option("--trust-pickle", is_flag=True, help="Allow a pickled module (unpickling runs code from the file)."),
    click.option("--channels", type=click.IntRange(min=1), default=None,
                 help="Input channels, for a file without an input spec (with --input-size --mean --std)."),
    click.option("--input-size", type=click.IntRange(min=8), default=None, help="Input side in pixels."),
    click.option("--mean", type=float, multiple=True,
                 help="Normalisation mean per channel (repeat the flag; one value for all channels)."),
    click.option("--std", type=float, multiple=True, help="Normalisation std per channel (repeat the flag)."),
)

#: The keyword arguments the decorator adds to a command.
OPTION_KEYS = ("teacher_arch", "arch_args", "trust_pickle", "channels", "input_size", "mean", "std")


def teacher_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the shared teacher options to a click command (pop them with `pop_teacher_options`)."""
    for option in reversed(_OPTIONS):
        fn = option(fn)
    return fn


def pop_teacher_options(kw: dict[str, Any]) -> Any:
    """Remove the shared options from a command's keyword arguments and return them as `TeacherOptions`."""
    from dfkd.archs import parse_arch_args
    from dfkd.teacher_options import TeacherOptions

    v = {k: kw.pop(k) for k in OPTION_KEYS}
    return TeacherOptions(v["teacher_arch"], parse_arch_args(v["arch_args"]), v["trust_pickle"], v["channels"],
                          v["input_size"], tuple(v["mean"]), tuple(v["std"]))
