"""Post-training int8 quantization calibrated without data, and quantization-aware distillation (--quantize)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import dfkd.deploy
from dfkd.calibration import calibration_pixels
from dfkd.cli.main import main
from dfkd.config import DistillConfig
from dfkd.data import load_images, to_model_input
from dfkd.deploy import QuantizeRequest, _calibration_note, quantize_file
from dfkd.engine import distill
from dfkd.errors import DfkdError
from dfkd.evaluate import accuracy
from dfkd.modelfile import load_model
from dfkd.models import create
from dfkd.qat import FakeQuantConv2d, FakeQuantLinear, prepare_qat, strip_qat
from dfkd.quantize import _quiet_axis_notes
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


def test_a_quantize_stopped_while_it_measures_leaves_no_output(sharp_teacher_file: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # the int8 file was in place before the report: a SIGTERM then left a finished-looking --out, which the same
    # command run again refused as "already exists"
    def stopped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(dfkd.deploy, "measure", stopped)
    out = tmp_path / "q.onnx"
    with pytest.raises(KeyboardInterrupt):
        quantize_file(QuantizeRequest(model=sharp_teacher_file, out=str(out), calibration="noise",
                                      num_calibration=8))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    stats = quantize_file(QuantizeRequest(model=sharp_teacher_file, out=str(out), calibration="noise",
                                          num_calibration=8))
    assert out.is_file() and stats.int8_bytes == out.stat().st_size


def test_ptq_from_synthetic_calibration(sharp_teacher_file: str, transfer_file: str, eval_npz: str,
                                        tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    fast = {k: v for k, v in ZSKD_FAST.items() if k != "s_steps"}  # calibration sets s_steps 0 itself
    stats = quantize_file(QuantizeRequest(model=sharp_teacher_file, out=str(out),  # the default: zskd
                                          teacher=sharp_teacher_file, eval_data=eval_npz, num_calibration=64,
                                          params=fast, seed=3))
    assert "synthesized by zskd" in stats.calibration
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
    # The quantization error itself, int8 against its float source on the test images.
    assert 0.85 <= stats.int8_float_agreement <= 1.0 and 0.0 <= stats.int8_float_kl < 0.1
    assert any(line.startswith("int8 vs float: same top-1") for line in stats.lines())


def test_mean_kl_is_zero_for_the_same_logits_and_grows_with_the_error() -> None:
    from dfkd.deploystats import mean_kl

    ref = torch.randn(200, 10, generator=torch.Generator().manual_seed(0)) * 3
    noise = torch.randn(200, 10, generator=torch.Generator().manual_seed(1))
    assert mean_kl(ref, ref) == pytest.approx(0.0, abs=1e-12)
    assert mean_kl(ref, ref + 5.0) == pytest.approx(0.0, abs=1e-9)  # a shift of every logit changes no softmax
    small, large = mean_kl(ref, ref + 0.1 * noise), mean_kl(ref, ref + noise)
    assert 0 < small < large


def test_onnxruntimes_one_scale_notes_are_not_passed_on(caplog: pytest.LogCaptureFixture) -> None:
    # a WRN student's quantize printed seven "WARNING:root:Axis 1 is out-of-range for weight 'w1' with rank 1"
    with caplog.at_level(logging.WARNING), _quiet_axis_notes():
        logging.warning("Axis 1 is out-of-range for weight 'w1' with rank 1")
        logging.warning("calibration failed")
    assert [r.getMessage() for r in caplog.records] == ["calibration failed"]


def test_calibration_sources(transfer_file: str, eval_npz: str) -> None:
    noise = calibration_pixels("noise", 10, MNIST_SPEC)
    assert noise.shape == (10, 1, 32, 32) and noise.dtype == torch.uint8
    assert calibration_pixels(transfer_file, 20, MNIST_SPEC).shape == (20, 1, 32, 32)
    assert calibration_pixels(eval_npz, 20, MNIST_SPEC).shape == (20, 1, 28, 28)
    with pytest.raises(DfkdError, match="needs the teacher"):
        calibration_pixels("zskd", 8, MNIST_SPEC)
    with pytest.raises(DfkdError, match="no such file"):
        calibration_pixels("missing.npz", 8, MNIST_SPEC)
    for name in ("nosuchmethod", "calib.npy"):  # "unknown method" of a file that is missing
        with pytest.raises(DfkdError, match=f"^--calibration {name}: neither a method .* nor an existing file"):
            calibration_pixels(name, 8, MNIST_SPEC)
    with pytest.raises(DfkdError, match=r"^--calibration \./nodir: no such file or folder$"):  # "unknown method"
        calibration_pixels("./nodir", 8, MNIST_SPEC)


def test_calibration_reads_an_image_folder(tmp_path: Path) -> None:
    # an existing image folder was "--calibration DIR: no such file"
    for i in range(6):
        (tmp_path / str(i % 2)).mkdir(exist_ok=True)
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(tmp_path / str(i % 2) / f"{i}.png")
    x = calibration_pixels(str(tmp_path), 8, MNIST_SPEC)
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.uint8 and sorted(x[:, 0, 0, 0].tolist()) == \
        [0, 40, 80, 120, 160, 200]
    assert calibration_pixels(str(tmp_path), 4, MNIST_SPEC).shape == (4, 1, 28, 28)
    # it was said to be "synthesized by" the folder
    assert _calibration_note(str(tmp_path), 6, "minmax") == f"6 images, read from {tmp_path}, minmax ranges"
    assert _calibration_note("zskd", 6, "minmax") == "6 images, synthesized by zskd, minmax ranges"


@pytest.mark.parametrize("shape, match", [((0, 28, 28), "holds no images"), ((4, 5, 28, 28), "have 5 channels")])
def test_calibration_refuses_a_file_an_int8_model_cannot_be_calibrated_on(tmp_path: Path, shape: tuple[int, ...],
                                                                          match: str) -> None:
    # calibrated on 0 images, the written int8 file answered logits of -149 and 386 where the float model's were
    # near 1, and quantize said nothing
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros(shape, np.uint8), y=np.zeros(shape[0], np.int64))
    with pytest.raises(DfkdError, match=f"--calibration {path}: .*{match}"):
        calibration_pixels(str(path), 8, MNIST_SPEC)


def test_calibration_refuses_colour_images_for_a_grey_model(tmp_path: Path) -> None:
    # CIFAR images calibrated an MNIST model, averaged to grey, and quantize said nothing
    path = tmp_path / "cifar.npz"
    np.savez(path, x=np.zeros((4, 32, 32, 3), np.uint8), y=np.zeros(4, np.int64))
    with pytest.raises(DfkdError, match=f"--calibration {path}: images have 3 channels, the model takes 1"):
        calibration_pixels(str(path), 8, MNIST_SPEC)


def test_quantize_refuses_a_teacher_of_other_inputs_or_classes(sharp_teacher_file: str, transfer_file: str,
                                                               tmp_path: Path) -> None:
    # an MNIST model with a CIFAR teacher calibrated on the teacher's colour images and wrote an int8 file
    from dfkd.modelfile import ModelFile, save_model
    from dfkd.spec import InputSpec

    colour = tmp_path / "colour.pt"
    kwargs = {**KWARGS, "in_channels": 3}
    spec = InputSpec(3, 32, (0.5,), (0.5,))
    save_model(colour, create("lenet5_half", **kwargs), ModelFile("lenet5_half", kwargs, spec, 10))
    with pytest.raises(DfkdError, match=r"--teacher .*colour.pt: takes 3x32x32 inputs, the model 1x32x32"):
        quantize_file(QuantizeRequest(model=sharp_teacher_file, teacher=str(colour), out=str(tmp_path / "q.onnx"),
                                      calibration=transfer_file))
    assert not (tmp_path / "q.onnx").exists()
    with pytest.raises(DfkdError, match=r"--teacher .*: has 10 classes, the model 5"):
        calibration_pixels(transfer_file, 8, MNIST_SPEC, load_teacher(sharp_teacher_file), num_classes=5)
    with pytest.raises(DfkdError, match=r"--out .*q\.pt: dfkd quantize writes an int8 ONNX model; give a name ending"):
        quantize_file(QuantizeRequest(model=sharp_teacher_file, out=str(tmp_path / "q.pt"), calibration=transfer_file))
    assert not (tmp_path / "q.pt").exists()  # it wrote ONNX under the .pt name
    five = tmp_path / "five.pt"
    save_model(five, create("lenet5_half", **{**KWARGS, "num_classes": 5}),
               ModelFile("lenet5_half", {**KWARGS, "num_classes": 5}, MNIST_SPEC, 5))
    with pytest.raises(DfkdError, match=r"--teacher .*: has 10 classes, the model 5"):  # quantize passes the count
        quantize_file(QuantizeRequest(model=str(five), teacher=sharp_teacher_file, out=str(tmp_path / "q.onnx"),
                                      calibration=transfer_file))


def test_calibration_skips_the_student_steps_of_batch_methods(sharp_teacher_file: str) -> None:
    from dfkd.calibration import calibration_params

    t = load_teacher(sharp_teacher_file)
    assert calibration_params(t, "zskd", None) == {"s_steps": 0}
    assert calibration_params(t, "deepinversion", {"iterations": 5}) == {"iterations": 5, "s_steps": 0}
    assert calibration_params(t, "zskd", {"s_steps": 7}) == {"s_steps": 7}  # the user's value stays
    assert calibration_params(t, "dfad", None) == {}  # a generator learns against the student: its recipe stays


def test_cli_quantize(sharp_teacher_file: str, transfer_file: str, eval_npz: str, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    args = ["quantize", sharp_teacher_file, "--calibration", transfer_file, "--teacher", sharp_teacher_file,
            "--eval-data", eval_npz, "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    for word in ("size:", "latency:", "top-1:", "agreement:", "int8/float", "int8 vs float:"):
        assert word in res.output
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "--force" in res.output
    res = CliRunner().invoke(main, ["quantize", sharp_teacher_file, "--out", str(tmp_path / "d.onnx")])
    assert res.exit_code == 2 and "--calibration zskd" in res.output and "--teacher" in res.output  # the default


# --- quantization-aware distillation ----------------------------------------------------------------------------
def test_quantize_sends_a_teacher_that_needs_options_to_convert(sharp_teacher_file: str, tmp_path: Path) -> None:
    # quantize has no --teacher-arch: the loader's "add --teacher-arch" named a flag it refuses
    state = tmp_path / "teacher_sd.pt"
    torch.save(load_teacher(sharp_teacher_file).module.state_dict(), state)
    with pytest.raises(DfkdError, match=r"takes no teacher options.*dfkd convert --teacher .*teacher_sd.pt"):
        quantize_file(QuantizeRequest(model=sharp_teacher_file, teacher=str(state), out=str(tmp_path / "q.onnx")))
    assert not (tmp_path / "q.onnx").exists()


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
    # the accuracy shown beside student.pt is its float weights' (it was the fake-quantized network's)
    assert result.metrics["top1"] == pytest.approx(deploy["float_top1"], abs=1e-6)
    assert result.metrics["top1"] == pytest.approx(accuracy(student, load_images(eval_npz), MNIST_SPEC, "cpu")["top1"])
    assert "top1_fakequant" in result.metrics


def test_cli_distill_quantize(teacher_file: str, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["distill", "--teacher", teacher_file, "--method", "dfad", "--steps", "4",
                                    "-p", "batch_size=8", "-p", "s_steps=2", "--fid-every", "0", "--quantize", "int8",
                                    "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "int8 student:" in res.output and "latency:" in res.output
    assert (tmp_path / "run" / "student_int8.onnx").is_file()
    res = CliRunner().invoke(main, ["report", str(tmp_path / "run")])
    assert res.exit_code == 0 and "int8:     size:" in res.output and "int8/float" in res.output


def test_an_int8_onnx_file_is_evaluated_and_refused_as_a_data_free_teacher(teacher_file: str, eval_npz: str,
                                                                          tmp_path: Path) -> None:
    # dfkd evaluate said dfkd's own int8 file "could not be turned into a PyTorch module ... is it corrupt?"
    res = CliRunner().invoke(main, ["distill", "--teacher", teacher_file, "--method", "dfad", "--steps", "2",
                                    "-p", "batch_size=8", "--fid-every", "0", "--quantize", "int8",
                                    "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    int8 = tmp_path / "run" / "student_int8.onnx"
    res = CliRunner().invoke(main, ["evaluate", "--model", str(int8), "--data", eval_npz, "--json"])
    assert res.exit_code == 0, res.output
    data = load_images(eval_npz)
    x = to_model_input(data.x, MNIST_SPEC)
    expected = (_run_onnx(int8, x).argmax(1) == data.y).float().mean().item()
    assert json.loads(res.stdout)["top1"] == pytest.approx(expected)
    res = CliRunner().invoke(main, ["distill", "--teacher", str(int8), "--method", "dfad", "--steps", "2",
                                    "--out", str(tmp_path / "d")])
    assert res.exit_code == 2 and "an int8 ONNX model passes no gradients, which --method dfad needs" in res.output
    assert not (tmp_path / "d").exists()
    # export (an IndexError) and quantize (onnxruntime's "Invalid input name") of the int8 file: one line each
    for command, what, out in ((["export", str(int8), "--format", "onnx"], "exported", "again.onnx"),
                               (["quantize", str(int8), "--calibration", "noise"], "quantized again", "again.onnx"),
                               (["convert", "--teacher", str(int8)], "converted", "again.pt")):  # "save a state_dict"
        res = CliRunner().invoke(main, [*command, "--out", str(tmp_path / out)])
        assert res.exit_code == 2 and f"an int8 ONNX model (onnxruntime's quantized operators) cannot be {what}" \
            in res.output, res.output
        assert not (tmp_path / out).exists()


def test_cli_quantize_takes_the_input_spec_of_a_state_dict(sharp_teacher_file: str, tmp_path: Path) -> None:
    # the loader told a state_dict's user to add --channels and --input-size, which quantize did not take
    state = tmp_path / "sd.pt"
    torch.save(load_teacher(sharp_teacher_file).module.state_dict(), state)
    args = ["quantize", str(state), "--arch", "lenet5_bn", "--calibration", "noise", "--num-calibration", "8"]
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a.onnx")])
    assert res.exit_code == 2 and "add --channels C --input-size S" in res.output
    spec = ["--channels", "1", "--input-size", "32", "--mean", "0.1307", "--std", "0.3081"]
    res = CliRunner().invoke(main, [*args, *spec, "--out", str(tmp_path / "a.onnx")])
    assert res.exit_code == 0, res.output
    assert _run_onnx(tmp_path / "a.onnx", torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def test_a_torchscript_model_is_quantized(sharp_teacher_file: str, tmp_path: Path) -> None:
    # its scripted control flow became ONNX If branches, whose outer names compact_onnx renamed: "invalid model"
    from dfkd.deploy import export_file

    export_file(sharp_teacher_file, "torchscript", tmp_path / "t.pt")
    quantize_file(QuantizeRequest(model=str(tmp_path / "t.pt"), calibration="noise", num_calibration=8,
                                  out=str(tmp_path / "q.onnx")))
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_teacher(sharp_teacher_file)(x).argmax(1)
    assert _run_onnx(tmp_path / "q.onnx", x).shape == (3, 10)
    assert (_run_onnx(tmp_path / "q.onnx", x).argmax(1) == expected).float().mean() >= 2 / 3


def test_a_model_onnx_cannot_take_is_told_without_a_format_quantize_lacks(sharp_teacher_file: str, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # it said "try another --format": quantize has no --format
    import dfkd.export

    def fails(*args: object) -> None:
        raise RuntimeError("an operator ONNX lacks")

    monkeypatch.setitem(dfkd.export.WRITERS, "onnx", fails)
    with pytest.raises(DfkdError, match=r"export to onnx failed \(an operator ONNX lacks\); int8 quantization "
                                        r"starts from an ONNX export of the model"):
        quantize_file(QuantizeRequest(model=sharp_teacher_file, calibration="noise", num_calibration=8,
                                      out=str(tmp_path / "q.onnx")))
    assert not (tmp_path / "q.onnx").exists()


def test_cli_quantize_names_options_a_calibration_file_leaves_unused(sharp_teacher_file: str, transfer_file: str,
                                                                      tmp_path: Path) -> None:
    # -p, --synth-steps and a --teacher without --eval-data did nothing with a file or noise, unsaid
    with pytest.warns(UserWarning, match=r"^-p, --synth-steps, --teacher have no effect: --calibration noise"):
        res = CliRunner().invoke(main, ["quantize", sharp_teacher_file, "--teacher", sharp_teacher_file,
                                        "--calibration", "noise", "--num-calibration", "8", "-p", "di_iters=3",
                                        "--synth-steps", "4", "--out", str(tmp_path / "n.onnx")])
    assert res.exit_code == 0, res.output
    with pytest.warns(UserWarning, match=r"^-p has no effect: --calibration .*\.npz"):
        res = CliRunner().invoke(main, ["quantize", sharp_teacher_file, "--calibration", transfer_file,
                                        "--num-calibration", "8", "-p", "lr_di=5", "--out", str(tmp_path / "f.onnx")])
    assert res.exit_code == 0, res.output


# --- what the int8 file holds -----------------------------------------------------------------------------------
def _quantize_lenet(pixels: torch.Tensor, tmp_path: Path, model: torch.nn.Module | None = None):  # noqa: ANN202
    from dfkd.data import to_model_input
    from dfkd.quantize import quantize_model

    torch.manual_seed(0)
    model = (model or build_student("lenet5_half", KWARGS)).eval()
    work = tmp_path / "work"
    work.mkdir()
    q = quantize_model(model, MNIST_SPEC, 10, to_model_input(pixels, MNIST_SPEC), tmp_path / "q.onnx", work)
    return model, q


def _init(proto: object, name: str) -> np.ndarray:
    return next(onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == name)


def test_int8_input_range_is_every_pixel_and_logits_stay_float(sharp_teacher_file: str, tmp_path: Path) -> None:
    """Calibration images far dimmer than real ones: the input's int8 range is still that of every valid pixel,
    and the logits are float (not rounded to 256 levels over the small range the dim images give them)."""
    from dfkd.quantize import input_range

    dim = torch.randint(0, 40, (64, 1, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    model, q = _quantize_lenet(dim, tmp_path, load_teacher(sharp_teacher_file).module)
    proto = onnx.load(str(q.int8))
    q_in = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    lo, hi = input_range(MNIST_SPEC)
    scale, zero = float(_init(proto, q_in.input[1])), int(_init(proto, q_in.input[2]))
    assert scale == pytest.approx((hi - lo) / 255, rel=1e-5) and (-128 - zero) * scale == pytest.approx(lo, abs=scale)
    assert next(n for n in proto.graph.node if "logits" in n.output).op_type == "Gemm"  # no Q/DQ pair after it
    bright = from_pixels(torch.randint(0, 256, (200, 1, 32, 32), generator=torch.Generator().manual_seed(1),
                                       dtype=torch.uint8), MNIST_SPEC)
    i8 = _run_onnx(q.int8, bright)
    assert i8.unique().numel() > 1000 and torch.isfinite(i8).all()


def test_int8_file_is_under_0_3_of_float_and_keeps_its_answers(tmp_path: Path) -> None:
    """LeNet-5-half (16K weights): int8 weights, float biases and logits, compact graph: <= 0.3x the float file.

    The compaction (default attributes, unused opsets, short names) leaves the float ONNX's answers unchanged.
    """
    from dfkd.io import usual_permissions

    pixels = calibration_pixels("noise", 64, MNIST_SPEC)
    model, q = _quantize_lenet(pixels, tmp_path)
    float_bytes, int8_bytes = q.float_onnx.stat().st_size, q.int8.stat().st_size
    assert int8_bytes <= 0.3 * float_bytes, (int8_bytes, float_bytes)
    proto = onnx.load(str(q.int8))
    kinds = {onnx.numpy_helper.to_array(t).dtype for t in proto.graph.initializer}
    assert np.int32 not in kinds  # biases are float, not int32 values + scales + zero points
    weights = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if len(t.dims) >= 2]
    assert weights and all(w.dtype == np.int8 for w in weights)
    assert [op.domain for op in proto.opset_import] == [""]
    x = from_pixels(pixels[:8], MNIST_SPEC)
    with torch.no_grad():
        assert torch.allclose(_run_onnx(q.float_onnx, x), model(x), atol=1e-4)
    ref = tmp_path / "mode"
    ref.touch(mode=0o600)
    usual_permissions(ref)
    assert q.int8.stat().st_mode & 0o777 == ref.stat().st_mode & 0o777 != 0o600


def _activation_scales(path: Path) -> list[tuple[float, int]]:
    """(scale, zero point) of every QuantizeLinear after the input's, in graph order."""
    proto = onnx.load(str(path))
    return [(float(_init(proto, n.input[1])), int(_init(proto, n.input[2]))) for n in proto.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] != "input"]


def test_entropy_ranges_clip_what_minmax_keeps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--calib-method entropy` is not MinMax under another name (onnxruntime's 128-bin default would make it so):
    the KL search cuts long tails, so some activation ranges shrink and none grows; ReLU outputs keep [0, t]."""
    from dfkd.data import to_model_input
    from dfkd.quantize import quantize_model

    monkeypatch.setattr("dfkd.quantize.ENTROPY_BINS", 512)  # a real search (192 candidates), 5x quicker than 2048

    torch.manual_seed(0)
    model = build_student("lenet5_half", KWARGS).eval()
    calib = to_model_input(calibration_pixels("noise", 128, MNIST_SPEC), MNIST_SPEC)
    scales = {}
    for method in ("minmax", "entropy"):
        work = tmp_path / method
        work.mkdir()
        q = quantize_model(model, MNIST_SPEC, 10, calib, tmp_path / f"{method}.onnx", work, method=method)
        scales[method] = _activation_scales(q.int8)
    assert len(scales["minmax"]) == len(scales["entropy"]) > 2
    pairs = list(zip(scales["minmax"], scales["entropy"], strict=True))
    assert all(e[0] <= m[0] * (1 + 1e-4) for m, e in pairs)
    assert sum(e[0] < 0.9 * m[0] for m, e in pairs) >= 2
    assert any(z == -128 for _, z in scales["entropy"])  # a never-negative tensor: its range starts at 0
