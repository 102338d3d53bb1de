"""Export a classifier for deployment: TorchScript, ONNX or a `torch.export` archive (`dfkd export`).

Every export has a dynamic batch axis and carries the input spec (channels, size, mean, std, class count) as the
JSON entry `dfkd_spec`: in ONNX `metadata_props`, in TorchScript `_extra_files`, in the export archive's
`extra_files`. After writing, the file is loaded back with its own runtime alone (`torch.jit.load`,
`onnxruntime.InferenceSession`, `torch.export.load`; no dfkd code) and must reproduce the source model's logits on
random images at two batch sizes, within `ATOL + RTOL * |logit|`; only then is it moved to its final name.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfkd.errors import DfkdError
from dfkd.io import disk_error, place_file, usual_permissions
from dfkd.outpaths import check_output_file
from dfkd.spec import InputSpec

FORMATS = ("torchscript", "onnx", "exported-program")
SPEC_KEY = "dfkd_spec"
#: Tolerance of the round-trip check: |exported - source| <= ATOL + RTOL * |source| for every logit.
ATOL, RTOL = 1e-4, 1e-4
#: Batch sizes of the round-trip check; the export's example batch is another one (2), so the axis must be dynamic.
CHECK_BATCHES = (1, 5)
OPSET = 17
DEPLOY_HELP = 'pip install -e ".[deploy]"'


@dataclass
class ExportCheck:
    """The round-trip check of one exported file."""

    fmt: str
    path: Path
    batch_sizes: tuple[int, ...]
    max_abs_diff: float

    def line(self) -> str:
        sizes = " and ".join(map(str, self.batch_sizes))
        return (f"check: {self.fmt} file loaded without dfkd reproduces the source logits at batch sizes {sizes} "
                f"(max |diff| {self.max_abs_diff:.2e}, tolerance {ATOL:.0e} + {RTOL:.0e} x |logit|)")


def spec_json(spec: InputSpec, num_classes: int, class_names: list[str] | None = None) -> str:
    """The `dfkd_spec` entry: input spec, class count and class names, as JSON."""
    return json.dumps({**spec.to_dict(), "num_classes": int(num_classes), "class_names": class_names})


def require(package: str) -> Any:
    """Import an optional deployment package or fail naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise DfkdError(f"{package} is not installed; it is needed to export and quantize models: "
                        f"{DEPLOY_HELP}") from None


def _example(spec: InputSpec, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return spec.normalize(torch.rand(spec.shape(batch), generator=g))


def _batch_dim() -> Any:
    return torch.export.Dim("batch", min=1, max=65536)


def _write_torchscript(model: nn.Module, spec: InputSpec, path: Path, meta: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, but still what many servers load
        try:
            scripted = torch.jit.script(model)
        except Exception:  # noqa: BLE001 - a module TorchScript cannot compile: trace it (no control flow in it)
            scripted = torch.jit.trace(model, _example(spec, 2), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(scripted, buf, _extra_files={SPEC_KEY: meta})
    _write_bytes(path, buf)


def _write_bytes(path: Path, buf: io.BytesIO) -> None:
    """Write an archive made in memory to `path`.

    torch's C++ writers abort the whole process on a full disk (SIGABRT, "unexpected pos"), where Python's write
    raises an OSError that `write_export` turns into one line.
    """
    with open(path, "wb") as f:
        f.write(buf.getbuffer())


def _write_onnx(model: nn.Module, spec: InputSpec, path: Path, meta: str) -> None:
    """ONNX opset 17 through torch.onnx's TorchScript-based exporter, else its torch.export-based one.

    The TorchScript-based exporter is the mature path for convolutional classifiers and takes about a second where
    the torch.export-based one takes 10-40 s on this project's CPU; the latter (which needs onnxscript) is the
    fallback for modules the former cannot take, and the only path once torch drops the former.
    """
    onnx = require("onnx")
    x = _example(spec, 2)
    names = {"input_names": ["input"], "output_names": ["logits"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=OPSET,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **names)
        except OSError:
            raise  # a full disk is no reason to try the other exporter
        except Exception:  # noqa: BLE001 - removed from torch, or a module it cannot take
            require("onnxscript")
            torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False, external_data=False,
                              opset_version=OPSET, dynamic_shapes=({0: _batch_dim()},), **names)
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = SPEC_KEY, meta
    onnx.save(proto, str(path))


def _write_exported_program(model: nn.Module, spec: InputSpec, path: Path, meta: str) -> None:
    ep = torch.export.export(model, (_example(spec, 2),), dynamic_shapes=({0: _batch_dim()},))
    buf = io.BytesIO()
    torch.export.save(ep, buf, extra_files={SPEC_KEY: meta})
    _write_bytes(path, buf)


def jit_load(f: Any, **kwargs: Any) -> torch.jit.ScriptModule:
    """`torch.jit.load` without torch's deprecation warning of the format (nothing a file's holder can act on)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=FutureWarning)
        return torch.jit.load(f, map_location="cpu", **kwargs)


def load_runner(fmt: str, path: str | os.PathLike) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
    """Load an exported file with its own runtime only: (logits function, the `dfkd_spec` entry or {})."""
    path = str(path)
    if fmt == "torchscript":
        extra = {SPEC_KEY: ""}
        m = jit_load(path, _extra_files=extra)
        return (lambda x: m(x)), _meta(extra[SPEC_KEY])
    if fmt == "onnx":
        ort = require("onnxruntime")
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        meta = sess.get_modelmeta().custom_metadata_map.get(SPEC_KEY, "")
        return (lambda x: torch.from_numpy(sess.run(None, {name: x.numpy()})[0])), _meta(meta)
    extra = {SPEC_KEY: ""}
    m = torch.export.load(path, extra_files=extra).module()
    return (lambda x: m(x)), _meta(extra[SPEC_KEY])


def _meta(text: str | bytes) -> dict[str, Any]:
    return json.loads(text) if text else {}


@torch.no_grad()
def check_export(model: nn.Module, spec: InputSpec, fmt: str, path: Path) -> ExportCheck:
    """Run the exported file (without dfkd) and the source model on the same random images; fail on a mismatch."""
    run, _ = load_runner(fmt, path)
    worst = 0.0
    for i, b in enumerate(CHECK_BATCHES):
        x = _example(spec, b, seed=100 + i)
        ref, got = model(x).float(), run(x).float()
        if got.shape != ref.shape:
            raise DfkdError(f"export to {fmt}: the exported file gives logits of shape {tuple(got.shape)} at batch "
                            f"size {b}, the source model {tuple(ref.shape)}; the file was not written")
        diff = (got - ref).abs()
        worst = max(worst, float(diff.max()))
        if not bool((diff <= ATOL + RTOL * ref.abs()).all()):
            raise DfkdError(f"export to {fmt}: the exported file's logits differ from the source model's by up to "
                            f"{float(diff.max()):.3g} (tolerance {ATOL:g} + {RTOL:g} x |logit|); the file was not "
                            "written. Try another --format")
    return ExportCheck(fmt, path, CHECK_BATCHES, worst)


#: A file name for each format that is not ONNX (the loader tells these two apart by their content).
SUFFIXES = {"torchscript": ".pt", "exported-program": ".pt2"}
KINDS = {"torchscript": "a TorchScript archive", "exported-program": "a torch.export archive"}


def check_format_name(out: Path, fmt: str) -> None:
    """Refuse a name that says another format than the file's: dfkd's loader and other tools go by `.onnx`.

    A TorchScript file written as student.onnx, and an ONNX file written as student.pt, were called corrupt by
    `dfkd evaluate`.
    """
    if fmt == "onnx" and out.suffix.lower() != ".onnx":
        raise DfkdError(f"--out {out}: --format onnx writes an ONNX model, which dfkd and other tools know by its "
                        f".onnx name; name it {out.with_suffix('.onnx').name}")
    if fmt in SUFFIXES and out.suffix.lower() == ".onnx":
        raise DfkdError(f"--out {out}: --format {fmt} writes {KINDS[fmt]}, which tools read by a {SUFFIXES[fmt]} "
                        f"name; name it {out.with_suffix(SUFFIXES[fmt]).name}")


def check_model_name(out: str | os.PathLike, flag: str = "--out") -> None:
    """A dfkd model file named `.onnx` is read back as ONNX and called corrupt: refuse the name."""
    if Path(out).suffix.lower() == ".onnx":
        raise DfkdError(f"{flag} {out}: this writes a dfkd model file (PyTorch), but a .onnx name is read back as "
                        f"ONNX; name it {Path(out).with_suffix('.pt').name} (`dfkd export --format onnx` makes ONNX)")


WRITERS = {"torchscript": _write_torchscript, "onnx": _write_onnx, "exported-program": _write_exported_program}


def write_export(model: nn.Module, spec: InputSpec, num_classes: int, fmt: str, path: Path,
                 class_names: list[str] | None = None, shown: Path | None = None,
                 hint: str = "try another --format") -> None:
    """Write `model` in format `fmt` to `path` (no check, no overwrite protection: see `export_model`).

    `shown`: the file named in a write error (the output a temporary `path` becomes); `hint`: what a failed export's
    message advises (quantize, which has no --format, says its own).
    """
    if fmt not in WRITERS:
        raise DfkdError(f"--format {fmt}: unknown; choose one of {', '.join(FORMATS)}")
    model = model.cpu().eval()
    if fmt == "exported-program" and any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        raise DfkdError("export to exported-program: a TorchScript model cannot be (torch.export traces Python "
                        "modules); export the model file it was made from, or give --format onnx or torchscript")
    try:
        WRITERS[fmt](model, spec, path, spec_json(spec, num_classes, class_names))
    except DfkdError:
        raise
    except OSError as e:  # a full disk (it said "try another --format", and the other formats failed the same way)
        err = disk_error(e, shown or path)
        if err is None:
            raise DfkdError(f"export to {fmt}: cannot write {shown or path} ({e.strerror or e})") from None
        raise err from None
    except Exception as e:  # noqa: BLE001 - the exporters raise many kinds; the user needs the first line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise DfkdError(f"export to {fmt} failed ({first}); {hint}") from None


def export_model(model: nn.Module, spec: InputSpec, num_classes: int, fmt: str, out: str | os.PathLike,
                 force: bool = False, class_names: list[str] | None = None) -> ExportCheck:
    """Export a classifier, check the file reproduces it, then move it into place (never a half-written `out`).

    Args:
        model: the classifier, `forward(x) -> logits`; exported from CPU in eval mode.
        spec: its input spec (recorded in the file).
        num_classes: its class count (recorded in the file).
        fmt: "torchscript", "onnx" or "exported-program".
        out: the file to write.
        force: overwrite an existing `out`.
        class_names: optional class names (recorded in the file).

    Returns:
        The round-trip check (largest logit difference over the checked batches).

    Raises:
        DfkdError: when `out` exists (without `force`), a package is missing, export fails or the check fails.
    """
    out = check_output_file(out, force=force)
    check_format_name(out, fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The temp name keeps the final suffix: torch.export warns about archives not named *.pt2.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=f".tmp{out.suffix}", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_export(model, spec, num_classes, fmt, tmp, class_names, shown=out)
        check = check_export(model.cpu().eval(), spec, fmt, tmp)
        usual_permissions(tmp)
        place_file(tmp, out, force)
    finally:
        tmp.unlink(missing_ok=True)
    check.path = out
    return check

