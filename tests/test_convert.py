"""`dfkd convert`: every source format becomes a dfkd model file that later commands read with no flags."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn

from dfkd import DfkdError, InputSpec, load_teacher
from dfkd.cli.main import main
from dfkd.convert import convert
from dfkd.models import create
from dfkd.teacher_options import TeacherOptions

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")
SPEC = InputSpec(1, 32, (0.1307,), (0.3081,))
GREY = TeacherOptions(channels=1, size=32, mean=(0.1307,), std=(0.3081,))


class NeedsArgs(nn.Module):
    """A class that cannot be rebuilt without arguments (so a pickle of it converts through torch.export)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, width, 3), nn.BatchNorm2d(width), nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _zoo() -> nn.Module:
    torch.manual_seed(0)
    return create("lenet5_bn", num_classes=10, in_channels=1, input_size=32).eval()


def _same_without_flags(out, model, fmt):
    t = load_teacher(out)  # no flags at all: the file says everything
    assert t.fmt == fmt and t.spec == SPEC
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(t(x), model(x), atol=1e-5)
    return t


def test_state_dict_with_library_architecture(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    spec = InputSpec(3, 32, (0.5,), (0.25,))
    meta = convert(tmp_path / "sd.pt", tmp_path / "m.pt", TeacherOptions("torchvision:resnet18", channels=3, size=32,
                                                                         mean=(0.5,), std=(0.25,)))
    assert (meta.arch, meta.arch_kwargs, meta.input_spec) == ("torchvision:resnet18", {"num_classes": 10}, spec)
    t = load_teacher(tmp_path / "m.pt")
    assert t.fmt == "dfkd" and t.arch == "torchvision:resnet18" and t.spec == spec
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(t(x), model(x), atol=1e-5)


@pytest.mark.parametrize("kind", ["torchscript", "export"])
def test_archives_are_stored_whole_with_their_spec(tmp_path, kind):
    model, src = _zoo(), tmp_path / "archive.pt"
    if kind == "torchscript":
        torch.jit.trace(model, torch.randn(2, 1, 32, 32)).save(str(src))
    else:
        batch = torch.export.Dim("batch", min=1)
        torch.export.save(torch.export.export(model, (torch.randn(2, 1, 32, 32),), dynamic_shapes=({0: batch},)), src)
    convert(src, tmp_path / "m.pt", GREY)
    t = _same_without_flags(tmp_path / "m.pt", model, kind)
    assert t.hookable == (kind == "export")  # the archive keeps its format's limits
    if kind == "torchscript":  # a converted archive converts again, spec and all (the same code for both kinds)
        convert(tmp_path / "m.pt", tmp_path / "again.pt")
        _same_without_flags(tmp_path / "again.pt", model, kind)


def test_pickles_need_trust_and_convert_by_class_or_export(tmp_path):
    model = _zoo()
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(DfkdError, match="--trust-pickle"):
        convert(tmp_path / "whole.pt", tmp_path / "m.pt", GREY)
    assert not (tmp_path / "m.pt").exists()
    opts = TeacherOptions(trust_pickle=True, channels=1, size=32, mean=(0.1307,), std=(0.3081,))
    # LeNet5() without arguments is the plain LeNet-5, not this BN one: its weights do not fit, so it is exported.
    meta = convert(tmp_path / "whole.pt", tmp_path / "m.pt", opts)
    assert meta.arch == "export"
    _same_without_flags(tmp_path / "m.pt", model, "export")
    plain = create("lenet5", num_classes=10, in_channels=1, input_size=32).eval()
    torch.save(plain, tmp_path / "plain.pt")
    assert convert(tmp_path / "plain.pt", tmp_path / "p.pt", opts).arch == "dfkd.models.lenet:LeNet5"
    _same_without_flags(tmp_path / "p.pt", plain, "dfkd")
    torch.manual_seed(0)
    odd = NeedsArgs(3).eval()
    torch.save(odd, tmp_path / "odd.pt")
    assert convert(tmp_path / "odd.pt", tmp_path / "o.pt", opts).arch == "export"
    _same_without_flags(tmp_path / "o.pt", odd, "export")


def test_cli_refuses_to_overwrite_and_names_what_is_missing(tmp_path):
    model = _zoo()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    (tmp_path / "mine.pt").write_bytes(b"the user's own file")
    args = ["convert", "--teacher", str(tmp_path / "sd.pt"), "--teacher-arch", "lenet5_bn", "--channels", "1",
            "--input-size", "32", "--mean", "0.1307", "--std", "0.3081"]
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "mine.pt")])
    assert res.exit_code == 2 and "already exists" in res.output and "mine.pt" in res.output
    assert (tmp_path / "mine.pt").read_bytes() == b"the user's own file"
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "mine.pt" / "m.pt")])  # under the user's file
    assert res.exit_code == 2 and "is a file, not a folder" in res.output
    assert (tmp_path / "mine.pt").read_bytes() == b"the user's own file"
    res = CliRunner().invoke(main, [*args[:-4], "--out", str(tmp_path / "m.pt")])
    assert res.exit_code == 2 and "without --mean/--std" in res.output and not (tmp_path / "m.pt").exists()
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "m.pt")])
    assert res.exit_code == 0, res.output
    assert "lenet5_bn, 1x32x32 inputs, 10 classes" in res.output
    _same_without_flags(tmp_path / "m.pt", model, "dfkd")


def test_architecture_flags_a_model_file_does_not_use_are_named(tmp_path):
    # convert and evaluate of a dfkd model file with --teacher-arch/--arch-arg ignored them without a word
    torch.save(_zoo().state_dict(), tmp_path / "sd.pt")
    res = CliRunner().invoke(main, ["convert", "--teacher", str(tmp_path / "sd.pt"), "--teacher-arch", "lenet5_bn",
                                    "--channels", "1", "--input-size", "32", "--mean", "0.1307", "--std", "0.3081",
                                    "--out", str(tmp_path / "own.pt")])
    assert res.exit_code == 0 and "not used" not in res.output, res.output  # a state_dict uses them
    np.savez(tmp_path / "test.npz", x=np.zeros((4, 28, 28), np.uint8), y=np.arange(4))
    for args in (["convert", "--teacher", str(tmp_path / "own.pt"), "--out", str(tmp_path / "again.pt")],
                 ["evaluate", "--model", str(tmp_path / "own.pt"), "--data", str(tmp_path / "test.npz")]):
        with pytest.warns(UserWarning, match=r"--teacher-arch resnet18 --arch-arg width=2 not used: .*own\.pt is a "
                                             "dfkd model file of lenet5_bn, which brings its own network"):
            res = CliRunner().invoke(main, [*args, "--teacher-arch", "resnet18", "--arch-arg", "width=2"])
        assert res.exit_code == 0, res.output
    # evaluate reads --model and --teacher with one set of flags: a state_dict teacher uses them, and the model
    # file beside it was said not to
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not used")
        res = CliRunner().invoke(main, ["evaluate", "--model", str(tmp_path / "own.pt"), "--teacher",
                                        str(tmp_path / "sd.pt"), "--teacher-arch", "lenet5_bn", "--channels", "1",
                                        "--input-size", "32", "--mean", "0.1307", "--std", "0.3081",
                                        "--data", str(tmp_path / "test.npz")])
    assert res.exit_code == 0 and "agreement with teacher: 100.00%" in res.output, res.output


def test_a_model_file_is_not_written_under_an_onnx_name(tmp_path):
    # convert (and train-teacher) wrote a dfkd model file as m.onnx, which evaluate then read as corrupt ONNX
    torch.save(_zoo().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(DfkdError, match=r"m\.onnx: this writes a dfkd model file \(PyTorch\), .*; name it m\.pt"):
        convert(tmp_path / "sd.pt", tmp_path / "m.onnx", TeacherOptions("lenet5_bn", channels=1, size=32,
                                                                        mean=(0.1307,), std=(0.3081,)))
    assert not (tmp_path / "m.onnx").exists()
    res = CliRunner().invoke(main, ["train-teacher", "--data", str(tmp_path / "none.npz"), "--arch", "lenet5",
                                    "--out", str(tmp_path / "t.onnx")])
    assert res.exit_code == 2 and "t.onnx: this writes a dfkd model file" in res.output, res.output
