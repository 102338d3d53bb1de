"""`dfkd export` and `dfkd quantize`: the deployment commands (registered on the group in cli/main.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from dfkd.cli.main import friendly
from dfkd.cli.options import SIZE, single_teacher

_MODEL_HELP = ("Architecture of a plain state_dict MODEL: zoo NAME, torchvision:NAME, timm:NAME or module:Class "
               "(--teacher-arch, as the other commands spell it, is the same).")
_ARG_HELP = "Constructor argument of --arch (repeat; JSON values), as --arch-arg on the other commands."


def _spec(channels: int | None, input_size: int | tuple[int, int] | None, mean: tuple[float, ...],
          std: tuple[float, ...]) -> Any:
    from dfkd.archs import flag_spec

    return flag_spec(channels, input_size, mean, std)  # never a silent mean 0 / std 1, as on every other command


@click.command("export")
@click.argument("model")
@click.option("--format", "fmt", required=True, type=click.Choice(["torchscript", "onnx", "exported-program"]),
              help="TorchScript (torch.jit.load), ONNX (onnxruntime) or a torch.export archive (torch.export.load).")
@click.option("--out", required=True, help="The file to write.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("--arch", "--teacher-arch", "arch", default=None, help=_MODEL_HELP)
@click.option("--arch-arg", "arch_args", multiple=True, metavar="KEY=VALUE", help=_ARG_HELP)
@click.option("--trust-pickle", is_flag=True, help="Allow a pickled module (runs code from the file).")
@click.option("--channels", type=click.IntRange(min=1), default=None, help="Input channels (if the file does not say).")
@click.option("--input-size", type=SIZE, default=None, metavar="S|HxW",
              help="Input side in pixels, or height x width (28x56).")
@click.option("--mean", type=float, multiple=True, help="Normalisation mean per channel (repeat the flag).")
@click.option("--std", type=float, multiple=True, help="Normalisation std per channel (repeat the flag).")
@friendly
def export_cmd(model: str, fmt: str, out: str, force: bool, arch: str | None, arch_args: tuple[str, ...],
               trust_pickle: bool, channels: int | None, input_size: int | tuple[int, int] | None,
               mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """Export a model for deployment, with a dynamic batch axis and its input spec inside ("dfkd_spec").

    After writing, the file is loaded back without dfkd and must reproduce the model's logits.

    \b
    Example:
      dfkd export runs/RUN/student.pt --format onnx --out student.onnx
      dfkd export examples/mnist_lenet5_bn.pt --format torchscript --out teacher.ts
    """
    from dfkd.archs import parse_arch_args
    from dfkd.deploy import export_file

    check = export_file(model, fmt, out, force, arch, trust_pickle, _spec(channels, input_size, mean, std),
                        parse_arch_args(arch_args))
    click.echo(f"wrote {out} ({fmt}, {Path(out).stat().st_size / 1024:.1f} KiB)")
    click.echo(check.line())


@click.command("quantize")
@click.argument("model")
@click.option("--calibration", default="zskd", show_default=True, metavar="METHOD|FILE.npz|FOLDER|noise",
              help="Calibration images: a data-free method (zskd, deepinversion, zeroq, dfq, dfad, ...) run on "
              "--teacher, a `dfkd synthesize` file, an image .npz or a folder of images, or `noise` (random "
              "pixels). zskd needs only "
              "the teacher's logits; on BatchNorm and BatchNorm-free teachers it calibrated nearly as well as real "
              "images.")
@click.option("--out", required=True, help="The int8 ONNX file to write.")
@single_teacher(help="Teacher file: synthesizes the calibration images of a METHOD; "
              "with --eval-data, agreement with it is reported.")
@click.option("--eval-data", default=None, help="Real test data: top-1 of float and int8 (reporting only).")
@click.option("--num-calibration", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True, help="How onnxruntime sets activation ranges from the calibration images.")
@click.option("--synth-steps", type=click.IntRange(min=0), default=None,
              help="Student steps the METHOD trains before images are collected (as `dfkd synthesize --steps`).")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="METHOD hyper-parameter override.")
@click.option("--arch", "--teacher-arch", "arch", default=None, help=_MODEL_HELP)
@click.option("--arch-arg", "arch_args", multiple=True, metavar="KEY=VALUE", help=_ARG_HELP)
@click.option("--trust-pickle", is_flag=True, help="Allow a pickled module (runs code from the file).")
@click.option("--channels", type=click.IntRange(min=1), default=None, help="Input channels (if the file does not say).")
@click.option("--input-size", type=SIZE, default=None, metavar="S|HxW",
              help="Input side in pixels, or height x width (28x56).")
@click.option("--mean", type=float, multiple=True, help="Normalisation mean per channel (repeat the flag).")
@click.option("--std", type=float, multiple=True, help="Normalisation std per channel (repeat the flag).")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="Where calibration images are synthesized.")
@friendly
def quantize_cmd(params: tuple[str, ...], **kw: Any) -> None:
    """Quantize a model to int8 (onnxruntime static quantization, per-channel weights), calibrated without data.

    Prints float vs int8: file size, CPU latency per image, and with --eval-data top-1 and agreement with
    --teacher.

    \b
    Example:
      dfkd quantize runs/RUN/student.pt --teacher examples/mnist_lenet5_bn.pt \\
          --eval-data examples/mnist_test.npz --out student_int8.onnx
      dfkd quantize student.pt --calibration transfer.npz --out student_int8.onnx
    """
    from dfkd.archs import parse_arch_args
    from dfkd.config import parse_param
    from dfkd.deploy import QuantizeRequest, quantize_file
    from dfkd.utils import pick_device

    kw["device"] = str(pick_device(kw["device"]))
    kw["arch_args"] = parse_arch_args(kw["arch_args"])
    kw["spec"] = _spec(kw.pop("channels"), kw.pop("input_size"), kw.pop("mean"), kw.pop("std"))
    stats = quantize_file(QuantizeRequest(params=dict(map(parse_param, params)), **kw))
    click.echo(f"wrote {kw['out']} (int8 ONNX, QDQ, per-channel weights)")
    for line in stats.lines():
        click.echo(line)


def print_deploy(run_dir: Path) -> None:
    """After `dfkd distill --quantize`: where the int8 model is and its numbers (from deploy.json)."""
    from dfkd.deploystats import DEPLOY_JSON, DeployStats
    from dfkd.qat import INT8_FILE

    path = Path(run_dir) / DEPLOY_JSON
    if not path.is_file():
        return
    click.echo(f"int8 student: {Path(run_dir) / INT8_FILE}")
    for line in DeployStats(**json.loads(path.read_text())).lines():
        click.echo(line)
