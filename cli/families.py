"""`dfkd extend`: the lifelong-distillation command (registered on the group in cli/main.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from dfkd.cli.main import SEED, friendly
from dfkd.cli.options import pop_teacher_options, single_teacher, teacher_options
from dfkd.stopping import stop_exit_code


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
@single_teacher(required=True, help="The old model (classes 0..K-1): a dfkd model file, or a state_dict "
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
@click.option("--work", default=None, help="Folder for replay, checkpoints and report.json  [default: OUT without its "
              "suffix + .extend/: mnist09.extend/ for mnist09.pt]")
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
    from dfkd.lifelong import ExtendConfig, extend, wrote_out
    from dfkd.outpaths import check_output_file
    from dfkd.teacher_options import load_with_options
    from dfkd.utils import pick_device

    options = pop_teacher_options(kw)
    cfg = ExtendConfig(teacher=teacher, params=dict(map(parse_param, params)), **kw)
    if not (resume and wrote_out(cfg)):  # a resumed run may have written --out before it was stopped
        check_output_file(kw["out"], force=None)  # extend has no --force
    try:
        report = extend(cfg, load_with_options(teacher, options, pick_device(cfg.device)), resume)
    except KeyboardInterrupt as e:  # it said "interrupted" alone
        click.echo(f"interrupted{f' ({e})' if str(e) else ''}; {cfg.work_dir()} keeps the last checkpoint: continue "
                   "with the same command and --resume", err=True)
        sys.exit(stop_exit_code())
    click.echo(f"wrote {cfg.out}")
    print_extend_report(report)
    click.echo(f"report: {cfg.work_dir() / 'report.json'}")


@click.command("search")
@single_teacher(required=True, help="Teacher file (any format `dfkd distill` takes, with the same "
              "--teacher-arch, --arch-arg, --trust-pickle and input options).")
@click.option("--method", required=True, help="Distillation method that scores each candidate.")
@click.option("--eval-data", required=True, help="Held-out labelled images that rank the candidates.")
@click.option("--max-params", required=True, type=click.IntRange(min=1), help="Largest student allowed.")
@click.option("--max-latency-ms", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Slowest student allowed (CPU, batch 1).")
@click.option("--trials", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--trial-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Distillation budget of a trial  [default: 2, unless --trial-steps]")
@click.option("--trial-steps", type=click.IntRange(min=2), default=None, help="A trial's budget in student steps.")
@click.option("--final-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Budget of the chosen student's full distillation  [default: 10, unless --final-steps]")
@click.option("--final-steps", type=click.IntRange(min=1), default=None)
@click.option("--space", default="lenet5", show_default=True, help="lenet5 or module:function(trial).")
@click.option("--tolerance", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="Pick the smallest Pareto student within this many points of the best.")
@click.option("--data", default=None, help="Real training images (for --method kd).")
@click.option("--transfer-data", default=None, help="Synthetic transfer data (for --method transfer).")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="Method setting.")
@click.option("--out", required=True, help="Search folder (study.db, trials/, pareto.md, pareto.png, final/).")
@click.option("--resume", is_flag=True, help="Continue the search in --out.")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--device", default="cpu", show_default=True)
@teacher_options
@friendly
def search_cmd(params: tuple[str, ...], resume: bool, tolerance: float, **kw: Any) -> None:
    """Search the smallest student that keeps the teacher's accuracy (Optuna; pip install -e ".[search]").

    \b
    Example:
      dfkd search --teacher examples/mnist_lenet5.pt --method transfer --transfer-data t.npz \\
          --eval-data examples/mnist_test.npz --max-params 16000 --trials 12 --trial-steps 1500 --out runs/s
    """
    from dfkd.config import parse_param
    from dfkd.search import SearchConfig, search
    from dfkd.teacher_options import load_with_options

    if kw["trial_minutes"] is None and kw["trial_steps"] is None:
        kw["trial_minutes"] = 2.0
    if kw["final_minutes"] is None and kw["final_steps"] is None:
        kw["final_minutes"] = 10.0
    from dfkd.engine import Interrupted
    from dfkd.utils import pick_device

    options = pop_teacher_options(kw)
    cfg = SearchConfig(params=dict(map(parse_param, params)), tolerance=tolerance / 100, **kw,
                       **options.config_fields())
    try:
        result = search(cfg, load_with_options(cfg.teacher, options, pick_device(cfg.device)), resume)
    except (Interrupted, KeyboardInterrupt):  # a trial's own "continue with dfkd distill --resume TRIAL" misled
        click.echo(f"interrupted; continue the search with the same command and --resume ({cfg.out} keeps its "
                   "finished trials)", err=True)
        sys.exit(stop_exit_code())
    from dfkd.search_report import table

    click.echo(table(result["rows"], result["pareto"], result["chosen"]), nl=False)
    if result["final"]:
        click.echo(f"chosen: trial {result['chosen']['trial']}, fully distilled: top-1 "
                   f"{100 * result['final']['top1']:.2f}% ({Path(cfg.out) / 'final' / 'student.pt'})")
    click.echo(f"plot: {Path(cfg.out) / 'pareto.png'}")
