"""The dfkd model file: one format for teachers and students, loadable with `torch.load(weights_only=True)`.

Layout (a plain dict of tensors and plain types)::

    {"format": "dfkd-model", "version": 1, "arch": "lenet5_bn",
     "arch_kwargs": {"num_classes": 10, "in_channels": 1, "input_size": 32},
     "input_spec": {"channels": 1, "size": 32, "mean": [0.1307], "std": [0.3081]},
     "num_classes": 10, "class_names": None | [...], "provenance": {...}, "state_dict": {...}}

Plain PyTorch: ``d = torch.load(p, weights_only=True); m = dfkd.models.create(d["arch"], **d["arch_kwargs"]);
m.load_state_dict(d["state_dict"])``.

`arch` may also name a library or user architecture (`dfkd.archs`): ``"torchvision:resnet18"`` or
``"timm:resnet18"`` (rebuilt by that library, never with downloaded weights) or ``"module:callable"`` (your
code, imported when the file is loaded: keep it importable from where you run dfkd; from a file, only an nn.Module
class or a function of your own code is called). Such files are version 2, so an older dfkd says "upgrade" rather
than "unknown model".

A TorchScript or `torch.export` archive (what `dfkd convert` makes of one) is stored whole, as bytes: ``"arch":
"torchscript"`` or ``"export"``, ``"archive"``: a uint8 tensor of the archive file, and an empty ``state_dict``;
loading reads it with `torch.jit.load` / `torch.export.load` (no pickle), and the model keeps that format's limits
(TorchScript: no module hooks).
"""

from __future__ import annotations

import datetime as _dt
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfkd.archs import build_model
from dfkd.errors import DfkdError
from dfkd.export import jit_load
from dfkd.io import atomic_torch_save
from dfkd.spec import InputSpec

FORMAT = "dfkd-model"
VERSION = 1  # zoo models: what every dfkd reads
NAMED_VERSION = 2  # library, user-code and archive models; the newest this dfkd reads
#: `arch` values of model files that hold a whole archive instead of a state_dict.
ARCHIVE_KINDS = ("torchscript", "export")


@dataclass
class ModelFile:
    """The metadata of a dfkd model file (everything but the weights)."""

    arch: str
    arch_kwargs: dict[str, Any]
    input_spec: InputSpec
    num_classes: int
    class_names: list[str] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


def save_model(path: str | os.PathLike, model: nn.Module | None, meta: ModelFile, archive: bytes | None = None,
               replace: bool = True) -> None:
    """Write `model` and `meta` as a dfkd model file, atomically.

    Args:
        path: destination file.
        model: a model built from `meta.arch` and `meta.arch_kwargs` (None with `archive`).
        meta: architecture, input spec, classes and provenance.
        archive: the bytes of a TorchScript / torch.export archive, when `meta.arch` is one of ARCHIVE_KINDS.
        replace: replace a file at `path`; False (a user's output without --force): a file that appeared there
            while the work ran is kept and this one is not written (`dfkd.io.place_file`).
    """
    provenance = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **meta.provenance}
    state = {} if model is None else {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "version": VERSION if ":" not in meta.arch and meta.arch not in ARCHIVE_KINDS else NAMED_VERSION,
        "arch": meta.arch,
        "arch_kwargs": dict(meta.arch_kwargs),
        "input_spec": meta.input_spec.to_dict(),
        "num_classes": int(meta.num_classes),
        "class_names": list(meta.class_names) if meta.class_names else None,
        "provenance": provenance,
        "state_dict": state,
    }
    if archive is not None:
        payload["archive"] = torch.frombuffer(bytearray(archive), dtype=torch.uint8)
    atomic_torch_save(payload, path, replace)


def is_model_file(obj: Any) -> bool:
    """True if `obj` (a loaded file) is a dfkd model file dict."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def model_from_payload(payload: dict[str, Any], source: str) -> tuple[nn.Module, ModelFile]:
    """Build the model of a loaded dfkd model file dict.

    Raises:
        DfkdError: on a newer version, an unknown architecture or weights that do not fit it.
    """
    version = payload.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise DfkdError(f"{source}: dfkd model file version {version!r} is not one dfkd writes (the file is "
                        "damaged); re-export it")
    if version > NAMED_VERSION:
        raise DfkdError(f"{source}: dfkd model file version {version!r} is newer than this dfkd reads "
                        f"({NAMED_VERSION}); upgrade dfkd")
    try:
        meta = ModelFile(
            arch=payload["arch"],
            arch_kwargs=dict(payload["arch_kwargs"]),
            input_spec=InputSpec.from_dict(payload["input_spec"]),
            num_classes=int(payload["num_classes"]),
            class_names=payload.get("class_names"),
            provenance=dict(payload.get("provenance") or {}),
        )
        state = payload["state_dict"]
        _field_types(meta, state)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DfkdError(f"{source}: dfkd model file is missing or has a malformed field ({e}); re-export it") from None
    except DfkdError as e:  # the file's input_spec, not a flag, is wrong
        raise DfkdError(f"{source}: the file's {e}; re-export it (or give --channels/--input-size/--mean/--std)") \
            from None
    if meta.arch in ARCHIVE_KINDS:
        return _from_archive(payload.get("archive"), meta.arch, source), meta
    model = build_model(meta.arch, meta.arch_kwargs, flag=f"{source}: architecture", trusted=False)
    load_state_checked(model, state, f"{source} (architecture {meta.arch!r})")
    return model, meta


def _field_types(meta: ModelFile, state: Any) -> None:
    """A TypeError for a damaged file's field of another type.

    The architecture must be a name, the weights a state_dict, the class names a list of strings (their count is
    checked against the logits when the model runs; names may repeat: ImageNet's "crane" does).
    """
    arch, names = meta.arch, meta.class_names
    if not isinstance(arch, str):
        raise TypeError(f"'arch' is a {type(arch).__name__}, not an architecture name")
    if not isinstance(state, dict) and arch not in ARCHIVE_KINDS:
        raise TypeError(f"'state_dict' is a {type(state).__name__}, not a dict of tensors")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise TypeError(f"'class_names' must be a list of {meta.num_classes} names, one a class, got "
                        f"{str(names)[:80]}")


def _from_archive(data: Any, kind: str, source: str) -> nn.Module:
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8:
        raise DfkdError(f"{source}: a {kind} model file without its archive bytes; convert the archive again")
    from dfkd.loading import export_cause, held_log  # (loading reads model files: imported here, not at the top)

    buf = io.BytesIO(data.numpy().tobytes())
    with held_log("torch.export") as records:  # it logs a damaged archive's traceback before it raises
        try:
            if kind == "torchscript":
                return jit_load(buf)
            return torch.export.unflatten(torch.export.load(buf))
        except Exception as e:  # noqa: BLE001 - a damaged archive
            raise DfkdError(f"{source}: the {kind} archive inside could not be read "
                            f"({export_cause(e, records)[:200]}); convert it again") from None


def load_state_checked(model: nn.Module, state: dict[str, Any], what: str) -> None:
    """`model.load_state_dict(state)` with a one-line error naming the first mismatches."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).split("\n")[1:3]
        detail = "; ".join(s.strip() for s in first if s.strip())[:400]
        raise DfkdError(f"{what}: the weights do not fit the architecture ({detail}); "
                        f"{_fit_hint(model, state)}") from None


def _fit_hint(model: nn.Module, state: dict[str, Any]) -> str:
    """What to change when the first convolution's input channels are all that differ, else the usual suspects."""
    missing = set(model.state_dict()) - set(state)
    if missing and all(k.split(".")[0] in ("aux1", "aux2", "AuxLogits") for k in missing):
        return ("the file has no auxiliary heads (as after fine-tuning GoogLeNet or Inception-v3 without them): give "
                "--arch-arg aux_logits=false")
    convs = [(k, v) for k, v in model.state_dict().items() if v.dim() == 4]
    if convs:
        key, mine = convs[0]
        theirs = state.get(key)
        if isinstance(theirs, torch.Tensor) and theirs.dim() == 4 and theirs.shape[1] != mine.shape[1] and \
                theirs.shape[0] == mine.shape[0] and theirs.shape[2:] == mine.shape[2:]:
            return (f"the weights take {theirs.shape[1]}-channel images and the model was built for "
                    f"{mine.shape[1]}: give --channels {theirs.shape[1]} (and its --mean/--std)")
    return "check the architecture name (--teacher-arch) and its number of classes"


def student_problem(run_dir: str | os.PathLike) -> str | None:
    """What is wrong with a finished run's student.pt (missing, or not a readable dfkd model file), else None."""
    path = Path(run_dir) / "student.pt"
    if not path.is_file():
        return "its student.pt is missing"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file: truncated, overwritten, not a zip
        return f"its student.pt is unreadable ({type(e).__name__}: truncated or not a model file)"
    if not is_model_file(payload):
        return "its student.pt is not a dfkd model file"
    return None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               flag: str = "--model") -> tuple[nn.Module, ModelFile]:
    """Load a dfkd model file (weights only, no code runs) and return the model in eval mode and its metadata.

    `flag` names the command-line option the path came from, in error messages.
    """
    from dfkd.loading import read_weights_only

    payload = read_weights_only(path, flag)
    if not is_model_file(payload):
        raise DfkdError(f"{flag} {path}: not a dfkd model file (no 'format': '{FORMAT}' entry); "
                        "use `dfkd distill --teacher FILE --teacher-arch NAME` for a plain state_dict")
    model, meta = model_from_payload(payload, f"{flag} {path}")
    return model.to(device).eval(), meta
