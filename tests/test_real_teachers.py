"""A user's torchvision / timm state_dict at 32 and 64 px through every command (without --student but once).

The teacher options are the same on distill, evaluate (both sides), synthesize, fid-stats, methods and convert;
after `dfkd convert` no command needs them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dfkd import load_teacher
from dfkd.archs import build_model
from dfkd.cli.main import main
from dfkd.methods import get_method

CASES = [("torchvision:resnet18", 32, "dfad"), ("torchvision:resnet18", 64, "deepinversion"),
         ("timm:test_resnet", 32, "deepinversion"), ("timm:test_resnet", 64, "dfad")]
#: ResNet-18 on a shared CPU takes seconds per command: at 64 px it runs distill, evaluate and convert only (the
#: other commands read the spec the same way at every size, and run at 64 px on the small timm net).
FULL = {c for c in CASES if c[:2] != ("torchvision:resnet18", 64)}


def _cli(*args: str) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def _json(*args: str) -> dict:
    """A command's --json answer, read from its stdout alone (warnings go to stderr)."""
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _files(tmp_path, arch, size):
    if arch.startswith("timm:"):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    model = build_model(arch, {"num_classes": 10}).train()
    with torch.no_grad():  # BatchNorm statistics that are not the defaults
        model(torch.randn(8, 3, size, size) * 0.5)
    torch.save(model.eval().state_dict(), tmp_path / "private.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "test.npz", x=rng.integers(0, 256, (16, size, size, 3), dtype=np.uint8),
             y=rng.integers(0, 10, 16))
    return model


@pytest.mark.parametrize(("arch", "size", "method"), CASES)
def test_every_command_takes_the_state_dict(tmp_path, arch, size, method):
    model = _files(tmp_path, arch, size)
    teacher = ["--teacher", tmp_path / "private.pt"]
    opts = ["--teacher-arch", arch, "--channels", "3", "--input-size", str(size), "--mean", "0.5", "--std", "0.25"]
    quick = [a for k, v in get_method(method).quick.items() for a in ("-p", f"{k}={json.dumps(v)}")]
    library = (arch, size) == ("torchvision:resnet18", 32)  # a library student, asked for by name
    _cli("distill", *teacher, *opts, "--method", method, "--steps", "2", "--fid-every", "0",
         "--out", tmp_path / "run", *quick, *(["--student", arch] if library else []))
    student = torch.load(tmp_path / "run" / "student.pt", weights_only=True)
    if library:  # the library's ResNet-18, recorded by name
        assert (student["arch"], student["arch_kwargs"]) == (arch, {"num_classes": 10})
    else:  # the default for a ResNet-18 or a small timm net: a zoo student, ImageNet form from 64 px
        assert ":" not in student["arch"] and student["arch_kwargs"].get("imagenet_stem", False) == (size >= 64)
    assert student["input_spec"]["size"] == size

    data = ["--data", tmp_path / "test.npz"]
    own = _json("evaluate", "--model", tmp_path / "private.pt", *opts, *data, "--json")
    pair = _json("evaluate", "--model", tmp_path / "run" / "student.pt", *teacher, *opts, *data, "--json")
    assert own["n"] == pair["n"] == 16 and pair["teacher_top1"] == own["top1"]
    if (arch, size, method) in FULL:
        _more_commands(tmp_path, teacher, opts, method, size)

    _cli("convert", *teacher, *opts, "--out", tmp_path / "teacher.pt")
    again = _json("evaluate", "--model", tmp_path / "teacher.pt", *data, "--json")  # no flags any more
    assert again["top1"] == own["top1"]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(load_teacher(tmp_path / "teacher.pt")(x), model(x), atol=1e-4)


def _more_commands(tmp_path, teacher, opts, method, size):
    out = _cli("synthesize", *teacher, *opts, "--method", "deepinversion", "--num", "4", "-p", "iterations=1",
               "-p", "batch_size=4", "-p", "synth_batch_size=4", "-p", "s_steps=0", "--out", tmp_path / "t.npz")
    assert "wrote" in out and "4 images" in out
    with np.load(tmp_path / "t.npz") as d:
        assert d["x"].shape[-2:] == (size, size)
    _cli("fid-stats", tmp_path / "test.npz", tmp_path / "ref.npz", "--features", "teacher", *teacher, *opts)
    assert "defaults for --teacher" in _cli("methods", "--params", method, *teacher, *opts)


def test_missing_normalisation_is_an_error_not_zero_and_one(tmp_path):
    _files(tmp_path, "torchvision:resnet18", 32)
    res = CliRunner().invoke(main, ["distill", "--teacher", str(tmp_path / "private.pt"), "--teacher-arch",
                                    "torchvision:resnet18", "--channels", "3", "--input-size", "32", "--steps", "1",
                                    "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "without --mean/--std" in res.output and "--mean 0 --std 1" in res.output
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    res = CliRunner().invoke(main, ["evaluate", "--model", str(tmp_path / "private.pt"), "--data",
                                    str(tmp_path / "test.npz")])
    assert res.exit_code == 2 and res.output.startswith(f"error: --model {tmp_path / 'private.pt'}: a plain state_dict")
    assert "--teacher-arch NAME" in res.output and "torchvision:NAME" in res.output
