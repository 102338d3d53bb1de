"""A teacher whose inputs are not square (`--input-size HxW`) through distill, resume, evaluate, synthesize,
--transfer-data, convert and export; square specs keep the files they always had."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dfkd
from dfkd.cli.main import main
from dfkd.errors import DfkdError
from dfkd.methods import get_method
from dfkd.spec import InputSpec, parse_size
from tests.conftest import user_module

#: A teacher that takes 28 x 56 images only: its classifier is a Linear over every feature map position.
WIDE_NET = """
import torch
from torch import nn


class Wide(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 14 * 28, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(nn.functional.max_pool2d(x, 2).flatten(1))
"""

FLAGS = ("--teacher-arch", "widenet:Wide", "--channels", "1", "--input-size", "28x56", "--mean", "0.5", "--std", "0.5")


def _cli(*args: object, code: int = 0) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == code, res.output
    return res.output


def _json(*args: object) -> dict:
    """A command's --json answer, read from its stdout alone (warnings go to stderr)."""
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _quick(method: str) -> list[str]:
    return [a for k, v in get_method(method).quick.items() for a in ("-p", f"{k}={json.dumps(v)}")]


@pytest.fixture
def wide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    wide_class = user_module(tmp_path, monkeypatch, "widenet", WIDE_NET).Wide
    torch.manual_seed(0)
    net = wide_class().train()
    with torch.no_grad():  # BatchNorm statistics that are not the defaults
        net(torch.randn(16, 1, 28, 56) * 0.7 + 0.2)
    torch.save(net.eval().state_dict(), tmp_path / "wide.pt")
    rng = np.random.default_rng(0)  # MNIST-shaped test images: resized to the teacher's 28 x 56
    np.savez(tmp_path / "test.npz", x=rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), y=rng.integers(0, 10, 12))
    return tmp_path / "wide.pt"


def test_input_sizes_parse_and_square_specs_keep_their_format() -> None:
    assert parse_size("28x56") == (28, 56) and parse_size("28X56") == (28, 56) and parse_size([28, 56]) == (28, 56)
    assert parse_size("32") == 32 and parse_size("32x32") == 32 and parse_size(32) == 32
    for bad in ("", "x", "28x", "28x56x3", "28.5", "twenty"):
        with pytest.raises(DfkdError, match="HxW"):
            parse_size(bad)
    square = InputSpec(1, 32, (0.5,), (0.5,))
    assert square.to_dict() == {"channels": 1, "size": 32, "mean": [0.5], "std": [0.5]}, "older readers' format"
    assert square == InputSpec(1, 32, (0.5,), (0.5,), width=32) and square.shape(2) == (2, 1, 32, 32)
    wide = InputSpec(1, 28, (0.5,), (0.5,), width=56)
    assert wide.shape(2) == (2, 1, 28, 56) and wide.hw == (28, 56) and wide.side == 28 and not wide.square
    assert InputSpec.from_dict(wide.to_dict()) == wide and wide.describe() == "1x28x56"
    with pytest.raises(DfkdError, match="past what dfkd takes"):
        InputSpec(1, 28, (0.5,), (0.5,), width=5000)


def test_a_square_probe_says_how_to_give_a_non_square_input(wide: Path) -> None:
    out = _cli("distill", "--teacher", wide, *FLAGS[:5], "28", *FLAGS[6:], "--method", "dfad", "--steps", "2",
               code=2)
    assert "does not accept inputs of shape (2, 1, 28, 28)" in out and "HxW" in out
    assert "each side must be at least 8" in _cli("distill", "--teacher", wide, *FLAGS[:5], "28x4", *FLAGS[6:],
                                                  code=2)
    assert "28y56" in _cli("distill", "--teacher", wide, *FLAGS[:5], "28y56", *FLAGS[6:], code=2)


@pytest.mark.parametrize("method", ["fast", "dfad", "deepinversion", "zskd"])
def test_every_family_distills_a_non_square_teacher(wide: Path, tmp_path: Path, method: str) -> None:
    run = tmp_path / "run"
    out = _cli("distill", "--teacher", wide, *FLAGS, "--method", method, "--steps", "2", "--fid-every", "0",
               "--eval-data", tmp_path / "test.npz", "--out", run, *_quick(method))
    assert "test top-1" in out
    student = torch.load(run / "student.pt", weights_only=True)
    assert student["input_spec"]["size"] == 28 and student["input_spec"]["width"] == 56
    assert json.loads((run / "config.json").read_text())["input_size"] == [28, 56]
    result = _json("evaluate", "--model", run / "student.pt", "--data", tmp_path / "test.npz",
                             "--teacher", wide, *FLAGS, "--json")
    assert result["n"] == 12 and 0 <= result["agreement"] <= 1


def test_a_non_square_run_resumes_and_its_config_file_takes_height_and_width(wide: Path, tmp_path: Path) -> None:
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"teacher_arch": "widenet:Wide", "channels": 1, "input_size": [28, 56],
                                  "mean": [0.5], "std": [0.5], "params": {"batch_size": 8}}))
    _cli("distill", "--config", config, "--teacher", wide, "--method", "dfad", "--steps", "2", "--fid-every", "0",
         "--out", tmp_path / "run")
    _cli("distill", "--resume", tmp_path / "run", "--steps", "4")
    lines = [json.loads(a) for a in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [a["step"] for a in lines if a.get("event") == "finished"][-1] == 4
    config.write_text(json.dumps({"input_size": [28, 56, 3]}))
    assert "input_size" in _cli("distill", "--config", config, "--teacher", wide, "--method", "dfad", code=2)


def test_synthesized_files_convert_and_export_keep_the_shape(wide: Path, tmp_path: Path) -> None:
    _cli("synthesize", "--teacher", wide, *FLAGS, "--method", "deepinversion", "--num", "4", "-p", "iterations=1",
         "--out", tmp_path / "syn.npz")
    with np.load(tmp_path / "syn.npz") as d:
        assert d["x"].shape == (4, 1, 28, 56) and int(d["width"]) == 56
    assert "4 of 1x28x56" in _cli("report", tmp_path / "syn.npz")
    _cli("distill", "--transfer-data", tmp_path / "syn.npz", "--teacher", wide, *FLAGS, "--steps", "2",
         "--fid-every", "0", "--out", tmp_path / "from_file")
    assert torch.load(tmp_path / "from_file" / "student.pt", weights_only=True)["input_spec"]["width"] == 56

    assert "1x28x56 inputs" in _cli("convert", "--teacher", wide, *FLAGS, "--out", tmp_path / "teacher.pt")
    with pytest.warns(UserWarning, match="the file declares 1x28x56 inputs; --channels/--input-size make it 1x28x28"):
        out = _cli("distill", "--teacher", tmp_path / "teacher.pt", *FLAGS[2:5], "28", *FLAGS[6:], "--steps", "2",
                   code=2)  # flags that overrule the file's own shape are named before the probe refuses them
    assert "does not accept inputs of shape (2, 1, 28, 28)" in out
    pytest.importorskip("onnxruntime")
    out = _cli("export", tmp_path / "teacher.pt", "--format", "onnx", "--out", tmp_path / "teacher.onnx")
    assert "reproduces the source logits" in out


def test_a_non_square_zoo_student_exported_to_onnx_reads_back(tmp_path: Path) -> None:
    """A LeNet's adaptive pool at a ratio that is not whole goes through torch's newer ONNX exporter, whose opset
    and flattening Reshape (allowzero=1) onnx2torch could not read: `dfkd evaluate` refused the exported student."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx2torch")
    from dfkd.modelfile import ModelFile, save_model

    torch.manual_seed(0)
    net = dfkd.create_model("lenet5_half", num_classes=10, in_channels=1, input_size=28).eval()
    save_model(tmp_path / "s.pt", net, ModelFile("lenet5_half", {"num_classes": 10, "in_channels": 1,
                                                                   "input_size": 28},
                                                   InputSpec(1, 28, (0.5,), (0.5,), width=56), 10))
    _cli("export", tmp_path / "s.pt", "--format", "onnx", "--out", tmp_path / "s.onnx")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "test.npz", x=rng.integers(0, 256, (20, 28, 56), dtype=np.uint8), y=np.arange(20) % 10)
    scores = [_json("evaluate", "--model", tmp_path / f"s.{ext}", "--data", tmp_path / "test.npz",
                              "--teacher", tmp_path / "s.pt", "--json") for ext in ("pt", "onnx")]
    assert scores[0]["top1"] == scores[1]["top1"] and scores[1]["agreement"] == 1.0


def test_train_teacher_makes_a_non_square_teacher_that_distills(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x=rng.integers(0, 256, (32, 28, 56), dtype=np.uint8),
             y=rng.integers(0, 10, 32))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*stretched")
        _cli("train-teacher", "--data", tmp_path / "train.npz", "--arch", "lenet5_bn", "--input-size", "28x56",
             "--epochs", "1", "--batch-size", "16", "--out", tmp_path / "t.pt")
    spec = torch.load(tmp_path / "t.pt", weights_only=True)["input_spec"]
    assert (spec["size"], spec["width"]) == (28, 56)
    _cli("distill", "--teacher", tmp_path / "t.pt", "--method", "dfq", "--steps", "2", "--fid-every", "0",
         "-p", "batch_size=8", "--out", tmp_path / "run")
    assert torch.load(tmp_path / "run" / "student.pt", weights_only=True)["input_spec"]["width"] == 56


def test_train_teacher_says_when_it_stretches_the_images(tmp_path: Path) -> None:
    # 28x56 images trained a 32x32 teacher squeezed to half their width, without a word
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x=rng.integers(0, 256, (16, 28, 56), dtype=np.uint8), y=np.arange(16) % 10)
    with pytest.warns(UserWarning, match=r"--data: its images are 28x56 \(height x width\) and the model's input "
                      r"32x32: each is stretched to that shape; give --input-size 28x56 to keep theirs"):
        _cli("train-teacher", "--data", tmp_path / "train.npz", "--arch", "lenet5", "--epochs", "1",
             "--batch-size", "8", "--out", tmp_path / "t.pt")


def test_the_input_kind_of_grey_images_follows_the_shorter_side() -> None:
    from dfkd.methods._recipes import input_kind

    def kind(c: int, h: int, w: int) -> str | None:
        return input_kind(InputSpec(c, h, (0.5,) * c, (0.5,) * c, width=w))

    assert kind(1, 28, 28) == kind(1, 32, 32) == kind(3, 16, 16) == "mnist"  # square: as always
    assert kind(1, 40, 40) == kind(3, 32, 32) == "cifar" and kind(3, 64, 64) == "imagenet"
    assert kind(1, 28, 44) == kind(1, 28, 56) == kind(1, 32, 100) == "mnist"  # grey, short side <= 32
    assert kind(3, 28, 56) == kind(1, 40, 56) == "cifar" and kind(1, 64, 200) == "imagenet"


def test_auto_gives_a_small_grey_non_square_bn_teacher_the_mnist_kind_row(wide: Path, tmp_path: Path) -> None:
    out = _cli("distill", "--teacher", wide, *FLAGS, "--steps", "2", "--fid-every", "0", "--out", tmp_path / "run",
               "-p", "synth_batch_size=8", "-p", "batch_size=8", "-p", "s_steps=1", "-p", "g_steps=1")
    assert "auto: chose fast" in out and "1x28x56 inputs (mnist kind)" in out
