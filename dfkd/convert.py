"""`dfkd convert`: any teacher file + its options -> a dfkd model file that every later command reads alone.

What each source becomes:

- a state_dict with `--teacher-arch` (zoo, `torchvision:NAME`, `timm:NAME`, `module:callable`) or a dfkd model file:
  architecture name + constructor arguments + input spec + weights (for `module:callable` your code is imported
  when the file is loaded, so keep it importable);
- a TorchScript or `torch.export` archive: the archive itself, stored whole inside the model file with the input
  spec (it has no architecture name to rebuild from); it keeps its format's limits (TorchScript: no module hooks,
  so no BatchNorm-statistics methods);
- a pickled module (`--trust-pickle`): its class as `module:Class`, when that class rebuilds it without arguments
  with the same outputs; otherwise a `torch.export` archive of it (dynamic batch); if neither works, an error
  that says to save a state_dict.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfkd.archs import build_model
from dfkd.errors import DfkdError, first_line
from dfkd.export import check_model_name
from dfkd.loading import held_log, read_weights_only, sniff_format
from dfkd.modelfile import ARCHIVE_KINDS, ModelFile, save_model
from dfkd.outpaths import check_output_file
from dfkd.perimage import PerImage
from dfkd.teacher import Teacher
from dfkd.teacher_options import TeacherOptions, load_with_options


def convert(path: str | os.PathLike, out: str | os.PathLike, options: TeacherOptions | None = None) -> ModelFile:
    """Write the model of `path` (read as `options` say) as a dfkd model file `out`.

    Args:
        path: any file `--teacher` takes.
        out: the dfkd model file to write; must not exist (a file the user made is never overwritten).
        options: the shared teacher options.

    Returns:
        The written file's metadata.

    Raises:
        DfkdError: `out` exists, the source cannot be read, or a pickled module can be neither rebuilt nor exported.
    """
    out = check_output_file(out, force=None)  # convert has no --force
    check_model_name(out)
    teacher = load_with_options(path, options)
    arch, kwargs, model, archive = _representation(Path(path), teacher)
    provenance = {"kind": "converted", "source": str(path), "source_sha256": teacher.sha256,
                  "source_format": teacher.fmt}
    meta = ModelFile(arch, kwargs, teacher.spec, teacher.num_classes, teacher.class_names, provenance)
    save_model(out, model, meta, archive, replace=False)
    return meta


def _representation(p: Path, t: Teacher) -> tuple[str, dict[str, Any], nn.Module | None, bytes | None]:
    """(arch, kwargs, model, archive bytes) for the model file."""
    if t.fmt in ("dfkd", "state_dict") and t.arch:
        return t.arch, dict(t.arch_kwargs or {}), t.module, None
    if t.fmt in ARCHIVE_KINDS:
        return t.fmt, {}, None, _archive_bytes(p, t.fmt)
    if t.fmt == "pickle":
        return _from_pickle(t)
    if t.fmt == "onnx":  # its onnx2torch module, kept as a torch.export archive: no onnx2torch needed to load it
        return "export", {}, None, _export_bytes(t)
    if t.fmt == "onnx-int8":  # no state_dict to save: its float source is what converts
        raise DfkdError(f"--teacher {p}: an int8 ONNX model (onnxruntime's quantized operators) cannot be converted; "
                        "give the float model it was made from")
    raise DfkdError(f"--teacher {p}: a {t.fmt} model cannot be converted; save a state_dict and pass --teacher-arch")


def _archive_bytes(p: Path, kind: str) -> bytes:
    if sniff_format(p) == kind:
        return p.read_bytes()
    payload = read_weights_only(p)  # a dfkd model file that already holds the archive
    return payload["archive"].numpy().tobytes()


def _from_pickle(t: Teacher) -> tuple[str, dict[str, Any], nn.Module | None, bytes | None]:
    cls = type(t.module)
    arch = f"{cls.__module__}:{cls.__qualname__}"
    if cls.__module__ != "__main__" and "<locals>" not in cls.__qualname__ and _rebuilds(arch, t):
        return arch, {}, t.module, None
    return "export", {}, None, _export_bytes(t)


def _rebuilds(arch: str, t: Teacher) -> bool:
    """True when `arch()` with the pickle's weights gives the pickle's outputs."""
    try:
        model = build_model(arch, {}).eval()
        model.load_state_dict(t.module.state_dict(), strict=True)
    except (DfkdError, RuntimeError):
        return False
    x = torch.randn(t.spec.shape(2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.allclose(t.logits_from(model(x)), t(x), atol=1e-5)


def _export_bytes(t: Teacher) -> bytes:
    """`t`'s module as torch.export archive bytes, with a dynamic batch.

    One exported at a fixed batch of 1 (run per image, dfkd.perimage) stays at batch 1, and loads per image again.
    """
    fixed = isinstance(t.module, PerImage)
    x = torch.randn(t.spec.shape(1 if fixed else 2))
    try:
        # a refusal logs a warning and prints the partial graph to stderr (dozens of lines); the error says why
        with held_log("torch"), contextlib.redirect_stderr(io.StringIO()):
            ep = torch.export.export(t.module.inner, (x,)) if fixed else \
                torch.export.export(t.module, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except Exception as e:  # noqa: BLE001 - whatever the tracer refuses
        why = first_line(e, 160)
        if t.fmt == "onnx":
            raise DfkdError(f"--teacher {t.source}: the module onnx2torch makes of this ONNX model cannot be exported "
                            f"as a torch.export archive ({why}); give the .onnx file itself as --teacher (onnx2torch "
                            "reads it wherever it is used)") from None
        raise DfkdError(f"--teacher {t.source}: the pickled {type(t.module).__name__} can be neither rebuilt from its "
                        f"class without arguments nor exported ({why}); save its state_dict and "
                        "convert that with --teacher-arch module:callable") from None
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    return buf.getvalue()
