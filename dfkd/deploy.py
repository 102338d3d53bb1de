"""`dfkd export` and `dfkd quantize` as library functions: load a model file, export or quantize it, measure it."""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfkd.calibration import DEFAULT_CALIBRATION, NOISE, calibration_pixels
from dfkd.data import load_for, to_model_input
from dfkd.deploystats import DeployStats, measure
from dfkd.errors import DfkdError
from dfkd.evaluate import predict
from dfkd.export import ExportCheck, check_format_name, export_model
from dfkd.outpaths import check_output_file
from dfkd.quantize import Quantized, quantize_model
from dfkd.spec import InputSpec
from dfkd.teacher import Teacher, load_teacher


def load_model_any(path: str | os.PathLike, arch: str | None = None, trust_pickle: bool = False,
                   spec: InputSpec | None = None, arch_args: dict[str, Any] | None = None) -> Teacher:
    """Any file dfkd can load (dfkd model file, state_dict + arch, TorchScript, torch.export, trusted pickle).

    Returned frozen, on CPU, with its input spec and class count (`.module` is the classifier itself). A
    TorchScript, torch.export or ONNX file that `dfkd export` wrote brings its own spec (`dfkd_spec`) when no flags
    do (`dfkd.loading`).
    """
    try:
        return load_teacher(path, arch, trust_pickle, spec, device="cpu", arch_args=arch_args)
    except DfkdError as e:  # the loader speaks of --teacher/--teacher-arch; here they are MODEL and --arch
        text = str(e).replace("--teacher-arch", "--arch")
        raise DfkdError(text.removeprefix("--teacher ")) from None


class _Program(nn.Module):
    """A torch.export archive's program (`ExportedProgram.module()`) as a module the exporters take.

    The loader unflattens an archive into its module tree (for the BatchNorm taps), which no exporter could trace
    ("JIT Tracing of SymInts isn't supported"); the flat program traces, but refuses `train()`/`eval()`, which the
    exporters call: it is frozen in eval mode anyway, so the mode is left alone.
    """

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def train(self, mode: bool = True) -> _Program:
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


class _Logits(nn.Module):
    """The logits alone of a network whose forward returns more (a tuple, a dict): exporters write one output."""

    def __init__(self, model: Teacher, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self._read = model.logits_from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._read(self.network(x))


def exportable(model: Teacher, path: str | os.PathLike) -> nn.Module:
    """The classifier of a loaded `model` (from `path`) as the exporters take it: one forward to the logits.

    `dfkd export` and `quantize` used `.module` as loaded: a torch.export archive failed in every format, and a
    network returning (logits, features) or {"logits": ...} failed in `check_export`, which every other command
    reads through the logits reader.
    """
    network: nn.Module = model.module
    if model.fmt == "export":
        network = _Program(torch.export.load(str(path)).module())
    return network if model.outputs_logits else _Logits(model, network)


#: The teacher options `dfkd quantize` does not take for --teacher (its --arch, --trust-pickle and input flags are
#: the MODEL's).
_TEACHER_FLAGS = ("--teacher-arch", "--arch-arg", "--trust-pickle", "--channels", "--input-size")


def _self_describing_teacher(path: str | os.PathLike, device: str) -> Teacher:
    """`dfkd quantize --teacher`: a file that describes itself; one that needs teacher options is sent to convert."""
    try:
        return load_teacher(path, device=device)
    except DfkdError as e:
        if not any(flag in str(e) for flag in _TEACHER_FLAGS):
            raise
        raise DfkdError(f"{e}. `dfkd quantize` takes no teacher options: write the teacher as a dfkd model file "
                        f"first, `dfkd convert --teacher {path} --teacher-arch ... --out teacher.pt` (with the "
                        "flags named above), then give --teacher teacher.pt") from None


def export_file(model_path: str | os.PathLike, fmt: str, out: str | os.PathLike, force: bool = False,
                arch: str | None = None, trust_pickle: bool = False, spec: InputSpec | None = None,
                arch_args: dict[str, Any] | None = None) -> ExportCheck:
    """Export a model file to `fmt` at `out`, checked against the source (see `dfkd.export.export_model`)."""
    check_format_name(check_output_file(out, force=force), fmt)
    m = load_model_any(model_path, arch, trust_pickle, spec, arch_args)
    refuse_int8(m, model_path, "exported")
    return export_model(exportable(m, model_path), m.spec, m.num_classes, fmt, out, force, m.class_names)


@dataclass
class QuantizeRequest:
    """What `dfkd quantize` was asked (see `quantize_file`)."""

    model: str
    out: str
    calibration: str = DEFAULT_CALIBRATION
    teacher: str | None = None
    eval_data: str | None = None
    num_calibration: int = 512
    calib_method: str = "minmax"
    params: dict[str, Any] | None = None
    synth_steps: int | None = None
    arch: str | None = None
    arch_args: dict[str, Any] | None = None
    trust_pickle: bool = False
    spec: InputSpec | None = None
    force: bool = False
    seed: int = 0
    device: str = "cpu"


def quantize_file(req: QuantizeRequest) -> DeployStats:
    """Quantize a model file to an int8 ONNX file calibrated on `req.calibration`, and measure float vs int8.

    Returns:
        Sizes, latency and (with `eval_data`) top-1 and teacher agreement of float and int8 models.
    """
    if Path(req.out).suffix.lower() != ".onnx":
        raise DfkdError(f"--out {req.out}: dfkd quantize writes an int8 ONNX model; give a name ending in .onnx "
                        "(onnxruntime runs it; `dfkd export` writes the float model in other formats)")
    check_output_file(req.out, force=req.force)
    _warn_unused(req)
    model = load_model_any(req.model, req.arch, req.trust_pickle, req.spec, req.arch_args)
    refuse_int8(model, req.model, "quantized again")
    teacher = _self_describing_teacher(req.teacher, req.device) if req.teacher else None
    eval_data = load_for(req.eval_data, "--eval-data", model.num_classes, model.spec, model.class_names) \
        if req.eval_data else None
    pixels = calibration_pixels(req.calibration, req.num_calibration, model.spec, teacher, req.seed, req.device,
                                req.params, req.synth_steps, num_classes=model.num_classes)
    calib = to_model_input(pixels, model.spec)
    note = _calibration_note(req.calibration, len(pixels), req.calib_method)
    measured: list[DeployStats] = []

    def measure_first(q: Quantized) -> None:  # --out appears once the report is made: a stop meanwhile leaves none
        t_logits = predict(teacher, eval_data, teacher.spec, req.device) if teacher and eval_data else None
        measured.append(measure(q.float_onnx, q.int8, model.spec, eval_data, t_logits, note))

    with tempfile.TemporaryDirectory(prefix="dfkd-quantize-") as work:
        quantize_model(exportable(model, req.model), model.spec, model.num_classes, calib, req.out, work, req.force,
                       req.calib_method, model.class_names, before=measure_first)
    return measured[0]


def refuse_int8(model: Teacher, path: str | os.PathLike, what: str) -> None:
    """An int8 ONNX model (a `dfkd quantize` output) cannot be exported or quantized: name it and the way out."""
    if model.fmt == "onnx-int8":
        raise DfkdError(f"{path}: an int8 ONNX model (onnxruntime's quantized operators) cannot be {what}; give the "
                        "float model it was made from")


def _warn_unused(req: QuantizeRequest) -> None:
    """Warn of the options that do nothing with a calibration FILE or noise (they were accepted and ignored, unsaid).

    -p and --synth-steps shape a METHOD's synthesis; --teacher without one and without --eval-data is read for nothing.
    """
    if req.calibration == NOISE or req.calibration.endswith(".npz") or Path(req.calibration).exists():
        given = [*(["-p"] if req.params else []), *(["--synth-steps"] if req.synth_steps is not None else []),
                 *(["--teacher"] if req.teacher and not req.eval_data else [])]
        if given:
            warnings.warn(f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect: --calibration "
                          f"{req.calibration} synthesizes no images (a METHOD such as zskd does, from --teacher; "
                          "--teacher with --eval-data also reports agreement)", stacklevel=3)


def _calibration_note(source: str, n: int, method: str) -> str:
    read = source.endswith(".npz") or Path(source).exists()  # a file, or a folder of images
    kind = "random noise" if source == NOISE else (f"read from {source}" if read else f"synthesized by {source}")
    return f"{n} images, {kind}, {method} ranges"

