"""Post-training int8 quantization calibrated without data, and quantization-aware distillation (--quantize)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dfkd.calibration import calibration_pixels
from dfkd.cli.main import main
from dfkd.config import DistillConfig
from dfkd.deploy import QuantizeRequest, quantize_file
from dfkd.engine import distill
from dfkd.errors import DfkdError
from dfkd.modelfile import load_model
from dfkd.models import create
from dfkd.qat import FakeQuantConv2d, FakeQuantLinear, prepare_qat, strip_qat
from dfkd.spec import MNIST_SPEC
from dfkd.students import build_student
from dfkd.teacher import load_teacher
from dfkd.transfer import from_pixels, load_transfer
from tests.conftest import KWARGS, ZSKD_FAST

ort = pytest.importorskip("onnxruntime", reason="quantization needs onnxruntime (pip install -e '.[deploy]')")
onnx = pytest.importorskip("onnx", reason="quantization needs onnx (pip install -e '.[deploy]')")





def _run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])


# --- post-training quantization ---------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _short_latency(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dfkd.deploystats.LATENCY_SECONDS", 0.05)


def test_ptq_from_synthetic_calibration(sharp_teacher_file: str, transfer_file: str, eval_npz: str,
                                        tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    stats = quantize_file(QuantizeRequest(model=sharp_teacher_file, out=str(out), calibration="zskd",
                                          teacher=sharp_teacher_file, eval_data=eval_npz, num_calibration=64,
                                          params=ZSKD_FAST, seed=3))
    proto = onnx.load(str(out))
    scales = [t for t in proto.graph.initializer if onnx.numpy_helper.to_array(t).dtype == np.int8
              and onnx.numpy_helper.to_array(t).ndim == 4]
    assert scales, "int8 convolution weights"
    per_channel = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and
                   any(a.name == "axis" for a in n.attribute)]
    assert per_channel, "per-channel weight quantization"
    assert json.loads({p.key: p.value for p in proto.metadata_props}["dfkd_spec"])["num_classes"] == 10
    # The int8 model, loaded without dfkd, answers like its float source on teacher-like inputs.
    model = load_teacher(sharp_teacher_file)
    x = from_pixels(load_transfer(transfer_file).x, MNIST_SPEC)  # other zskd images than the calibration ones
    with torch.no_grad():
        agree = (_run_onnx(out, x).argmax(1) == model(x).argmax(1)).float().mean().item()
    assert agree >= 0.9
    assert stats.int8_bytes < 0.4 * stats.float_bytes and stats.float_ms > 0 and stats.int8_ms > 0
    assert stats.float_agreement == 1.0 and stats.int8_agreement is not None and stats.int8_agreement >= 0.85
    assert any("latency" in line for line in stats.lines())


def test_calibration_sources(transfer_file: str, eval_npz: str) -> None:
    noise = calibration_pixels("noise", 10, MNIST_SPEC)
    assert noise.shape == (10, 1, 32, 32) and noise.dtype == torch.uint8
    assert calibration_pixels(transfer_file, 20, MNIST_SPEC).shape == (20, 1, 32, 32)
    assert calibration_pixels(eval_npz, 20, MNIST_SPEC).shape == (20, 1, 28, 28)
    with pytest.raises(DfkdError, match="needs the teacher"):
        calibration_pixels("zskd", 8, MNIST_SPEC)
    with pytest.raises(DfkdError, match="no such file"):
        calibration_pixels("missing.npz", 8, MNIST_SPEC)
    with pytest.raises(DfkdError, match="unknown"):
        calibration_pixels("nosuchmethod", 8, MNIST_SPEC)


def test_cli_quantize(sharp_teacher_file: str, transfer_file: str, eval_npz: str, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    args = ["quantize", sharp_teacher_file, "--calibration", transfer_file, "--teacher", sharp_teacher_file,
            "--eval-data", eval_npz, "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    for word in ("size:", "latency:", "top-1:", "agreement:", "int8/float"):
        assert word in res.output
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "--force" in res.output


# --- quantization-aware distillation ----------------------------------------------------------------------------
def test_fake_quant_rounds_to_int8_and_passes_gradients() -> None:
    torch.manual_seed(0)
    m = create("lenet5_half", **KWARGS)
    keys = list(m.state_dict())
    prepare_qat(m)
    assert isinstance(m.stage1[0], FakeQuantConv2d) and isinstance(m.classifier, FakeQuantLinear)
    assert list(m.state_dict()) == keys
    x = torch.randn(4, 1, 32, 32)
    m(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    # The weights a conv computes with lie on a 255-level grid per output channel.
    w = m.stage3[0].weight.detach()
    from dfkd.qat import _fake_quant_weight

    q = _fake_quant_weight(w)
    step = w.abs().flatten(1).amax(1) / 127
    levels = q.flatten(1) / step[:, None]
    assert torch.allclose(levels, levels.round(), atol=1e-3) and not torch.equal(q, w)
    strip_qat(m)
    assert type(m.stage1[0]) is torch.nn.Conv2d
    with pytest.raises(DfkdError, match="--quantize int4"):
        prepare_qat(m, "int4")


def test_distill_quantize_learns_and_writes_int8(transfer_file: str, sharp_teacher_file: str, eval_npz: str,
                                                  tmp_path: Path) -> None:
    cfg = DistillConfig(method="transfer", transfer_data=transfer_file, teachers=(sharp_teacher_file,),
                        student="lenet5_half", steps=150, fid_every=0, eval_data=eval_npz, out=str(tmp_path / "run"),
                        params={"lr_s": 3e-3}, quantize="int8")
    result = distill(cfg)
    student, _ = load_model(result.run_dir / "student.pt")  # the float student loads as a plain zoo model
    deploy = json.loads((result.run_dir / "deploy.json").read_text())
    assert all(np.isfinite(v) for v in deploy.values() if isinstance(v, float))
    teacher = load_teacher(sharp_teacher_file)
    x = from_pixels(load_transfer(transfer_file).x, MNIST_SPEC)
    with torch.no_grad():
        t = teacher(x).argmax(1)
        fresh = (build_student("lenet5_half", KWARGS).eval()(x).argmax(1) == t).float().mean().item()
    int8 = (_run_onnx(result.run_dir / "student_int8.onnx", x).argmax(1) == t).float().mean().item()
    top = torch.bincount(t, minlength=10).max().item() / len(t)
    assert int8 > max(fresh, top) + 0.15, (int8, fresh, top)
    assert deploy["int8_bytes"] < deploy["float_bytes"]


def test_cli_distill_quantize(teacher_file: str, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["distill", "--teacher", teacher_file, "--method", "dfad", "--steps", "4",
                                    "-p", "batch_size=8", "-p", "s_steps=2", "--fid-every", "0", "--quantize", "int8",
                                    "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "int8 student:" in res.output and "latency:" in res.output
    assert (tmp_path / "run" / "student_int8.onnx").is_file()
    res = CliRunner().invoke(main, ["report", str(tmp_path / "run")])
    assert res.exit_code == 0 and "int8:     size:" in res.output and "int8/float" in res.output
