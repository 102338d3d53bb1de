"""The click options every command that takes a model shares (DESIGN §10): one decorator, one parser."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


class SizeType(click.ParamType):
    """An image size: S (a square side) or HxW (height x width), each at least `lo` pixels."""

    name = "size"

    def __init__(self, lo: int = 8) -> None:
        self.lo = lo

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from dfkd.errors import DfkdError
        from dfkd.spec import parse_size

        try:
            size = parse_size(value)
        except DfkdError:
            self.fail(f"{value!r}: give S or HxW (height x width) in pixels, e.g. 32 or 28x56", param, ctx)
        if min([size] if isinstance(size, int) else size) < self.lo:
            self.fail(f"{value!r}: each side must be at least {self.lo} px", param, ctx)
        return size


def single_teacher(**kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`--teacher` of a command that takes one teacher: given twice it is refused, not read as its last value.

    `dfkd distill` reads a repeated --teacher as an ensemble; elsewhere click kept the last one, so `dfkd synthesize
    --teacher A --teacher B` wrote B's images alone, unsaid.
    """
    def once(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> str | None:
        if len(value) > 1:
            raise click.BadParameter(f"given {len(value)} times ({', '.join(value)}): `dfkd {ctx.info_name}` takes "
                                     "one teacher (`dfkd distill` takes several, as an ensemble)", ctx, param)
        return value[0] if value else None

    return click.option("--teacher", multiple=True, callback=once, **kwargs)


#: `--input-size` of the teacher options.
SIZE = SizeType(8)

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
    click.option("--input-size", type=SIZE, default=None, metavar="S|HxW",
                 help="Input side in pixels, or height x width (28x56) for non-square inputs."),
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
