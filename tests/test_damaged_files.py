"""Damaged and hostile files (a fuzzing hunt's findings): one DfkdError naming the file, never a traceback or a hang."""

from __future__ import annotations

import io
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dfkd.data import load_images
from dfkd.errors import DfkdError
from dfkd.modelfile import model_from_payload
from dfkd.spec import InputSpec
from dfkd.transfer import load_transfer, save_transfer
from dfkd.transfer_report import _provenance_lines

SPEC = InputSpec(1, 8, (0.5,), (0.5,))


def _npy(header_shape: tuple[int, ...], body: bytes = b"\0" * 64) -> bytes:
    """An .npy member of uint8 whose header declares `header_shape`, followed by `body`."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "|u1", "fortran_order": False, "shape": header_shape})
    return out.getvalue() + body


def _zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _labels() -> bytes:
    out = io.BytesIO()
    np.save(out, np.zeros(4, np.int64))
    return out.getvalue()


def test_a_pipe_as_a_data_file_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "data.npz"
    os.mkfifo(fifo)
    errors: list[BaseException] = []

    def load() -> None:
        try:
            load_images(fifo)
        except BaseException as e:  # noqa: BLE001 - what the loader raised, checked below
            errors.append(e)

    t = threading.Thread(target=load, daemon=True)  # it blocked in open() for ever
    t.start()
    t.join(20)
    assert not t.is_alive(), "load_images waited on the pipe"
    assert isinstance(errors[0], DfkdError) and "not a regular file" in str(errors[0])


@pytest.mark.parametrize("shape", [(4, 0, 8), (4, 8, 0), (4, 0, 8, 8)])
def test_images_without_pixels_are_refused_by_name(tmp_path: Path, shape: tuple[int, ...]) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros(shape, np.uint8), y=np.zeros(4, np.int64))
    with pytest.raises(DfkdError, match=r"d.npz: x of shape .* holds images without pixels"):
        load_images(tmp_path / "d.npz")


def test_a_member_declaring_more_than_memory_is_a_corrupt_file(tmp_path: Path) -> None:
    path = _zip(tmp_path / "d.npz", {"x.npy": _npy((10**9, 28, 28)), "y.npy": _labels()})  # numpy allocates 730 GiB
    with pytest.raises(DfkdError, match="header declares more data than fits in memory"):
        load_images(path)


def test_a_negative_dimension_and_a_member_that_is_no_array_are_corrupt_files(tmp_path: Path) -> None:
    path = _zip(tmp_path / "neg.npz", {"x.npy": _npy((-4, 8, 8)), "y.npy": _labels()}, zipfile.ZIP_STORED)
    with pytest.raises(DfkdError, match="neg.npz: not a readable .npz file"):
        load_images(path)
    path = _zip(tmp_path / "raw.npz", {"x.npy": b"not an array at all", "y.npy": _labels()})  # numpy: bytes back
    with pytest.raises(DfkdError, match="raw.npz: its member 'x' is not an .npy array"):
        load_images(path)


@pytest.fixture
def transfer_arrays(tmp_path: Path) -> dict[str, np.ndarray]:
    path = tmp_path / "t.npz"
    probs = torch.softmax(torch.randn(4, 3), 1)
    save_transfer(path, torch.zeros(4, 1, 8, 8, dtype=torch.uint8), probs, SPEC, "fast", "0" * 64)
    with np.load(path) as d:
        return dict(d)


@pytest.mark.parametrize("key, value, says", [("version", np.str_("two"), "'version' entry must be one whole number"),
                                              ("num_classes", np.arange(3), "'num_classes' entry must be one whole"),
                                              ("probs", np.full((4, 3), "0.3"), "'probs' must be floating-point")])
def test_a_transfer_file_with_a_damaged_field_is_named(tmp_path: Path, transfer_arrays: dict[str, np.ndarray],
                                                       key: str, value: np.ndarray, says: str) -> None:
    np.savez(tmp_path / "bad.npz", **{**transfer_arrays, key: value})
    with pytest.raises(DfkdError, match=says):
        load_transfer(tmp_path / "bad.npz")


def test_a_transfer_files_damaged_provenance_reads_as_unknown() -> None:
    lines = _provenance_lines({"teacher": "x", "settings": [1], "method": "fast"}, "0" * 64)
    assert "top-1 unknown" in lines[0] and lines[-1] == "settings: "


@pytest.mark.parametrize("field, value, says", [("state_dict", [1, 2], "'state_dict' is a list"),
                                                ("arch", 5, "'arch' is a int"),
                                                ("input_spec", "spec", "no attribute")])
def test_a_model_file_with_a_field_of_another_type_is_named(field: str, value: object, says: str) -> None:
    payload = {"format": "dfkd-model", "version": 2, "arch": "lenet5", "arch_kwargs": {}, "num_classes": 10,
               "input_spec": InputSpec(1, 32, (0.5,), (0.5,)).to_dict(), "state_dict": {}, field: value}
    with pytest.raises(DfkdError, match=f"m.pt: dfkd model file is missing or has a malformed field .*{says}"):
        model_from_payload(payload, "m.pt")


def test_a_damaged_export_archive_inside_a_model_file_logs_no_traceback(capfd: pytest.CaptureFixture[str]) -> None:
    payload = {"format": "dfkd-model", "version": 2, "arch": "export", "arch_kwargs": {}, "num_classes": 10,
               "input_spec": InputSpec(1, 32, (0.5,), (0.5,)).to_dict(), "state_dict": {},
               "archive": torch.frombuffer(bytearray(b"garbage" * 10), dtype=torch.uint8)}
    with pytest.raises(DfkdError, match="the export archive inside could not be read"):
        model_from_payload(payload, "m.pt")
    assert "Traceback" not in capfd.readouterr().err


NAMES = "'class_names' must be a list of 10 names"


@pytest.mark.parametrize("field, value, says", [("version", True, "version True is not one dfkd writes"),
                                                ("version", -1, "version -1 is not one dfkd writes"),
                                                ("class_names", "abcdefghij", NAMES),
                                                ("class_names", list(range(10)), NAMES)])
def test_a_model_files_version_and_class_names_are_checked(field: str, value: object, says: str) -> None:
    payload = {"format": "dfkd-model", "version": 2, "arch": "lenet5", "arch_kwargs": {}, "num_classes": 10,
               "input_spec": InputSpec(1, 32, (0.5,), (0.5,)).to_dict(), "state_dict": {}, field: value}
    with pytest.raises(DfkdError, match=says):
        model_from_payload(payload, "m.pt")
