"""Reading a user's teacher file safely (DESIGN §4).

Formats: dfkd model file, state_dict + architecture (a `torch.save` file or a `.safetensors` file, the format of
timm's and Hugging Face's weights), TorchScript, `torch.export` archive, an ONNX model (turned into a PyTorch
module by onnx2torch, an optional extra: the methods need the teacher's gradients, which ONNX Runtime does not
give), and a pickled module only when the user trusts it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfkd.archs import canonical_arch, importable_from_cwd, model_from_state, unwrapped
from dfkd.errors import DfkdError, first_line
from dfkd.export import SPEC_KEY, jit_load
from dfkd.modelfile import ARCHIVE_KINDS, is_model_file, model_from_payload
from dfkd.models import MODELS
from dfkd.spec import InputSpec

PICKLE_HELP = ("it holds a pickled Python object, and unpickling can run arbitrary code. If you trust where the file "
               "comes from, add --trust-pickle; safer: save `model.state_dict()` and pass --teacher-arch")


@dataclass
class LoadedModel:
    """A module read from a user file, before it is wrapped as a Teacher."""

    module: nn.Module
    fmt: str  # "dfkd", "state_dict", "pickle", "torchscript", "export", "onnx"
    spec: InputSpec | None
    arch: str | None = None
    arch_kwargs: dict[str, Any] | None = None
    class_names: list[str] | None = None
    num_classes: int | None = None  # what a dfkd model file declares
    declared: InputSpec | None = None  # the input spec the file declares (a dfkd file, `dfkd export`'s archives)
    top1: float | None = None  # the test top-1 a dfkd model file records (`dfkd train-teacher --eval-data`)
    notes: list[str] = field(default_factory=list)  # changes in how the file is read (each also warned of)


def _run_student(run: Path) -> str:
    """Where a run folder's model is: its student.pt, or the resume that writes it."""
    if (run / "student.pt").is_file():
        return f"give the student the run wrote, {run / 'student.pt'}"
    return f"the run has not written its student.pt yet: finish it (dfkd distill --resume {run}), then give that"


def check_file(path: str | os.PathLike, flag: str = "--teacher") -> Path:
    """Fail clearly on a missing, empty or non-regular file."""
    p = Path(path)
    if not p.exists():
        raise DfkdError(f"{flag} {p}: no such file; check the path")
    if not p.is_file():
        run = f"; {_run_student(p)}" if (p / "checkpoint.pt").is_file() else ""
        raise DfkdError(f"{flag} {p}: is a directory, not a model file{run}")
    if p.stat().st_size == 0:
        raise DfkdError(f"{flag} {p}: the file is empty (an interrupted copy or save?); write it again")
    try:
        with open(p, "rb"):
            pass
    except PermissionError:  # it was "not a readable PyTorch file (...); is it truncated or corrupt?"
        raise DfkdError(f"{flag} {p}: cannot read it (Permission denied); make it readable to you (chmod u+r) or "
                        "give a copy you can read") from None
    return p


def _zip_names(p: Path) -> list[str]:
    if not zipfile.is_zipfile(p):
        return []
    try:
        with zipfile.ZipFile(p) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


def _is_safetensors(p: Path) -> bool:
    """True for a safetensors file: an 8-byte little-endian header length, then that many bytes of JSON object."""
    try:
        with p.open("rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= struct.unpack("<Q", head[:8])[0] <= p.stat().st_size - 8


def read_safetensors(p: Path, flag: str = "--teacher") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (no code can run from one), with one readable error line."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise DfkdError(f"{flag} {p}: a safetensors file needs the safetensors package: pip install safetensors"
                        ) from None
    try:
        return load_file(str(p), device="cpu")
    except Exception as e:  # noqa: BLE001 - the library raises its own error types for every corrupt file
        raise DfkdError(f"{flag} {p}: not a readable safetensors file ({_short(e)}); is it truncated or corrupt?"
                        ) from None


def sniff_format(p: Path) -> str:
    """Guess the container: "torchscript", "export", "safetensors", "onnx" (by its name) or "torch".

    "torch" is a torch.save zip or a legacy pickle.
    """
    if _is_safetensors(p):
        return "safetensors"
    if p.suffix.lower() == ".onnx":
        return "onnx"
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
        if "GLOBAL" in str(e) or ("Unsupported operand" in str(e) and _names_code(p)):
            # a valid pickle that names classes or functions (any protocol): refuse, do not run them
            raise DfkdError(f"{flag} {p}: not loaded: {PICKLE_HELP}") from None
        raise DfkdError(f"{flag} {p}: not a readable PyTorch file ({_short(e)}); is it truncated or corrupt?") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, AttributeError, IndexError,
            TypeError) as e:
        npz = _npz_members(p)
        if npz:
            what = "a transfer file (dfkd synthesize): train from it with dfkd distill --transfer-data" \
                if "probs" in npz else f"an .npz of arrays ({', '.join(sorted(npz)[:4])}): data, not a model"
            raise DfkdError(f"{flag} {p}: is {what}") from None
        raise DfkdError(f"{flag} {p}: not a readable PyTorch file ({_short(e)}); is it truncated or corrupt?") from None


def _npz_members(p: Path) -> set[str]:
    """The array names of an .npz (a zip of .npy members), else an empty set."""
    names = _zip_names(p)
    return {n.removesuffix(".npy") for n in names} if names and all(n.endswith(".npy") for n in names) else set()


def _names_code(p: Path) -> bool:
    """True when the file's pickle parses and imports names (GLOBAL/STACK_GLOBAL), e.g. a module at protocol 4."""
    import pickletools

    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        else:
            data = p.read_bytes()
        return any(op.name in ("GLOBAL", "STACK_GLOBAL") for op, _, _ in pickletools.genops(data))
    except Exception:  # noqa: BLE001 - anything unparsable is not a pickle of code
        return False


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    if not s or "weights_only" in s[0] or isinstance(e, (KeyError, IndexError)):
        return f"no torch.save data in it: {type(e).__name__}"  # torch's advice to unpickle anyway does not apply
    return s[0][:200]


def refuse_quantized(obj: Any, what: str) -> None:
    """Refuse a model quantized by PyTorch (torch.ao.quantization: packed int8 weights), or its state_dict.

    Its activations are quantized per batch (dynamic) or its kernels are int8-only: dfkd needs the float model,
    whose gradients the inversion methods follow.
    """
    if isinstance(obj, nn.Module):
        quantized = any(type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized"))
                        for m in obj.modules())
    elif isinstance(obj, dict):
        quantized = any(isinstance(k, str) and k.endswith("_packed_params") for k in obj) or \
            any(torch.is_tensor(v) and v.is_quantized for v in obj.values())
    else:
        quantized = False
    if quantized:
        raise DfkdError(f"{what}: a quantized model (torch.ao.quantization, int8 packed weights); dfkd needs the "
                        "float model it was made from: give its weights from before quantize_dynamic/convert")


#: Where training checkpoints keep the model's state_dict.
STATE_KEYS = ("state_dict", "model", "model_state_dict", "model_state", "net")


def _extract_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict):
        for key in STATE_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if obj and any(str(k).startswith("module.") for k in obj):
            obj = {k: v for k, v in obj.items() if k != "n_averaged"}  # torch.optim.swa_utils.AveragedModel's count
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return {unwrapped(k): v for k, v in obj.items()}
    return None


def _from_state_dict(state: dict[str, torch.Tensor], arch: str | None, spec: InputSpec | None, p: Path,
                     arch_args: dict[str, Any] | None = None) -> LoadedModel:
    if arch is None:
        zoo = ", ".join(MODELS.names())
        raise DfkdError(f"--teacher {p}: a plain state_dict holds no architecture; add --teacher-arch NAME "
                        f"(one of: {zoo}), torchvision:NAME, timm:NAME or module:Class")
    module, kwargs, spec = model_from_state(state, arch, arch_args, spec, f"--teacher {p}")
    return LoadedModel(module, "state_dict", spec, canonical_arch(arch), kwargs)


def _spec_entry(text: str | bytes | None) -> InputSpec | None:
    """The input spec `dfkd export` writes into its files (`dfkd_spec`); None without one or if it does not parse."""
    try:
        return InputSpec.from_dict(json.loads(text)) if text else None
    except (ValueError, KeyError, TypeError):
        return None


def _load_torchscript(p: Path, spec: InputSpec | None) -> LoadedModel:
    extra = {SPEC_KEY: ""}
    try:
        module = jit_load(str(p), _extra_files=extra)
    except Exception as e:  # noqa: BLE001
        raise DfkdError(f"--teacher {p}: TorchScript archive could not be read ({_short(e)}); is it corrupt?") from None
    declared = _spec_entry(extra[SPEC_KEY])
    return LoadedModel(module, "torchscript", spec or declared, declared=declared)


def _load_onnx(p: Path, spec: InputSpec | None) -> LoadedModel:
    """An ONNX model as a PyTorch module (onnx2torch): no code runs from the file, it is a protobuf graph."""
    try:
        import onnx2torch
    except ImportError:
        raise DfkdError(f"--teacher {p}: an ONNX teacher is turned into a PyTorch module (the methods need its "
                        "gradients) by onnx2torch, which is not installed: pip install -e \".[onnx]\"") from None
    import onnx

    from dfkd.onnxgraph import ChannelsLastInput, for_onnx2torch, takes_channels_last

    # onnx2torch's Slice (a ViT's class-token slice, any multi-axis Slice) indexes with a list, which torch warns
    # about on every forward pass; the result is right (the same top-1 as the source model) and the user can do
    # nothing about it, so the warning is not shown.
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing",
                            category=UserWarning, module=r"onnx2torch\.")
    # Its Slice also notes, on the first forward, that it clips the INT64_MAX ends torch's newer exporter writes
    # for "to the end": the same slice.
    warnings.filterwarnings("ignore", message="Truncating the start/stop/step of slice", category=UserWarning,
                            module=r"onnx2torch\.")
    try:
        graph = onnx.load(str(p))
        if quantized_ops(graph):  # int8 (dfkd quantize, --quantize int8): onnxruntime runs it, without gradients
            return _load_quantized_onnx(p, graph, spec)
        module = onnx2torch.convert(for_onnx2torch(graph))
    except Exception as e:  # noqa: BLE001 - protobuf, onnx and the converter each raise their own errors
        why = first_line(e)
        why = f"{type(e).__name__} {why}" if isinstance(e, (KeyError, IndexError)) and str(e).strip() else why
        raise DfkdError(f"--teacher {p}: the ONNX model could not be turned into a PyTorch module ({why}); is it "
                        "corrupt, or does it use an operator onnx2torch lacks? A model that does can come as a "
                        "state_dict with --teacher-arch, a torch.export archive (torch.export.save) or TorchScript "
                        "instead") from None
    meta = {m.key: m.value for m in graph.metadata_props}
    declared = _spec_entry(meta.get(SPEC_KEY))
    spec = spec or declared
    notes = []
    if spec is not None and takes_channels_last(graph, spec.channels, spec.hw):
        module = ChannelsLastInput(module)
        notes.append(f"--teacher {p}: its graph takes channels-last images (N, {spec.size}, {spec.width}, "
                     f"{spec.channels}), as a Keras model converted to ONNX does; dfkd hands it its images in that "
                     "layout")
        warnings.warn(notes[-1], stacklevel=3)
    return LoadedModel(module, "onnx", spec, notes=notes, declared=declared)


#: Operators of a quantized (int8) ONNX graph, which onnx2torch cannot convert and gradients cannot pass.
QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                       "MatMulInteger", "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul"})


def quantized_ops(graph: Any) -> set[str]:
    """The quantization operators in an ONNX graph (empty for a float model)."""
    return {n.op_type for n in graph.graph.node} & QUANT_OPS


def _load_quantized_onnx(p: Path, graph: Any, spec: InputSpec | None) -> LoadedModel:
    from dfkd.onnxgraph import OnnxRuntimeModule

    meta = {m.key: m.value for m in graph.metadata_props}
    note = (f"--teacher {p}: an int8 ONNX model ({', '.join(sorted(quantized_ops(graph))[:3])}, ...): onnxruntime "
            "runs it; it gives outputs but no gradients, so it can be evaluated, or teach a student from your "
            "images (--method kd --data ...), not a data-free method")
    declared = _spec_entry(meta.get(SPEC_KEY))
    return LoadedModel(OnnxRuntimeModule(p), "onnx-int8", spec or declared, notes=[note], declared=declared)


class _Records(logging.Handler):
    """Keeps a logger's records instead of printing them."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def held_log(name: str):  # noqa: ANN202 - a generator context manager
    """The records of logger `name` and of its descendants, kept from the terminal while the block runs.

    Each logger's handlers are put back after it. Descendants count because torch gives some of its loggers their
    own handlers and stops them propagating (torch.fx's shape solver logs a whole traced graph when it gives up).
    """
    held = _Records()
    names = [name, *(n for n in list(logging.root.manager.loggerDict) if n.startswith(name + "."))]
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg.handlers[:], lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [held], False
    try:
        yield held.records
    finally:
        for lg, (handlers, propagate) in zip(loggers, saved, strict=True):
            lg.handlers, lg.propagate = handlers, propagate


def _load_export(p: Path, spec: InputSpec | None) -> LoadedModel:
    extra = {SPEC_KEY: ""}
    # torch.export.load logs the real error as a traceback and raises "check the warnings above": one line instead
    with held_log("torch.export") as records:
        try:
            ep = torch.export.load(str(p), extra_files=extra)
            module = torch.export.unflatten(ep)
        except Exception as e:  # noqa: BLE001
            cause = export_cause(e, records)
            if "CUDA device" in cause and not torch.cuda.is_available():  # it was called corrupt or truncated
                raise DfkdError(f"--teacher {p}: the torch.export archive holds CUDA weights (it was exported on a "
                                "GPU) and torch.export cannot map them to this machine, which has none; export it "
                                "again from the CPU (model.cpu() before torch.export.export), or give its "
                                "state_dict with --teacher-arch") from None
            raise DfkdError(f"--teacher {p}: torch.export archive could not be read ({cause}); "
                            "is it corrupt or truncated? Save it again with torch.export.save") from None
    declared = _spec_entry(extra[SPEC_KEY])
    return LoadedModel(module, "export", spec or declared, declared=declared)


def export_cause(e: Exception, records: list[logging.LogRecord]) -> str:
    """The first sentence of what went wrong: the error torch.export logged, else the one it raised."""
    cause = next((r.exc_info[1] for r in reversed(records) if r.exc_info and r.exc_info[1]), e)
    text = _short(cause)
    if "check the warnings above" in text:  # nothing was logged above: say what it means
        return "it does not hold a complete exported program"
    return text.split(". ")[0].rstrip(".")


def load_user_model(
    path: str | os.PathLike,
    arch: str | None = None,
    trust_pickle: bool = False,
    spec: InputSpec | None = None,
    arch_args: dict[str, Any] | None = None,
) -> LoadedModel:
    """Read any supported teacher file. `spec` (from flags) overrides what the file says.

    Args:
        path: the user's file.
        arch: `--teacher-arch`: a zoo name, `torchvision:NAME`, `timm:NAME` or `module:callable`, for plain
            state_dicts (see dfkd.archs).
        trust_pickle: allow unpickling a whole module (runs code from the file).
        spec: input spec from command-line flags, or None.
        arch_args: constructor arguments for `arch` (`--arch-arg KEY=VALUE`).

    Returns:
        The module (on CPU) with its format and input spec (None if neither the file nor the flags give one).
    """
    # A file that brings its network (a dfkd model file, an archive) does not use `arch`: commands share their
    # teacher options between files (`evaluate --model student.pt --teacher private.pt --teacher-arch ...`).
    p = check_file(path)
    kind = sniff_format(p)
    if kind == "torchscript":
        return _load_torchscript(p, spec)
    if kind == "export":
        return _load_export(p, spec)
    if kind == "onnx":
        return _load_onnx(p, spec)
    if kind == "safetensors":
        state = _extract_state_dict(read_safetensors(p))
        if state is None:
            raise DfkdError(f"--teacher {p}: the safetensors file holds no tensors; write the model's state_dict to it")
        return _from_state_dict(state, arch, spec, p, arch_args)
    try:
        obj = read_weights_only(p)
    except DfkdError as e:
        if trust_pickle and PICKLE_HELP in str(e):
            return _load_pickle(p, spec, arch, arch_args)
        raise
    if is_model_file(obj):
        return _from_model_file(obj, p, spec)
    state = _extract_state_dict(obj)
    refuse_quantized(obj if state is None else state, f"--teacher {p}")
    if state is None and isinstance(obj, dict) and {"config", "method", "step"} <= set(obj):  # dfkd's checkpoint.pt
        raise DfkdError(f"--teacher {p}: is a run's checkpoint (its training state), not a model; "
                        f"{_run_student(p.parent)}")
    if state is None:
        keys = f" with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else ""
        raise DfkdError(f"--teacher {p}: holds a {type(obj).__name__}{keys}, neither a dfkd model file nor a "
                        f"state_dict (nor one under {', '.join(STATE_KEYS)}); save the model's state_dict() alone")
    return _from_state_dict(state, arch, spec, p, arch_args)


def _from_model_file(payload: dict[str, Any], p: Path, spec: InputSpec | None) -> LoadedModel:
    module, meta = model_from_payload(payload, f"--teacher {p}")
    fmt = meta.arch if meta.arch in ARCHIVE_KINDS else "dfkd"  # a converted archive keeps its format's limits
    top1 = meta.provenance.get("top1")
    return LoadedModel(module, fmt, spec or meta.input_spec, meta.arch, meta.arch_kwargs, meta.class_names,
                       meta.num_classes, meta.input_spec,
                       top1=float(top1) if isinstance(top1, (int, float)) else None)


def _load_pickle(p: Path, spec: InputSpec | None, arch: str | None = None,
                 arch_args: dict[str, Any] | None = None) -> LoadedModel:
    """A trusted pickle: a whole module, a dfkd model file, or a training checkpoint that holds a state_dict."""
    importable_from_cwd()  # the classes it names, from the user's folder (as --teacher-arch module:Class)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        if "__main__" in str(e):  # pickled by a script run as a program: no other program can import its classes
            raise DfkdError(f"--teacher {p}: the pickle names classes of the script that saved it ({_short(e)}), "
                            "which no other program can import; in that script save model.state_dict() instead "
                            "and give --teacher-arch module:Class of a file that defines the class") from None
        raise DfkdError(f"--teacher {p}: the pickle could not be loaded ({_short(e)}); the classes it names must be "
                        "importable (run from the folder with their code, or add it to PYTHONPATH)") from None
    refuse_quantized(obj, f"--teacher {p}")
    if isinstance(obj, nn.Module):
        return LoadedModel(obj, "pickle", spec)
    if is_model_file(obj):
        return _from_model_file(obj, p, spec)
    state = _extract_state_dict(obj)  # a checkpoint whose other entries (hyper-parameters) are Python objects
    if state is not None:
        return _from_state_dict(state, arch, spec, p, arch_args)
    raise DfkdError(f"--teacher {p}: the pickle holds a {type(obj).__name__}, neither an nn.Module nor a state_dict")
