"""Reading a user's teacher file safely (DESIGN §4).

Formats: dfkd model file, state_dict + architecture, TorchScript, `torch.export` archive, and a pickled module
only when the user trusts it.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfkd.errors import DfkdError
from dfkd.modelfile import is_model_file, load_state_checked, model_from_payload
from dfkd.models import MODELS, create
from dfkd.spec import InputSpec

PICKLE_HELP = ("it holds a pickled Python object, and unpickling can run arbitrary code. If you trust where the file "
               "comes from, add --trust-pickle; safer: save `model.state_dict()` and pass --teacher-arch")


@dataclass
class LoadedModel:
    """A module read from a user file, before it is wrapped as a Teacher."""

    module: nn.Module
    fmt: str  # "dfkd", "state_dict", "pickle", "torchscript", "export"
    spec: InputSpec | None
    arch: str | None = None
    arch_kwargs: dict[str, Any] | None = None
    class_names: list[str] | None = None


def check_file(path: str | os.PathLike, flag: str = "--teacher") -> Path:
    """Fail clearly on a missing, empty or non-regular file."""
    p = Path(path)
    if not p.exists():
        raise DfkdError(f"{flag} {p}: no such file; check the path")
    if not p.is_file():
        raise DfkdError(f"{flag} {p}: is a directory, not a model file")
    if p.stat().st_size == 0:
        raise DfkdError(f"{flag} {p}: the file is empty (an interrupted copy or save?); write it again")
    return p


def _zip_names(p: Path) -> list[str]:
    if not zipfile.is_zipfile(p):
        return []
    try:
        with zipfile.ZipFile(p) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


def sniff_format(p: Path) -> str:
    """Guess the container: "torchscript", "export" or "torch" (torch.save zip or legacy pickle)."""
    # Only the archive's top level counts: a TorchScript file holds code/__torch__/<pkg>/models/... for a user
    # package named `models`, which is not a sign of a torch.export archive.
    tops = [n.split("/")[1:3] for n in _zip_names(p)]
    if any(t == ["archive_format"] or t[:1] == ["models"] and len(t) > 1 for t in tops):
        return "export"
    if any(t == ["constants.pkl"] or t[:1] == ["code"] and len(t) > 1 for t in tops):
        return "torchscript"
    return "torch"


def read_weights_only(path: str | os.PathLike, flag: str = "--teacher") -> Any:
    """`torch.load(path, weights_only=True)` with one readable error line for every way it can fail."""
    p = check_file(path, flag)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # a valid pickle that names classes or functions: refuse, do not run them
            raise DfkdError(f"{flag} {p}: not loaded: {PICKLE_HELP}") from None
        raise DfkdError(f"{flag} {p}: not a readable PyTorch file ({_short(e)}); is it truncated or corrupt?") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, AttributeError) as e:
        raise DfkdError(f"{flag} {p}: not a readable PyTorch file ({_short(e)}); is it truncated or corrupt?") from None


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:200]


def import_class(target: str) -> type[nn.Module]:
    """Import `module:Class` from the current directory or PYTHONPATH."""
    mod_name, _, cls_name = target.partition(":")
    if not mod_name or not cls_name:
        raise DfkdError(f"--teacher-arch {target!r}: expected a zoo name or module:Class")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module
        raise DfkdError(f"--teacher-arch {target}: cannot import module {mod_name!r} ({_short(e)}); run from the "
                        "folder that holds it or add that folder to PYTHONPATH") from None
    cls = getattr(mod, cls_name, None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise DfkdError(f"--teacher-arch {target}: module {mod_name!r} has no nn.Module class {cls_name!r}")
    return cls


def _extract_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "net"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return {k.removeprefix("module."): v for k, v in obj.items()}
    return None


def _from_state_dict(state: dict[str, torch.Tensor], arch: str | None, spec: InputSpec | None, p: Path) -> LoadedModel:
    if arch is None:
        zoo = ", ".join(MODELS.names())
        raise DfkdError(f"--teacher {p}: a plain state_dict holds no architecture; add --teacher-arch NAME "
                        f"(one of: {zoo}) or --teacher-arch module:Class")
    if ":" in arch:
        module = import_class(arch)()
        load_state_checked(module, state, f"--teacher {p} with --teacher-arch {arch}")
        return LoadedModel(module, "state_dict", spec)
    try:
        MODELS.get(arch)
    except DfkdError as e:  # name the flag; the registry's message lists the zoo
        raise DfkdError(f"--teacher-arch {arch}: {e}") from None
    if spec is None:
        raise DfkdError(f"--teacher {p}: a state_dict carries no input spec; add --channels C --input-size S "
                        "(and --mean/--std)")
    classes = _classes_from_state(state)
    kwargs = {"num_classes": classes, "in_channels": spec.channels, "input_size": spec.size}
    module = create(arch, **kwargs)
    load_state_checked(module, state, f"--teacher {p} with --teacher-arch {arch}")
    return LoadedModel(module, "state_dict", spec, arch, kwargs)


def _classes_from_state(state: dict[str, torch.Tensor]) -> int:
    bias = [v for k, v in state.items() if k.endswith(".bias") and v.dim() == 1]
    return int(bias[-1].numel()) if bias else 10


def _load_torchscript(p: Path, spec: InputSpec | None) -> LoadedModel:
    try:
        module = torch.jit.load(str(p), map_location="cpu")
    except Exception as e:  # noqa: BLE001
        raise DfkdError(f"--teacher {p}: TorchScript archive could not be read ({_short(e)}); is it corrupt?") from None
    return LoadedModel(module, "torchscript", spec)


def _load_export(p: Path, spec: InputSpec | None) -> LoadedModel:
    try:
        ep = torch.export.load(str(p))
        module = torch.export.unflatten(ep)
    except Exception as e:  # noqa: BLE001
        raise DfkdError(f"--teacher {p}: torch.export archive could not be read ({_short(e)}); "
                        "is it corrupt?") from None
    return LoadedModel(module, "export", spec)


def load_user_model(
    path: str | os.PathLike,
    arch: str | None = None,
    trust_pickle: bool = False,
    spec: InputSpec | None = None,
) -> LoadedModel:
    """Read any supported teacher file. `spec` (from flags) overrides what the file says.

    Args:
        path: the user's file.
        arch: `--teacher-arch`: a zoo name or `module:Class`, for plain state_dicts.
        trust_pickle: allow unpickling a whole module (runs code from the file).
        spec: input spec from command-line flags, or None.

    Returns:
        The module (on CPU) with its format and input spec (None if neither the file nor the flags give one).
    """
    p = check_file(path)
    kind = sniff_format(p)
    if kind == "torchscript":
        return _load_torchscript(p, spec)
    if kind == "export":
        return _load_export(p, spec)
    try:
        obj = read_weights_only(p)
    except DfkdError as e:
        if trust_pickle and PICKLE_HELP in str(e):
            return _load_pickle(p, spec)
        raise
    if is_model_file(obj):
        module, meta = model_from_payload(obj, f"--teacher {p}")
        return LoadedModel(module, "dfkd", spec or meta.input_spec, meta.arch, meta.arch_kwargs, meta.class_names)
    state = _extract_state_dict(obj)
    if state is None:
        raise DfkdError(f"--teacher {p}: holds a {type(obj).__name__}, neither a dfkd model file nor a state_dict")
    return _from_state_dict(state, arch, spec, p)


def _load_pickle(p: Path, spec: InputSpec | None) -> LoadedModel:
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise DfkdError(f"--teacher {p}: the pickle could not be loaded ({_short(e)}); the classes it names must be "
                        "importable (run from the folder with their code)") from None
    if isinstance(obj, nn.Module):
        return LoadedModel(obj, "pickle", spec)
    if is_model_file(obj):
        module, meta = model_from_payload(obj, f"--teacher {p}")
        return LoadedModel(module, "dfkd", spec or meta.input_spec, meta.arch, meta.arch_kwargs, meta.class_names)
    raise DfkdError(f"--teacher {p}: the pickle holds a {type(obj).__name__}, not an nn.Module")
