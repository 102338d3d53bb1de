"""Static int8 post-training quantization of a classifier, calibrated on synthetic images (`dfkd quantize`).

The library is onnxruntime's static quantization (`onnxruntime.quantization.quantize_static`) applied to the ONNX
export: QDQ format, int8 weights quantized per output channel (symmetric), int8 activations per tensor, ranges
calibrated on the images given (MinMax by default, Entropy or Percentile on request). Why onnxruntime rather than
torch's own flows: `torch.ao.quantization`'s eager/FX APIs are deprecated in favour of torchao's PT2E flow, and
torchao is not a dependency here; onnxruntime's quantizer is maintained, needs no code from dfkd at inference, and
the QDQ file it writes runs on onnxruntime's CPU kernels here and on servers (and converts to TensorRT/OpenVINO),
where a PyTorch-quantized model would run only inside PyTorch.

Three choices make the ranges independent of how well the calibration images imitate real data where they can be:
  - the logits (the graph output) stay float: the last Gemm reads int8 inputs and int8 weights but does not round
    its output to an int8 grid whose range the calibration images set. Synthetic images the student is unsure of
    give small logits (ZeroQ's on the MNIST demo: [-4.1, 4.6] against [-8.4, 13.0] on real digits), and an int8
    output clipped there turns the winning logits of real images into ties: 1.3 points of top-1 lost;
  - the input range is the exact range of valid pixels (0..255 normalised by the spec), not the calibration
    images' own extremes (low-contrast synthetic images would clip real pixels);
  - biases stay float32 in the file (`QuantizeBias` off): onnxruntime still runs every Conv/Gemm as an int8
    kernel (QLinearConv, QGemm; it quantizes the bias when it loads the model), and a float bias is one array
    where an int32 bias needs three (values, per-channel scales, zero points).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dfkd.errors import DfkdError
from dfkd.export import require, write_export
from dfkd.io import place_file, usual_permissions
from dfkd.outpaths import check_output_file
from dfkd.spec import InputSpec

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
CALIBRATION_BATCH = 64
#: Histogram bins of the Entropy search. `quantize_static` leaves onnxruntime's Entropy calibrator at 128 bins, as
#: many as its 128 quantized bins, so the KL search has one candidate, the full range: MinMax under another name.
#: 2048 is the bin count of the TensorRT method it implements (and of onnxruntime's Percentile).
ENTROPY_BINS = 2048


def _reader(ort_q: object, input_name: str, x: torch.Tensor) -> object:
    class Reader(ort_q.CalibrationDataReader):  # type: ignore[attr-defined,name-defined]
        def __init__(self) -> None:
            self.batches = iter(x.split(CALIBRATION_BATCH))

        def get_next(self) -> dict | None:
            b = next(self.batches, None)
            return None if b is None else {input_name: b.numpy()}

    return Reader()


def input_range(spec: InputSpec) -> tuple[float, float]:
    """The model-input values pixel 0 and pixel 255 map to, over every channel: the input's int8 range."""
    lo = spec.normalize(torch.zeros(spec.shape(1)))
    hi = spec.normalize(torch.ones(spec.shape(1)))
    both = torch.stack([lo, hi])
    return float(both.min()), float(both.max())


class _AxisNotes(logging.Filter):
    """Drops onnxruntime's "Axis 1 is out-of-range for weight 'w1' with rank 1", which read as errors.

    A 1-D weight has no axis 1 for per-channel quantization, so it takes one scale: nothing is wrong.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Axis ") or "is out-of-range for weight" not in str(record.msg)


@contextlib.contextmanager
def _quiet_axis_notes() -> Iterator[None]:
    notes = _AxisNotes()
    root = logging.getLogger()
    root.addFilter(notes)
    try:
        yield
    finally:
        root.removeFilter(notes)


def quantize_onnx(float_path: Path, int8_path: Path, calib: torch.Tensor, method: str = "minmax",
                  spec: InputSpec | None = None) -> None:
    """Static int8 QDQ quantization of an ONNX classifier with onnxruntime, per-channel int8 weights.

    Args:
        float_path: the float ONNX model (input named "input").
        int8_path: where to write the quantized model.
        calib: calibration inputs, normalised as the model expects, shape (N, C, S, S).
        method: activation-range calibration: "minmax", "entropy" or "percentile".
        spec: the input spec; given, the input's range is that of valid pixels (see the module docstring).
    """
    onnx = require("onnx")
    ort_q = require("onnxruntime.quantization")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise DfkdError(f"--calib-method {method}: unknown; choose one of {', '.join(CALIBRATION_METHODS)}")
    calibrate = {"minmax": ort_q.CalibrationMethod.MinMax, "entropy": ort_q.CalibrationMethod.Entropy,
                 "percentile": ort_q.CalibrationMethod.Percentile}[method]
    import numpy as np

    options: dict = {"QuantizeBias": False, "TensorQuantOverrides": {}}
    prepared = int8_path.with_name(int8_path.name + ".prep.onnx")
    try:
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)  # folds BN, infers shapes
        if method == "entropy":
            options["TensorQuantOverrides"] = entropy_ranges(ort_q, prepared, calib.float().cpu())
            calibrate = ort_q.CalibrationMethod.MinMax  # its ranges are all overridden: one cheap pass
        if spec is not None:
            lo, hi = input_range(spec)
            options["TensorQuantOverrides"]["input"] = [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
        with _quiet_axis_notes():
            ort_q.quantize_static(str(prepared), str(int8_path), _reader(ort_q, "input", calib.float().cpu()),
                                  quant_format=ort_q.QuantFormat.QDQ, per_channel=True,
                                  weight_type=ort_q.QuantType.QInt8, activation_type=ort_q.QuantType.QInt8,
                                  calibrate_method=calibrate, extra_options=options)
    finally:
        prepared.unlink(missing_ok=True)
    meta = {p.key: p.value for p in onnx.load(str(float_path)).metadata_props}
    q = onnx.load(str(int8_path))
    del q.metadata_props[:]
    for k, v in meta.items():
        entry = q.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(compact_onnx(float_outputs(q)), str(int8_path))


def entropy_ranges(ort_q: object, model_path: Path, calib: torch.Tensor) -> dict[str, list[dict]]:
    """Each activation's range by onnxruntime's Entropy (KL) calibrator with `ENTROPY_BINS` bins.

    Returned as `TensorQuantOverrides` entries. The calibrator's ranges are symmetric about zero; each is cut to
    the values the tensor took, so a tensor that is never negative (after a ReLU) keeps all 256 levels for [0, t].
    """
    import numpy as np
    from onnxruntime.quantization.calibrate import create_calibrator

    with tempfile.TemporaryDirectory(prefix="dfkd-entropy-") as d:
        cal = create_calibrator(str(model_path), None, str(Path(d) / "augmented.onnx"),
                                calibrate_method=ort_q.CalibrationMethod.Entropy,  # type: ignore[attr-defined]
                                extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": 128})
        cal.collect_data(_reader(ort_q, "input", calib))
        data = cal.compute_data()
        del cal
    out = {}
    for name, t in data.items():
        lo, hi = (float(v) for v in t.range_value)
        hist, edges = np.asarray(t.hist), np.asarray(t.bins)
        seen = np.nonzero(hist)[0]
        if len(seen):
            lo, hi = max(lo, float(edges[seen[0]])), min(hi, float(edges[seen[-1] + 1]))
        out[name] = [{"rmin": np.float32(min(lo, 0.0)), "rmax": np.float32(max(hi, 0.0))}]
    return out


def float_outputs(proto: object) -> object:
    """Remove the QuantizeLinear -> DequantizeLinear pair in front of each graph output: the logits stay float.

    The node that computed the output (the last Gemm) then writes it directly: its weights stay int8 and its
    inputs int8-rounded, and onnxruntime computes it in float (with a float bias it does not fuse it into QGemm;
    for the classifier's few hundred to few thousand weights that costs nothing measurable).
    """
    g = proto.graph  # type: ignore[attr-defined]
    outputs = {o.name for o in g.output}
    producers = {o: n for n in g.node for o in n.output}
    for dq in [n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] in outputs]:
        q = producers.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in producers:
            continue
        src = producers[q.input[0]]
        src.output[list(src.output).index(q.input[0])] = dq.output[0]
        g.node.remove(dq)
        g.node.remove(q)
    used = {i for n in g.node for i in n.input}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    return proto


#: Attributes whose absence the ONNX spec defines as all ones (dilations, strides) or all zeros (pads).
SPATIAL_DEFAULTS = {"dilations": 1, "strides": 1, "pads": 0}
SPATIAL_OPS = ("Conv", "MaxPool", "AveragePool")


def drop_default_attributes(proto: object) -> object:
    """Remove node attributes that only state their default value.

    Those are attributes equal to the schema's default, and for Conv and the pools dilations/strides of all ones and
    pads of all zeros, which the ONNX spec defines as the values when absent.
    """
    from onnx import defs, helper

    opset = {op.domain: op.version for op in proto.opset_import}  # type: ignore[attr-defined]
    for n in proto.graph.node:  # type: ignore[attr-defined]
        try:
            schema = defs.get_schema(n.op_type, opset.get(n.domain, opset.get("", 1)), n.domain)
        except Exception:  # noqa: BLE001 - an op without a schema here: keep its attributes
            continue
        for a in list(n.attribute):
            value = helper.get_attribute_value(a)
            default = schema.attributes[a.name].default_value if a.name in schema.attributes else None
            spatial = n.op_type in SPATIAL_OPS and a.name in SPATIAL_DEFAULTS
            if (default is not None and default.type and helper.get_attribute_value(default) == value) or (
                    spatial and all(v == SPATIAL_DEFAULTS[a.name] for v in value)):
                n.attribute.remove(a)
    return proto


def compact_onnx(proto: object) -> object:
    """Drop what inference does not need from an ONNX graph: shapes, names, docs, unused opset imports.

    Inferred shapes, node names and docs go, and so do opset imports of domains no node uses. Intermediate
    tensors and initializers get short names (t0, w0, ...); graph inputs and outputs keep theirs, and a graph with
    branches (If, Loop) keeps every name.
    For a LeNet-5-half the names and shapes are a third of the int8 file; for larger models they hardly count.
    """
    g = proto.graph  # type: ignore[attr-defined]
    del g.value_info[:]
    domains = {n.domain for n in g.node} | {"", "ai.onnx"}
    for op in [op for op in proto.opset_import if op.domain not in domains]:  # type: ignore[attr-defined]
        proto.opset_import.remove(op)  # type: ignore[attr-defined]
    drop_default_attributes(proto)
    if any(a.HasField("g") or len(a.graphs) for n in g.node for a in n.attribute):
        # a branch (If, Loop: a scripted network's control flow) reads outer tensors by name: renamed here, not
        # there, the graph was invalid (onnxruntime: "nodes must be topologically sorted")
        return proto
    keep = {v.name for v in g.input} | {v.name for v in g.output}
    rename = {t.name: f"w{i}" for i, t in enumerate(g.initializer) if t.name not in keep}
    for n in g.node:
        n.name, n.doc_string = "", ""
        for o in n.output:
            if o and o not in keep and o not in rename:
                rename[o] = f"t{len(rename)}"
    for t in g.initializer:
        t.name = rename.get(t.name, t.name)
    for n in g.node:
        n.input[:] = [rename.get(x, x) for x in n.input]
        n.output[:] = [rename.get(x, x) for x in n.output]
    return proto


def check_int8(path: Path, spec: InputSpec, num_classes: int) -> None:
    """The int8 file loads in onnxruntime alone and gives finite (B, classes) logits at two batch sizes."""
    ort = require("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 3):
        out = sess.run(None, {"input": spec.normalize(torch.rand(spec.shape(b))).numpy()})[0]
        if out.shape != (b, num_classes) or not torch.isfinite(torch.from_numpy(out)).all():
            raise DfkdError(f"quantization produced a model with logits of shape {out.shape} or non-finite values; "
                            "the file was not written")


@dataclass
class Quantized:
    """Paths of a quantization: the int8 file written and the float ONNX it was made from (in a temp folder)."""

    int8: Path
    float_onnx: Path


def quantize_model(model: nn.Module, spec: InputSpec, num_classes: int, calib: torch.Tensor,
                   out: str | os.PathLike, workdir: str | os.PathLike, force: bool = False,
                   method: str = "minmax", class_names: list[str] | None = None,
                   before: Callable[[Quantized], None] | None = None) -> Quantized:
    """Export `model` to ONNX in `workdir`, quantize it to int8 on `calib`, check it and move it to `out`.

    Args:
        model: the float classifier.
        spec: its input spec (recorded in the file as `dfkd_spec`).
        num_classes: its class count.
        calib: calibration inputs, normalised for `spec`, (N, C, S, S).
        out: the int8 ONNX file to write.
        workdir: a folder for the float ONNX export (kept there for comparisons; the caller removes it).
        force: overwrite an existing `out`.
        method: calibration method (see `quantize_onnx`).
        class_names: optional class names.
        before: what must finish before `out` appears (the command's measurements): called with the int8 file
            under its hidden temporary name; a stop signal meanwhile leaves no `out` behind that looks finished.

    Returns:
        The written int8 path and the float ONNX path in `workdir`.
    """
    out = check_output_file(out, force=force)
    float_onnx = Path(workdir) / "float.onnx"
    write_export(model, spec, num_classes, "onnx", float_onnx, class_names,
                 hint="int8 quantization starts from an ONNX export of the model, which this one does not take")
    onnx = require("onnx")
    onnx.save(compact_onnx(onnx.load(str(float_onnx))), str(float_onnx))  # compared with the int8 file: alike
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp.onnx", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        quantize_onnx(float_onnx, tmp, calib, method, spec)
        check_int8(tmp, spec, num_classes)
        usual_permissions(tmp)
        if before is not None:
            before(Quantized(tmp, float_onnx))
        place_file(tmp, out, force)
    finally:
        tmp.unlink(missing_ok=True)
    return Quantized(out, float_onnx)

