"""`dfkd` command line: a thin click shell; each command parses flags and calls one library function."""

from __future__ import annotations

import json
import shlex
import sys
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from dfkd.cli.options import SizeType, pop_teacher_options, single_teacher, teacher_options
from dfkd.errors import DfkdError
from dfkd.stopping import stop_exit_code


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user errors into one line on stderr and exit code 2; a stop signal into 128 + its number (Ctrl-C: 130)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from dfkd.distributed import quiet_rank
        from dfkd.stopping import Terminated, terminate_as_interrupt

        try:
            with terminate_as_interrupt():  # a `kill` of synthesize left its partial hidden file behind, unsaid
                return fn(*args, **kwargs)
        except Terminated as e:
            import signal

            if not quiet_rank():  # under torchrun process 0 speaks for all
                click.echo(f"interrupted by {signal.Signals(e.signum).name} (as by Ctrl-C)", err=True)
            sys.exit(128 + e.signum)
        except DfkdError as e:
            from dfkd.distributed import OtherRankFailed

            if not isinstance(e, OtherRankFailed):  # rank 0 prints that one
                click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except OSError as e:
            from dfkd.io import disk_error

            err = disk_error(e)
            if err is None:
                raise
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except RuntimeError as e:  # torch.OutOfMemoryError is one; a CPU allocation that failed another
            from dfkd.memory import out_of_memory

            if (oom := out_of_memory(e)) is None:
                raise
            click.echo(f"error: {oom}: ask for fewer or smaller images at once (a smaller -p batch_size, --num, "
                       "--num-calibration or image size, as the command takes), or free the memory other processes "
                       "hold", err=True)
            sys.exit(2)
        except KeyboardInterrupt as e:  # a run's second stop signal says what it lost and how to go on
            if not quiet_rank():
                click.echo(f"interrupted: {e}" if str(e) else "interrupted", err=True)
            sys.exit(stop_exit_code())

    return wrapper


def format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                   line: str | None = None) -> str:
    """Print dfkd's own warnings as one line for a person ("warning: ..."); other libraries' in Python's usual form."""
    ours = [Path(m.__file__).parent for name in ("dfkd", "dfkd.generators", "dfkd.cli")
            if (m := sys.modules.get(name)) is not None and m.__file__]
    if any(Path(filename).is_relative_to(root) for root in ours):
        from dfkd.distributed import quiet_rank

        # under torchrun every process would print the same line: process 0 alone speaks, as it alone writes the log
        return "" if quiet_rank() else f"warning: {message}\n"
    return _python_format(message, category, filename, lineno, line)


_python_format = warnings.formatwarning

#: Seeds torch and NumPy both take.
SEED = click.IntRange(0, 2**63 - 1)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="dfkd")
@click.pass_context
def main(ctx: click.Context) -> None:
    """dfkd: distill a trained classifier (the teacher) into a smaller student without its training data.

    \b
    Example:
      dfkd distill --teacher examples/mnist_lenet5_bn.pt --method deepinversion \\
          --eval-data examples/mnist_test.npz
    """
    warnings.formatwarning = format_warning
    one_process_only(ctx.invoked_subcommand)


def one_process_only(command: str | None) -> None:
    """Under torchrun, refuse every command but distill, on every process, said once (exit 2).

    The others join no process group: each process ran the whole command towards the same output, one of them took
    its lock, the other failed for a false reason ("process N is making this file": its twin), and torchrun then
    stopped the first, leaving its half-made output.
    """
    from dfkd.distributed import env_world, quiet_rank

    if command in (None, "distill") or env_world() <= 1:
        return
    if not quiet_rank():
        click.echo(f"error: dfkd {command} runs as one process; under torchrun (WORLD_SIZE={env_world()}) only "
                   f"dfkd distill runs across processes: run dfkd {command} without torchrun", err=True)
    sys.exit(2)


@main.command("train-teacher")
@click.option("--data", required=True, help="Training data: .npz (x uint8, y int) or an ImageFolder directory.")
@click.option("--arch", required=True, help="Zoo architecture (see `dfkd models`).")
@click.option("--out", required=True, help="Where to write the dfkd model file.")
@click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")
@click.option("--eval-data", default=None, help="Test data, evaluated after every epoch.")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=0.05, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Peak learning rate of the one-cycle SGD schedule.")
@click.option("--input-size", default=32, show_default=True, type=SizeType(16), metavar="S|HxW",
              help="Model input side, or height x width (28x56); data of another size is resized (MNIST 28 -> 32).")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              help="Arithmetic of the layers (weights and loss stay fp32).  [default: auto: fp32; bf16 on a CPU with "
              "a native bf16 unit (AMX, AVX-512 BF16) for a model of more than 5M multiply-adds an input]")
@friendly
def train_teacher_cmd(**kw: Any) -> None:
    """Train a teacher on real data and write a dfkd model file.

    \b
    Example:
      dfkd train-teacher --data ../shared/data/mnist_train.npz --arch lenet5_bn \\
          --eval-data ../shared/data/mnist_test.npz --epochs 10 --out examples/mnist_lenet5_bn.pt
    """
    from dfkd.export import check_model_name
    from dfkd.models import MODELS
    from dfkd.outpaths import check_output_file
    from dfkd.train_teacher import TeacherConfig, train_teacher

    MODELS.get(kw["arch"])
    check_output_file(kw["out"], force=kw["force"])
    check_model_name(kw["out"])
    result = train_teacher(TeacherConfig(**kw))
    click.echo(f"wrote {kw['out']}" + (f" (test top-1 {100 * result['top1']:.2f}%)" if "top1" in result else ""))


@main.command("evaluate")
@click.option("--model", "model_path", required=True, help="The model to evaluate: any file --teacher takes (a dfkd "
              "model file needs nothing else).")
@click.option("--data", required=True, help="Test data: .npz or ImageFolder directory.")
@single_teacher(help="A teacher file; also report top-1 agreement with it.")
@teacher_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (top-1 under 'top1', a fraction).")
@click.option("--device", default="auto", show_default=True)
@friendly
def evaluate_cmd(model_path: str, data: str, teacher: str | None, as_json: bool, device: str, **kw: Any) -> None:
    """Top-1/top-5 accuracy of a model on real data (and agreement with a teacher).

    The teacher options (--teacher-arch, --arch-arg, --channels/--input-size/--mean/--std, --trust-pickle) apply to
    --model and --teacher alike: to whichever is a plain state_dict, TorchScript or export archive.

    \b
    Example:
      dfkd evaluate --model examples/mnist_lenet5_bn.pt --data examples/mnist_test.npz
      dfkd evaluate --model private.pt --teacher-arch torchvision:resnet18 --channels 3 --input-size 32 \\
          --mean 0.4914 --mean 0.4822 --mean 0.4465 --std 0.247 --std 0.243 --std 0.261 --data cifar10_test.npz
    """
    from dfkd.data import load_for
    from dfkd.evaluate import accuracy, data_doubt, size_note
    from dfkd.teacher import warn_unused_arch
    from dfkd.teacher_options import load_with_options
    from dfkd.utils import pick_device

    dev = pick_device(device)
    options = pop_teacher_options(kw)
    model = load_with_options(model_path, options, dev, flag="--model", warn_unused=False)
    t = load_with_options(teacher, options, dev, warn_unused=False) if teacher else None
    warn_unused_arch(options.arch, options.arch_args, [model, *([t] if t else [])])  # once: the options serve both
    if t is not None and t.num_classes != model.num_classes:  # agreement of a 10- and a 5-class model means nothing
        raise DfkdError(f"--teacher {teacher}: has {t.num_classes} classes, --model {model_path} has "
                        f"{model.num_classes}; agreement needs the same classes: give the teacher the model was "
                        "distilled from")
    if t is not None and model.class_names and t.class_names and model.class_names != t.class_names:
        raise DfkdError(f"--teacher {teacher}: names its classes {t.class_names[:5]}..., --model {model_path} "
                        f"{model.class_names[:5]}...; class i of one is not class i of the other: give the teacher "
                        "the model was distilled from")
    # a model without names (a student of a file that did not carry them) is scored as its teacher names the classes
    names = model.class_names or (t.class_names if t is not None else None)
    images = load_for(data, "--data", model.num_classes, model.spec, names)
    res = accuracy(model, images, model.spec, dev, t, t.spec if t else None)
    ref, ref_top1 = (t, res["teacher_top1"]) if t is not None else (model, res["top1"])  # who should know the data
    doubt = data_doubt(ref_top1, ref.num_classes, "--data", data, size_note(images, ref.spec),
                       ref.recorded_top1, "the teacher" if t is not None else "the model")
    if doubt:
        click.echo(f"warning: {doubt}", err=True)
    if as_json:
        click.echo(json.dumps(res))
        return
    resized = size_note(images, model.spec)
    click.echo(f"{model_path} on {data} ({res['n']} images{', ' + resized if resized else ''}): top-1 "
               f"{100 * res['top1']:.2f}%  top-5 {100 * res['top5']:.2f}%")
    if t is not None:
        click.echo(f"agreement with teacher: {100 * res['agreement']:.2f}%  (teacher top-1 "
                   f"{100 * res['teacher_top1']:.2f}%)")


def _method_names() -> list[str]:
    from dfkd.methods import list_methods

    return list_methods()


@main.command("distill")
@click.option("--teacher", "teachers", multiple=True, help="Teacher file (dfkd model file, state_dict with "
              "--teacher-arch, TorchScript, torch.export; pickled module with --trust-pickle). Repeat for several "
              "teachers: their logits are averaged (-p teacher_weights=[...], -p teacher_weighting=confidence).")
@teacher_options
@click.option("--method", default=None, help="Distillation method (see `dfkd methods`); auto picks one from the "
              "teacher's measured properties (`dfkd methods --params auto`).  [default: auto]")
@click.option("--student", default=None, help="Student architecture: zoo NAME, torchvision:NAME or timm:NAME "
              "(default: the usual pair for the teacher, see dfkd.students).")
@click.option("--student-arg", "student_args", multiple=True, metavar="KEY=VALUE",
              help="Constructor argument of --student (repeat; JSON values).")
@click.option("--student-init", type=click.Choice(["auto", "teacher", "random"]), default=None,
              help="The student's first weights: sliced from the teacher's where the student is the teacher's "
              "architecture made narrower or shallower (auto: there, else random; teacher: insist), or random as in "
              "the papers.  [default: auto]")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Budget in student steps (with --budget-minutes too: whichever is reached first).")
@click.option("--budget-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help=f"Budget in wall-clock minutes (default {10:g} when --steps is not given; with --steps too: "
              "whichever is reached first).")
@click.option("--budget-clock", type=click.Choice(["wall", "cpu"]), default=None,
              help="What --budget-minutes counts: wall-clock time, or the CPU time of this process (all its "
              "threads), which a shared machine does not shrink.  [default: wall]")
@click.option("--eval-data", default=None, help="Real test data, for reporting only (never used to train).")
@click.option("--eval-every", type=click.IntRange(min=1), default=None,
              help="Evaluate every N steps (evaluation time is outside --budget-minutes).")
@click.option("--fid-ref", default=None, help="Reference FID statistics (.npz from `dfkd fid-stats`).")
@click.option("--fid-every", type=click.IntRange(min=0), default=None,
              help="Measure FIDs of the synthetic data every N steps (0: off).  [default: 500]")
@click.option("--transfer-data", default=None, help="Synthetic transfer data (.npz from `dfkd synthesize`).")
@click.option("--data", default=None, help="Real training images (.npz or ImageFolder): distill on them with "
              "--method kd (the default with --data).")
@click.option("--feature-loss", "feature_loss", multiple=True, metavar="at|rkd|sp|fitnet",
              help="Add a feature/relation objective to the method's loss (repeat the flag for several).")
@click.option("--feature-weight", type=float, default=None, help="Weight of every --feature-loss (default: each "
              "one's paper weight).")
@click.option("--discriminator", type=click.Choice(["logits", "features"]), default=None,
              help="Adversarial KD: a discriminator tells teacher from student logits or penultimate features.")
@click.option("--disc-weight", type=float, default=None, help="Weight of the fool-the-discriminator term.  "
              "[default: 1]")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Method hyper-parameter override, e.g. -p lr_g=1e-3 (see `dfkd methods --params NAME`).")
@click.option("--config", "config_file", default=None,
              help="JSON or TOML file of settings, keyed as a run's config.json (flags win); keys without a flag: "
                   "runs_dir (where runs go, default runs), ckpt_every, log_every, image_every (steps).")
@click.option("--seed", type=SEED, default=None, help="Random seed.  [default: 0]")
@click.option("--device", default=None, help="cpu, cuda, cuda:N or auto.  [default: auto]")
@click.option("--out", default=None, help="Run folder (default runs/<date>-<method>-<teacher>).")
@click.option("--resume", "resume_dir", default=None, help="Continue the run in this folder from its checkpoint.")
@click.option("--quantize", type=click.Choice(["int8"]), default=None, help="Quantization-aware: distill a "
              "fake-quantized student; also write student_int8.onnx and deploy.json.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default=None,
              help="Arithmetic of the networks: autocast to bf16/fp16 (losses stay fp32; halves GPU memory).  "
              "[default: auto: fp32; bf16 on a CPU with a native bf16 unit (AMX, AVX-512 BF16) for a teacher of "
              "more than 5M multiply-adds an input]")
@click.option("--compile/--no-compile", "compile", default=None, help="torch.compile teacher, student and "
              "generator (a network that fails to compile runs eagerly, with a warning); for GPUs: on a CPU it "
              "was measured slower (README, The command line).")
@click.option("--deterministic/--no-deterministic", "deterministic", default=None, help="Reproducible GPU kernels "
              "(deterministic cuDNN and torch algorithms, no cudnn.benchmark): two runs, or a run and its resume, "
              "end bit-equal on a GPU as on a CPU; slower.  [default: off]")
@friendly
def distill_cmd(resume_dir: str | None, config_file: str | None, params: tuple[str, ...], **flags: Any) -> None:
    """Distill a teacher into a student without real data.

    \b
    Example:
      dfkd distill --teacher examples/mnist_lenet5_bn.pt --method dfad \\
          --eval-data examples/mnist_test.npz --budget-minutes 5
      dfkd distill --resume runs/20261130-120000-dfad-mnist_lenet5_bn
      dfkd distill --transfer-data transfer.npz --student lenet5_half    (no teacher file: see `synthesize`)
      dfkd distill --teacher a.pt --teacher b.pt --method dfq --feature-loss rkd --discriminator logits
      dfkd distill --teacher examples/mnist_lenet5_bn.pt --data train.npz --feature-loss at
    """
    from dfkd.archs import parse_arch_args
    from dfkd.config import build_config, parse_param
    from dfkd.engine import RESUMABLE, Interrupted, distill, resume

    params = params + objective_flags(flags)
    flags["arch_args"] = parse_arch_args(flags["arch_args"]) or None
    flags["student_args"] = parse_arch_args(flags["student_args"], "--student-arg") or None
    if flags["method"] not in (None, "auto", *_method_names()):
        from dfkd.methods import get_method

        get_method(flags["method"])
    if flags["method"] is None:
        from dfkd.sources import default_method

        flags["method"] = default_method(flags)
    try:
        if resume_dir:
            if config_file:
                raise DfkdError(f"--config {config_file}: a resumed run keeps its settings; with --resume give only "
                                "--steps, --budget-minutes, --device, --eval-data, --precision, --compile, "
                                "--deterministic or -p")
            fixed = {k: v for k, v in flags.items() if k not in RESUMABLE}
            result = resume(resume_dir, flags["steps"], flags["budget_minutes"], dict(map(parse_param, params)),
                            flags["device"], flags["eval_data"], fixed, flags["precision"], flags["compile"],
                            flags["deterministic"])
        else:
            result = distill(build_config(config_file, params, **flags))
    except Interrupted as e:
        from dfkd.distributed import quiet_rank

        if not quiet_rank():
            click.echo(str(e), err=True)
        sys.exit(stop_exit_code())
    if result.rank:
        return  # under torchrun, rank 0 reports the run
    top1 = result.metrics.get("top1")
    shown = f"  (test top-1 {100 * top1:.2f}%)" if top1 is not None else ""  # 0 % is shown too
    click.echo(f"student: {result.run_dir / 'student.pt'}{shown}")
    if result.selected:
        click.echo(f"selected: {result.selected}")
    click.echo(f"tensorboard --logdir {shlex.quote(str(result.run_dir))}")
    print_deploy(result.run_dir)
    click.echo(f"peak memory (RSS): {result.peak_rss_mib:.0f} MiB")


def objective_flags(flags: dict[str, Any]) -> tuple[str, ...]:
    """Pop --feature-loss/--feature-weight/--discriminator/--disc-weight from `flags` as `-p KEY=VALUE` texts."""
    names = list(flags.pop("feature_loss") or ())
    values = {"feature_loss": (names[0] if len(names) == 1 else names) if names else None,
              "feature_weight": flags.pop("feature_weight"), "discriminator": flags.pop("discriminator"),
              "disc_weight": flags.pop("disc_weight")}
    return tuple(f"{k}={json.dumps(v)}" for k, v in values.items() if v is not None)


@main.command("synthesize")
@single_teacher(required=True, help="Teacher file (any format `dfkd distill` takes).")
@teacher_options
@click.option("--method", required=True, help="Synthesis method (see `dfkd methods`), e.g. zskd, deepinversion.")
@click.option("--num", default=None, type=click.IntRange(min=1), help="Number of images to write.  [default: 1000 "
              "a class, at most 50000]")
@click.option("--labels", default="soft", show_default=True, metavar="soft|topk=K|hard|temperature=T",
              help="What of the teacher's output to ship: its softmax, the top K renormalised, one-hot, or tempered.")
@click.option("--label-decimals", type=int, default=None, help="Round every stored label to this many decimals.")
@click.option("--eval-data", default=None, help="Real test data: measure the teacher's top-1 for the provenance.")
@click.option("--out", required=True, help="The transfer file to write (.npz).")
@click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")
@click.option("--student", default=None, help="Student the method trains alongside (adversarial methods compete "
              "with it; default: the usual pair for the teacher).")
@click.option("--steps", type=click.IntRange(min=0), default=None, help="Student steps of training before images "
              "are collected (generator methods dafl/dfad/zskt/dfq: default 2000, then the generator is sampled; "
              "other methods: default 0, then each round's finished batch is kept).")
@click.option("--views", type=click.IntRange(min=1), default=None, help="Images stored per image the method makes:"
              " it and augmented views, each labelled by the teacher.  [default: 4 for fast, cmi and zskd (their "
              "students see augmented views in place), else 1]")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="Method hyper-parameter override.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@friendly
def synthesize_cmd(teacher: str, params: tuple[str, ...], device: str, **kw: Any) -> None:
    """Write synthetic transfer data: images (8-bit) and the teacher's soft labels, to distill elsewhere.

    The file holds no teacher weights: a student can be trained from it where the teacher file may not go.
    Images are stored as 8-bit pixels with the teacher's probabilities on exactly those pixels. zskd and
    deepinversion images do not depend on the student: -p s_steps=0 skips the student steps of their rounds.

    \b
    Example:
      dfkd synthesize --teacher examples/mnist_lenet5_bn.pt --method zskd --num 2000 -p s_steps=0 \\
          --out transfer.npz
      dfkd distill --transfer-data transfer.npz --student lenet5_half --steps 2000
    """
    from dfkd.config import check_method_params, parse_param
    from dfkd.labels import parse_labels
    from dfkd.outpaths import check_output_file
    from dfkd.teacher_options import load_with_options
    from dfkd.transfer import synthesize
    from dfkd.utils import pick_device

    overrides = dict(map(parse_param, params))
    if kw["method"] == "auto":  # distill's choice of method for a student, not a synthesis method
        from dfkd.synthesis import synthesis_methods

        raise DfkdError(f"--method auto: picks how `dfkd distill` trains a student; synthesize needs the method that "
                        f"makes the images: one of {', '.join(synthesis_methods())} (zskd needs only the teacher's "
                        "logits)")
    check_method_params(kw["method"], overrides, min_s_steps=0)
    labels = parse_labels(kw.pop("labels"), kw.pop("label_decimals"))
    check_output_file(kw["out"], force=kw["force"])
    dev = pick_device(device)
    t = load_with_options(teacher, pop_teacher_options(kw), dev)
    data = synthesize(t, params=overrides, device=dev, progress=True, labels=labels, **kw)
    click.echo(f"wrote {kw['out']}: {len(data)} images, {data.num_classes} classes, method {data.method}")


@main.command("methods")
@click.option("--params", "show", default=None, metavar="NAME", help="Show one method's parameters and defaults.")
@single_teacher(help="With --params: the defaults this teacher file gets (recipes scale with the teacher).")
@click.option("--recipe", type=click.Choice(["paper", "cpu"]), default=None,
              help="With --params: this recipe instead of the one the teacher gets.")
@teacher_options
@friendly
def methods_cmd(show: str | None, teacher: str | None, recipe: str | None, **kw: Any) -> None:
    """List the distillation methods (or one method's parameters).

    \b
    Example:
      dfkd methods
      dfkd methods --params dfad --teacher examples/mnist_lenet5.pt    (the CPU recipe a LeNet teacher gets)
      dfkd methods --params dfad --recipe cpu
    """
    from dfkd.methods import get_method, list_methods
    from dfkd.methods._recipes import recipe_lines

    if show:
        cls = get_method(show) if show != "auto" else None
        loaded = None
        if teacher:  # loaded first: a file that cannot be read is the one thing said
            from dfkd.teacher_options import load_with_options

            loaded = load_with_options(teacher, pop_teacher_options(kw))
        row: dict[str, Any] = {}
        if cls is None:  # auto: its table, and for a teacher the row it takes, then that method's defaults
            show, recipe, row = auto_for(loaded, teacher, recipe)
            if show is None:
                return
            cls = get_method(show)
        click.echo((cls.__doc__ or "").strip() + "\n")
        if loaded is not None:
            click.echo(f"  defaults for --teacher {teacher}:")
        params = cls.finalize({**cls.default_params(loaded, recipe), **row})
        lines = recipe_lines(cls, loaded, params, {"recipe": recipe} if recipe else {})
        if loaded is not None:  # the default student: its clip, its first weights, and the lines a run prints
            from dfkd.build import clip_unnormalised
            from dfkd.inherit import inherit
            from dfkd.students import build_student, student_arch, student_line

            name, student_kwargs = student_arch(loaded, None)
            net = build_student(name, student_kwargs)
            params, clip = clip_unnormalised(params, {}, net)
            lines += [clip] * bool(clip) + [student_line(loaded, None, name, net),
                                            "  " + inherit(net, loaded.module, "auto", loaded.arch or "the teacher")]
        unused = cls.no_effect(params)
        for k, v in params.items():
            click.echo(f"  {k:14s} {v!r:<10} (not used: {unused[k]})" if k in unused else f"  {k:14s} {v!r}")
        click.echo("\n" + "\n".join(lines))
        return
    if teacher or recipe:
        flag = "--teacher T.pt" if teacher else f"--recipe {recipe}"
        raise DfkdError(f"{flag.split()[0]} goes with --params NAME: dfkd methods --params dfad {flag}")
    from dfkd.auto import describe

    click.echo(f"{'auto':14s} {describe()}")
    for name in list_methods():
        click.echo(f"{name:14s} {get_method(name).describe()}")


def auto_for(loaded: Any, teacher: str | None, recipe: str | None) -> tuple[str | None, str | None, dict[str, Any]]:
    """`dfkd methods --params auto`: print the rule table and, for a teacher, the row it takes.

    Returns:
        The method the teacher gets (None without a teacher), its recipe, and the row's other settings (none where
        `recipe` is the user's and not the row's, as in a run).
    """
    from dfkd.auto import choose, profile, rule_lines

    if loaded is None and recipe:
        raise DfkdError(f"--recipe {recipe} with --params auto: the recipe is the teacher's row's; give --teacher "
                        f"T.pt to see it, or --params NAME --recipe {recipe} for a method's")
    click.echo("\n".join(rule_lines()))
    if loaded is None:
        return None, None, {}
    prof = profile(loaded)
    rule = choose(prof)
    mine = recipe not in (None, rule.recipe)
    taken = recipe or rule.recipe
    click.echo(f"\nfor --teacher {teacher}: {rule.method}{f' (recipe {taken})' if taken else ''}: {rule.when} "
               f"[{prof.words()}]\n")
    return rule.method, taken, {} if mine else dict(rule.params)


@main.command("models")
def models_cmd() -> None:
    """List the zoo architectures (the names --student, --teacher-arch and train-teacher --arch take).

    \b
    Example:
      dfkd models
      dfkd distill --teacher examples/mnist_lenet5_bn.pt --student lenet5_3q
    """
    from dfkd.models import MODELS

    for name in MODELS.names():
        doc = (MODELS.get(name).__doc__ or "").strip().splitlines()
        click.echo(f"{name:20s} {doc[0] if doc else ''}")


@main.command("fid-stats")
@click.argument("data")
@click.argument("out")
@click.option("--features", type=click.Choice(["inception", "teacher"]), required=True,
              help="Inception-V3 pool features (pytorch-fid) or the teacher's penultimate features.")
@single_teacher(help="Teacher file (needed for --features teacher).")
@teacher_options
@click.option("--device", default="auto", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")
@friendly
def fid_stats_cmd(data: str, out: str, force: bool, **kw: Any) -> None:
    """Write FID reference statistics (pytorch-fid .npz: mu, sigma) of real data; shareable without images.

    \b
    Example:
      dfkd fid-stats ../shared/data/mnist_test.npz mnist_teacher.npz --features teacher \\
          --teacher examples/mnist_lenet5_bn.pt
      dfkd distill --teacher examples/mnist_lenet5_bn.pt --method dfq --fid-ref mnist_teacher.npz
    """
    from dfkd.monitor import compute_fid_stats
    from dfkd.outpaths import check_output_file

    check_output_file(out, "OUT", force)
    options = pop_teacher_options(kw)
    stats = compute_fid_stats(data, out, options=options, force=force, **kw)
    click.echo(f"wrote {out} ({kw['features']} features, {len(stats.mu)}-d)")


@main.command("convert")
@single_teacher(required=True, help="The file to convert: a state_dict (with --teacher-arch), TorchScript "
              "or torch.export archive, pickled module (with --trust-pickle) or dfkd model file.")
@teacher_options
@click.option("--out", required=True, help="The dfkd model file to write (must not exist).")
@friendly
def convert_cmd(teacher: str, out: str, **kw: Any) -> None:
    """Write a dfkd model file (architecture, input spec, weights) that every later command reads with no flags.

    \b
    Example:
      dfkd convert --teacher private.pt --teacher-arch torchvision:resnet18 --channels 3 --input-size 32 \\
          --mean 0.4914 --mean 0.4822 --mean 0.4465 --std 0.247 --std 0.243 --std 0.261 --out teacher.pt
      dfkd distill --teacher teacher.pt --method dfad
    """
    from dfkd.convert import convert

    meta = convert(teacher, out, pop_teacher_options(kw))
    s = meta.input_spec
    click.echo(f"wrote {out}: {meta.arch}, {s.describe()} inputs, {meta.num_classes} classes")


@main.command("report")
@click.argument("run_dir")
@friendly
def report_cmd(run_dir: str) -> None:
    """Summarise a run; write synthetic.png (last image grid) and curves.png into its folder.

    Given a transfer file (.npz from `dfkd synthesize`): its provenance, class histogram and labels, and
    FILE_samples.png (samples per class) beside it.

    \b
    Example:
      dfkd report runs/20261130-120000-dfq-mnist_lenet5_bn
      dfkd report transfer.npz
    """
    from dfkd.report import report

    path = Path(run_dir)  # a file (or its parts) is a transfer file; a run folder may be named x.npz
    if path.is_file() or run_dir.endswith(".parts") or (run_dir.endswith(".npz") and not path.is_dir()):
        from dfkd.transfer_report import report_transfer

        click.echo(report_transfer(run_dir).text())
        return

    click.echo(report(run_dir).text())


from dfkd.cli.deploy import export_cmd, print_deploy, quantize_cmd  # noqa: E402  (the deployment commands)

main.add_command(export_cmd)
main.add_command(quantize_cmd)

from dfkd.cli.audit import audit_cmd  # noqa: E402  (the owner's check before a transfer file leaves)

main.add_command(audit_cmd)

from dfkd.cli.families import extend_cmd, search_cmd  # noqa: E402  (lifelong and search families)

main.add_command(extend_cmd)
main.add_command(search_cmd)

if __name__ == "__main__":
    main()
