"""`dfkd export`: every zoo student and a user's own network, in every format, reloaded without dfkd."""

from __future__ import annotations

import errno
import os
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner

import dfkd.export
from dfkd.cli.main import main
from dfkd.deploy import export_file
from dfkd.errors import DfkdError
from dfkd.export import FORMATS, export_model, load_runner
from dfkd.models import create, list_models
from dfkd.spec import InputSpec
from dfkd.students import DEFAULT_STUDENT
from tests.conftest import user_module

PACKAGES = {"torchscript": [], "onnx": ["onnx", "onnxruntime"], "exported-program": []}
STUDENTS = sorted(set(DEFAULT_STUDENT.values()))


def _need(fmt: str) -> None:
    for pkg in PACKAGES[fmt]:
        pytest.importorskip(pkg, reason=f"{fmt} export needs {pkg} (pip install -e '.[deploy]')")


def _small(name: str) -> tuple[torch.nn.Module, InputSpec]:
    """The zoo model at its smallest input size (LeNets need 28, the others take 16)."""
    c, size = (1, 28) if name.startswith("lenet") else (3, 16)
    torch.manual_seed(0)
    m = create(name, num_classes=7, in_channels=c, input_size=size)
    m.train()
    with torch.no_grad():
        m(torch.randn(4, c, size, size))  # non-trivial BN running statistics
    return m.eval(), InputSpec(c, size, (0.5,), (0.25,))


@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model_scripts(name: str) -> None:
    m, spec = _small(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(m)
    x = spec.normalize(torch.rand(spec.shape(3)))
    assert torch.allclose(scripted(x), m(x), atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", STUDENTS)
def test_zoo_student_round_trip(name: str, fmt: str, tmp_path: Path) -> None:
    _need(fmt)
    m, spec = _small(name)
    out = tmp_path / f"m.{fmt}"
    check = export_model(m, spec, 7, fmt, out)
    assert out.is_file() and check.max_abs_diff < 1e-4 and "tolerance" in check.line()
    run, meta = load_runner(fmt, out)
    x = spec.normalize(torch.rand(spec.shape(3)))  # a batch size the check did not use
    with torch.no_grad():
        assert torch.allclose(run(x), m(x), atol=1e-4)
    assert meta["num_classes"] == 7 and meta["size"] == spec.size and meta["mean"] == [0.5] * spec.channels
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


USER_NET = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(4, 5)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x)).mean((2, 3)))
""")


@pytest.fixture
def user_state_dict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    net_class = user_module(tmp_path, monkeypatch, "usernet18", USER_NET).Net
    torch.manual_seed(1)
    torch.save(net_class().state_dict(), tmp_path / "net.pt")
    return tmp_path / "net.pt"


@pytest.mark.parametrize("fmt", FORMATS)
def test_user_module_class_round_trip(user_state_dict: Path, fmt: str) -> None:
    _need(fmt)
    spec = InputSpec(3, 20, (0.4, 0.5, 0.6), (0.2, 0.2, 0.2))
    out = user_state_dict.parent / ("net.onnx" if fmt == "onnx" else "net.export")
    check = export_file(user_state_dict, fmt, out, arch="usernet18:Net", spec=spec)
    assert check.max_abs_diff < 1e-4
    _, meta = load_runner(fmt, out)
    assert meta["mean"] == [0.4, 0.5, 0.6] and meta["num_classes"] == 5 and meta["channels"] == 3


TUPLE_NET = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):  # a forward that returns (logits, features), as many research networks do
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.fc = nn.Linear(4, 6)

        def forward(self, x):
            f = self.features(x)
            return self.fc(f), f
""")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_network_returning_more_than_logits_exports_its_logits(tmp_path: Path, fmt: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # every other command reads the logits out of (logits, features); export failed in check_export, in every format
    _need(fmt)
    net = user_module(tmp_path, monkeypatch, "tuplenet", TUPLE_NET).Net
    torch.manual_seed(0)
    torch.save(net().state_dict(), tmp_path / "net.pt")
    out = tmp_path / ("net.onnx" if fmt == "onnx" else "net.export")
    with pytest.warns(UserWarning, match="read as the logits"):
        check = export_file(tmp_path / "net.pt", fmt, out, arch="tuplenet:Net", spec=InputSpec(1, 12, (0.5,), (0.25,)))
    assert check.max_abs_diff < 1e-4
    run, meta = load_runner(fmt, out)
    assert run(torch.zeros(3, 1, 12, 12)).shape == (3, 6) and meta["num_classes"] == 6


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_torch_export_archive_exports_to_every_format(teacher_file: str, tmp_path: Path, fmt: str) -> None:
    # an archive (the user's, or one dfkd export wrote) failed in every format ("JIT Tracing of SymInts isn't
    # supported", ...) with the advice to try another --format
    _need(fmt)
    archive = tmp_path / "teacher.pt2"
    export_file(teacher_file, "exported-program", archive)
    out = tmp_path / ("again.onnx" if fmt == "onnx" else "again.export")
    check = export_file(archive, fmt, out)
    assert check.max_abs_diff < 1e-4
    run, meta = load_runner(fmt, out)
    assert run(torch.zeros(3, 1, 32, 32)).shape == (3, 10) and meta["channels"] == 1


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    m, spec = _small("lenet5_half")
    out = tmp_path / "m.pt2"
    out.write_text("the user's file")
    with pytest.raises(DfkdError, match="--force"):
        export_model(m, spec, 7, "exported-program", out)
    assert out.read_text() == "the user's file"
    export_model(m, spec, 7, "exported-program", out, force=True)
    assert torch.export.load(str(out)) is not None
    with pytest.raises(DfkdError, match="is a folder"):
        export_model(m, spec, 7, "exported-program", tmp_path, force=True)
    with pytest.raises(DfkdError, match=f"--out {out}/m.pt2: {out} is a file, not a folder"):
        export_model(m, spec, 7, "exported-program", out / "m.pt2")  # its parent is the user's file



@pytest.mark.parametrize("fmt, name, fix", [("torchscript", "m.onnx", "m.pt"), ("exported-program", "m.onnx", "m.pt2"),
                                           ("onnx", "m.pt", "m.onnx")])
def test_a_name_the_file_would_be_misread_by_is_refused(tmp_path: Path, fmt: str, name: str, fix: str) -> None:
    # a TorchScript file written as student.onnx: exit 0, then dfkd evaluate called it corrupt
    m, spec = _small("lenet5_half")
    with pytest.raises(DfkdError, match=f"--format {fmt} writes .*; name it {fix}$"):
        export_model(m, spec, 7, fmt, tmp_path / name)
    assert not (tmp_path / name).exists()


class _Noisy(torch.nn.Module):
    """Different logits on every call: an export of it cannot pass the round-trip check."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :3] + torch.rand(x.shape[0], 3)


def test_failed_check_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "noisy.ts"
    with pytest.raises(DfkdError, match="differ from the source"):
        export_model(_Noisy(), InputSpec(1, 16, (0.0,), (1.0,)), 3, "torchscript", out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_full_disk_is_one_line_and_leaves_nothing(fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # TorchScript and torch.export archives aborted the interpreter (a C++ "unexpected pos", SIGABRT) on a full
    # disk; ONNX said "try another --format"
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if fmt == "onnx":
        monkeypatch.setattr(torch.onnx, "export", full)
    else:
        monkeypatch.setattr(dfkd.export, "open", full, raising=False)  # where the archive made in memory is written
    m, spec = _small("lenet5_half")
    out = tmp_path / f"m{dfkd.export.SUFFIXES.get(fmt, '.onnx')}"
    with pytest.raises(DfkdError, match=f"^cannot write {out}: No space left on device; free some space") as e:
        export_model(m, spec, 7, fmt, out)
    assert "another --format" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_onnx_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    m, spec = _small("lenet5_half")
    with pytest.raises(DfkdError, match=r'pip install -e "\.\[deploy\]"'):
        export_model(m, spec, 7, "onnx", tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_cli_export(teacher_file: str, tmp_path: Path) -> None:
    out = tmp_path / "t.ts"
    res = CliRunner().invoke(main, ["export", teacher_file, "--format", "torchscript", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "reproduces the source logits" in res.output and "max |diff|" in res.output
    res = CliRunner().invoke(main, ["export", teacher_file, "--format", "torchscript", "--out", str(out)])
    assert res.exit_code == 2 and "--force" in res.output


def test_cli_export_takes_the_teacher_options_of_the_other_commands(tmp_path: Path) -> None:
    # `--teacher-arch` was "No such option" and `--arch-arg` did not exist: a torchvision state_dict whose
    # constructor needs an argument could not be exported
    model = torchvision.models.squeezenet1_1(weights=None, num_classes=5, dropout=0.2).eval()
    torch.save(model.state_dict(), tmp_path / "sq.pt")
    res = CliRunner().invoke(main, ["export", str(tmp_path / "sq.pt"), "--teacher-arch", "torchvision:squeezenet1_1",
                                    "--arch-arg", "num_classes=5", "--channels", "3", "--input-size", "64",
                                    "--mean", "0.5", "--std", "0.25", "--format", "torchscript",
                                    "--out", str(tmp_path / "sq.ts")])
    assert res.exit_code == 0 and "reproduces the source logits" in res.output, res.output


def test_an_exported_file_brings_its_spec_back(teacher_file: str, tmp_path: Path) -> None:
    ts = tmp_path / "t.ts"
    export_file(teacher_file, "torchscript", ts)
    check = export_file(ts, "torchscript", tmp_path / "again.ts")  # no --channels/--input-size needed
    assert check.max_abs_diff < 1e-4
    _, meta = load_runner("torchscript", tmp_path / "again.ts")
    assert meta["size"] == 32 and meta["mean"] == [0.1307] and meta["num_classes"] == 10
    # torch.export's own "Exporting a ScriptModule is not supported ... TS2EPConverter" and "try another --format"
    with pytest.raises(DfkdError, match="^export to exported-program: a TorchScript model cannot be .*; export the "
                                        "model file it was made from"):
        export_file(ts, "exported-program", tmp_path / "t.pt2")
    assert not (tmp_path / "t.pt2").exists()
