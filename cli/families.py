"""`dfkd extend`: the lifelong-distillation command (registered on the group in cli/main.py)."""

from __future__ import annotations

from typing import Any

import click

from dfkd.cli.main import SEED, friendly
from dfkd.cli.options import pop_teacher_options, teacher_options


def _pct(res: dict[str, float], key: str) -> str:
    return f"{100 * res[key]:6.2f}" if key in res else "     -"


def print_extend_report(report: dict[str, Any]) -> None:
    """The old/new/all-class table of an extend run."""
    click.echo(f"classes: {report['old_classes']} old + {report['all_classes'] - report['old_classes']} new; replay "
               f"{report['replay_images']} images covering {report['replay_classes']} old classes")
    rows = [(k, label) for k, label in (("teacher", "old model"), ("extend", "extend (data-free replay)"),
                                        ("finetune", "fine-tune on new data only"),
                                        ("joint", "joint training on old+new real data")) if k in report]
    if not any(k != "extend" for k, _ in rows) and "extend" not in report:
        return
    click.echo(f"{'top-1 %':<38} {'old':>6} {'new':>6} {'all':>6}")
    for key, label in rows:
        r = report[key]
        click.echo(f"{label:<38} {_pct(r, 'old')} {_pct(r, 'new')} {_pct(r, 'all')}")


@click.command("extend")
@click.option("--teacher", required=True, help="The old model (classes 0..K-1): a dfkd model file, or a state_dict "
              "with --teacher-arch.")
@teacher_options
@click.option("--data", required=True, help="Labelled images of the new classes (.npz or ImageFolder); labels "
              "0..M-1 become K..K+M-1, labels already >= K are kept.")
@click.option("--out", required=True, help="The extended model file to write (K+M classes).")
@click.option("--eval-data", default=None, help="Test images of old and new classes: report old/new/all-class top-1 "
              "and train the fine-tuning reference.")
@click.option("--old-data", default=None, help="Real old-class images for the joint-training reference only.")
@click.option("--method", default="deepinversion", show_default=True, help="Synthesis method of the replay images.")
@click.option("--replay", default=2048, show_default=True, type=click.IntRange(min=1), help="Replay images.")
@click.option("--replay-steps", default=None, type=click.IntRange(min=0), help="Student steps the synthesis method "
              "trains before collecting images (default: as `dfkd synthesize`).")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="Synthesis method setting.")
@click.option("--steps", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--hkd-weight", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="Weight of the importance-weighted feature distillation.")
@click.option("--work", default=None, help="Folder for replay, checkpoints and report.json  [default: OUT.extend/]")
@click.option("--resume", is_flag=True, help="Continue the run in --work from its checkpoints.")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--device", default="auto", show_default=True)
@friendly
def extend_cmd(teacher: str, params: tuple[str, ...], resume: bool, **kw: Any) -> None:
    """Teach a model new classes without its old data (data-free replay, Always Be Dreaming losses).

    \b
    Example:
      dfkd extend --teacher mnist04.pt --data mnist_train_5to9.npz --out mnist09.pt \\
          --eval-data mnist_test.npz --old-data mnist_train_0to4.npz
    """
    from dfkd.config import parse_param
    from dfkd.lifelong import ExtendConfig, extend
    from dfkd.outpaths import check_output_file
    from dfkd.teacher_options import load_with_options
    from dfkd.utils import pick_device

    options = pop_teacher_options(kw)
    check_output_file(kw["out"])
    cfg = ExtendConfig(teacher=teacher, params=dict(map(parse_param, params)), **kw)
    report = extend(cfg, load_with_options(teacher, options, pick_device(cfg.device)), resume)
    click.echo(f"wrote {cfg.out}")
    print_extend_report(report)
    click.echo(f"report: {cfg.work_dir() / 'report.json'}")
