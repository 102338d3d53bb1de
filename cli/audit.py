"""`dfkd audit`: the data owner's check of a transfer file before it leaves (dfkd.audit)."""

from __future__ import annotations

import sys
from typing import Any

import click

from dfkd.cli.main import friendly
from dfkd.cli.options import pop_teacher_options, single_teacher, teacher_options


@click.command("audit")
@click.argument("transfer")
@click.option("--against", required=True, help="The owner's training images (.npz or ImageFolder).")
@single_teacher(help="The teacher: also compare in its feature space.")
@teacher_options
@click.option("--test", default=None, help="The owner's held-out images, for the real-vs-real baseline (default: "
              "1000 images held out of --against) and the membership attack.")
@click.option("--student", default=None, help="A student distilled from the file: loss-threshold membership-"
              "inference AUC on --against vs --test.")
@click.option("--png", default=None, help="Where to draw the closest pairs.  [default: TRANSFER_audit.png]")
@friendly
def audit_cmd(transfer: str, against: str, teacher: str | None, test: str | None, student: str | None,
              png: str | None, **kw: Any) -> None:
    """Nearest training images of every synthetic image, against a real-vs-real baseline; exit 1 on FAIL.

    \b
    Example:
      dfkd audit transfer.npz --against ../shared/data/mnist_train.npz --teacher examples/mnist_lenet5_bn.pt
    """
    from dfkd.audit import audit
    from dfkd.teacher_options import load_with_options

    t = load_with_options(teacher, pop_teacher_options(kw), "cpu") if teacher else None
    s = load_with_options(student, None, "cpu", flag="--student") if student else None
    result = audit(transfer, against, t, test, s, png)
    click.echo(result.text())
    if result.verdict == "FAIL":
        sys.exit(1)
