"""Real image data: .npz and ImageFolder loading, bad files, conversion to a model's input spec."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dfkd import DfkdError, InputSpec
from dfkd.data import ImageData, check_fits, check_training_labels, iterate_batches, load_images, to_model_input

GREY = InputSpec(1, 32, (0.5,), (0.25,))
COLOUR = InputSpec(3, 32, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))


def _npz(path, x, y, **extra):
    np.savez(path, x=x, y=y, **extra)
    return path


def test_npz_grey(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    data = load_images(_npz(tmp_path / "g.npz", x, np.array([0, 1, 2, 1, 0])))
    assert data.x.dtype == torch.uint8 and data.x.shape == (5, 1, 28, 28)
    assert data.y.dtype == torch.int64 and data.y.tolist() == [0, 1, 2, 1, 0]
    assert torch.equal(data.x[:, 0], torch.from_numpy(x))
    assert len(data) == 5 and data.num_classes == 3 and data.class_names is None


def test_npz_colour_channels_last(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    data = load_images(_npz(tmp_path / "c.npz", x, np.arange(4)))
    assert data.x.shape == (4, 3, 32, 32)
    assert torch.equal(data.x[2, 1], torch.from_numpy(x[2, :, :, 1]))  # channel 1 of image 2 moved, not mixed


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    arrays = {}
    for cls in ("cat", "ant", "bee"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            a = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / cls / f"{i}.png")
            arrays[(cls, i)] = a
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    data = load_images(tmp_path)
    assert data.class_names == ["ant", "bee", "cat"]
    assert data.y.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.x.shape == (6, 3, 12, 12) and data.x.dtype == torch.uint8
    assert torch.equal(data.x[5], torch.from_numpy(arrays[("cat", 1)]).permute(2, 0, 1))  # PNG is lossless


def test_image_folder_grey(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.full((10, 10), 200, np.uint8), mode="L").save(tmp_path / cls / "x.png")
    data = load_images(tmp_path)
    assert data.x.shape == (2, 1, 10, 10) and int(data.x[:].max()) == 200


def test_image_folder_of_16_bit_images_is_scaled_to_8_bits(tmp_path):
    # a 16-bit PNG (medical and microscopy scans): PIL's own conversion clips it at 255, an almost white image
    from PIL import Image

    ramp = np.arange(0, 65536, 257, dtype=np.uint16)[:256].reshape(16, 16)  # 0, 257, ..., 65535
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.fromarray(ramp).save(tmp_path / cls / "x.png")
    with Image.open(tmp_path / "a" / "x.png") as im:
        assert im.mode.startswith("I")  # as Pillow opens a 16-bit PNG
    data = load_images(tmp_path)
    assert data.x.shape == (2, 1, 16, 16)
    assert torch.equal(data.x[0][0], torch.arange(256, dtype=torch.uint8).reshape(16, 16))
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "b" / "y.png")  # among colour: grey as colour
    assert torch.equal(load_images(tmp_path).x[0][1], torch.arange(256, dtype=torch.uint8).reshape(16, 16))
    Image.fromarray(np.ones((16, 16), np.float32)).save(tmp_path / "b" / "z.tiff")
    with pytest.raises(DfkdError, match=r"z\.tiff: not a readable image \(32-bit float pixels"):
        load_images(tmp_path).x[:]
    (tmp_path / "b" / "z.tiff").unlink()
    Image.fromarray(np.full((16, 16), 70_000, np.int32)).save(tmp_path / "b" / "w.tiff")  # mode I, past 16 bits
    with pytest.raises(DfkdError, match=r"w\.tiff: not a readable image \(32-bit integer pixels past the 16-bit"):
        load_images(tmp_path).x[:]


def test_image_folder_without_class_folders(tmp_path):
    with pytest.raises(DfkdError, match="one sub-folder per class"):
        load_images(tmp_path)


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.zeros(2)}, "needs arrays 'x'"),
        ({"x": np.zeros((2, 8, 8), np.float32), "y": np.zeros(2, np.int64)}, "must be uint8"),
        # the shape as stored in the file (it said (3, 1, 8, 8), dfkd's own reshape)
        ({"x": np.zeros((3, 8, 8), np.uint8), "y": np.zeros(2, np.int64)}, r"expected x .* got \(3, 8, 8\) and \(2,\)"),
        ({"x": np.zeros((8, 8), np.uint8), "y": np.zeros(8, np.int64)}, "expected x of shape"),
    ],
    ids=["missing-keys", "wrong-dtype", "length-mismatch", "not-images"],
)
def test_bad_npz(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DfkdError, match=match) as e:
        load_images(path, flag="--eval-data")
    assert str(e.value).startswith(f"--eval-data {path}")


@pytest.mark.parametrize(
    "kind, match",
    [("random", "truncated or corrupt"), ("truncated", "truncated or corrupt"),
     ("pickled", "holds an array of Python objects .*does not unpickle; store numbers"), ("npy", "np.savez"),
     ("compressed", "truncated or corrupt"),
     ("text", r"not a readable .npz file \(no zip of arrays, no .npy header: truncated or corrupt, or another")],
)
def test_corrupt_npz(tmp_path, kind, match):
    path = tmp_path / "bad.npz"
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(2048))
    elif kind == "compressed":  # np.savez_compressed with bytes flipped inside the deflate stream: a zlib.error
        mnist = np.load(Path(__file__).resolve().parents[1] / "examples" / "mnist_test.npz")
        np.savez_compressed(path, x=mnist["x"][:200], y=mnist["y"][:200])
        data = bytearray(path.read_bytes())
        data[2000:2400] = bytes(b ^ 0xFF for b in data[2000:2400])
        path.write_bytes(bytes(data))
    elif kind == "text":  # numpy reads a file that is neither a zip nor a .npy as a pickle: "allow_pickle=" advice
        path.write_text("hello")
    elif kind == "truncated":
        good = _npz(tmp_path / "good.npz", np.zeros((50, 28, 28), np.uint8), np.zeros(50, np.int64)).read_bytes()
        path.write_bytes(good[: len(good) // 2])
    else:  # np.save: one bare array; "pickled" is an object array, which loading without pickle refuses
        arr = np.array([{"x": 1}], dtype=object) if kind == "pickled" else np.zeros((3, 8, 8), np.uint8)
        with open(path, "wb") as f:  # a file object: np.save would append .npy to a path
            np.save(f, arr, allow_pickle=True)
    assert path.exists()
    with pytest.raises(DfkdError, match=match) as e:
        load_images(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_data(tmp_path):
    with pytest.raises(DfkdError, match="no such file or directory") as e:
        load_images(tmp_path / "nope.npz")
    assert "--data" in str(e.value)


def test_to_model_input_resizes_and_normalises():
    x = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    out = to_model_input(x, GREY)
    assert out.shape == (2, 1, 32, 32) and out.dtype == torch.float32
    assert torch.allclose(out, torch.full_like(out, (1.0 - 0.5) / 0.25))


def test_to_model_input_grey_to_colour():
    x = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    out = to_model_input(x, COLOUR)
    assert out.shape == (3, 3, 32, 32)
    pixels = COLOUR.denormalize(out)
    assert torch.allclose(pixels[:, 0], pixels[:, 2], atol=1e-6) and torch.allclose(pixels[:, 1], x[:, 0] / 255.0)


def test_to_model_input_colour_to_grey():
    x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    x[:, 0], x[:, 1], x[:, 2] = 30, 60, 90
    out = to_model_input(x, GREY)
    assert out.shape == (1, 1, 32, 32)
    assert torch.allclose(GREY.denormalize(out), torch.full_like(out, 60 / 255.0))


def test_to_model_input_refuses_other_channel_counts():
    with pytest.raises(DfkdError, match="2 channels"):
        to_model_input(torch.zeros(1, 2, 32, 32, dtype=torch.uint8), COLOUR)


def test_iterate_batches_covers_everything_once():
    data = ImageData(torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8), torch.arange(10))
    seen = [y for _, ys in iterate_batches(data, GREY, 4, "cpu", shuffle=True) for y in ys.tolist()]
    assert sorted(seen) == list(range(10))
    shapes = [x.shape for x, _ in iterate_batches(data, GREY, 4, "cpu")]
    assert shapes == [(4, 1, 32, 32), (4, 1, 32, 32), (2, 1, 32, 32)]


def _data(labels, channels=1) -> ImageData:
    return ImageData(torch.zeros(len(labels), channels, 32, 32, dtype=torch.uint8), torch.tensor(labels))


def test_check_fits_accepts_matching_data():
    check_fits(_data([0, 9, 3]), 10, GREY, "--data", "d.npz")
    check_fits(_data([0, 1], channels=3), 10, GREY, "--data", "d.npz")  # colour -> grey is converted


def test_check_fits_refuses_labels_beyond_the_classes():
    with pytest.raises(DfkdError, match="labels run 0..11 but the model has 10 classes") as e:
        check_fits(_data([0, 11]), 10, GREY, "--eval-data", "cifar100.npz")
    assert str(e.value).startswith("--eval-data cifar100.npz")


def test_check_fits_refuses_negative_labels_and_empty_data():
    with pytest.raises(DfkdError, match="labels"):
        check_fits(_data([-1, 0]), 10, GREY, "--data", "d.npz")
    with pytest.raises(DfkdError, match="holds no images"):
        check_fits(_data([]), 10, GREY, "--data", "d.npz")


@pytest.mark.parametrize("kind", ["random", "truncated", "pickled", "npy"])
def test_every_npz_reader_says_one_line_for_a_bad_file(tmp_path, kind):
    """Reference FID statistics and calibration files go through the same reader as image data."""
    from dfkd.calibration import file_pixels
    from dfkd.fid import FIDStats

    test_corrupt_npz(tmp_path, kind, ".")  # writes bad.npz (and checks load_images)
    path = tmp_path / "bad.npz"
    for read in (lambda: FIDStats.load(path), lambda: file_pixels(path, 4)):
        with pytest.raises(DfkdError) as e:
            read()
        assert str(path) in str(e.value) and "\n" not in str(e.value)
        assert ("single array" in str(e.value)) == (kind == "npy")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the resident set size from /proc")
def test_stored_npz_is_mapped_not_read(tmp_path):
    # 160 MiB of colour images, channels last, written with np.savez (stored): loading them must not read them
    x = np.zeros((3400, 128, 128, 3), dtype=np.uint8)
    x[-1] = 7
    path = _npz(tmp_path / "big.npz", x, np.arange(3400) % 10)
    del x
    before = _rss_mib()
    data = load_images(path, "--eval-data")
    grown = _rss_mib() - before
    assert grown < 32, f"loading a 160 MiB stored .npz grew memory by {grown:.0f} MiB"
    assert data.x.shape == (3400, 3, 128, 128) and len(data) == 3400
    last = next(iter(iterate_batches(ImageData(data.x[-2:], data.y[-2:]), COLOUR, 2, "cpu")))[0]
    assert torch.equal(last[1], to_model_input(torch.full((1, 3, 128, 128), 7, dtype=torch.uint8), COLOUR)[0])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the resident set size from /proc")
def test_large_compressed_npz_is_mapped_through_a_temporary_file(tmp_path, monkeypatch):
    # 160 MiB of images in np.savez_compressed: past the spill size they are decompressed a block at a time to an
    # unnamed temporary file and mapped, so loading does not hold them in memory and leaves no file behind
    import dfkd.io

    monkeypatch.setattr(dfkd.io, "SPILL_BYTES", 1 << 20)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("tempfile.tempdir", None)
    x = np.zeros((3400, 128, 128, 3), dtype=np.uint8)
    x[-1] = 7
    np.savez_compressed(tmp_path / "big.npz", x=x, y=np.arange(3400) % 10)
    del x
    before = _rss_mib()
    data = load_images(tmp_path / "big.npz", "--eval-data")
    grown = _rss_mib() - before
    assert grown < 32, f"loading a 160 MiB compressed .npz grew memory by {grown:.0f} MiB"
    assert data.x.shape == (3400, 3, 128, 128) and int(data.x[-1].min()) == 7 and int(data.x[-2].max()) == 0
    assert list((tmp_path / "tmp").iterdir()) == []  # unlinked once mapped
    spilled = []
    monkeypatch.setattr(dfkd.io, "_spill", lambda *a: spilled.append(a))
    small = load_images(_npz_compressed(tmp_path / "small.npz", np.full((4, 28, 28), 3, np.uint8)), "--data")
    assert not spilled and int(small.x.sum()) == 3 * 4 * 28 * 28  # under the spill size: read whole


def _npz_compressed(path, x):
    np.savez_compressed(path, x=x, y=np.arange(len(x)) % 10)
    return path


def test_compressed_npz_spill_errors_name_the_problem(tmp_path, monkeypatch):
    import errno
    import zipfile

    import dfkd.io

    monkeypatch.setattr(dfkd.io, "SPILL_BYTES", 0)
    path = _npz_compressed(tmp_path / "c.npz", np.arange(50 * 28 * 28, dtype=np.uint32).astype(np.uint8)
                           .reshape(50, 28, 28))
    spilled, spill = [], dfkd.io._spill
    monkeypatch.setattr(dfkd.io, "_spill", lambda *a: spilled.append(a) or spill(*a))
    data = load_images(path)  # spilled, even at this size
    assert spilled and torch.equal(data.x[:, 0], torch.from_numpy(np.arange(50 * 28 * 28).astype(np.uint8)
                                                                  .reshape(50, 28, 28)))
    real_open = os.fdopen

    def full_disk(fd, *a, **kw):
        f = real_open(fd, *a, **kw)
        def write(_):
            raise OSError(errno.ENOSPC, "No space left on device")
        f.write = write
        return f

    monkeypatch.setattr(dfkd.io.os, "fdopen", full_disk)
    with pytest.raises(DfkdError, match="no room there .*set TMPDIR to a disk with room, or write the file with "
                                        "np.savez"):
        load_images(path, "--eval-data")
    monkeypatch.setattr(dfkd.io.os, "fdopen", real_open)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "no-such-dir"))
    with pytest.raises(DfkdError, match="cannot make a temporary file in .*no-such-dir.*set TMPDIR"):
        load_images(path, "--eval-data")
    monkeypatch.setattr("tempfile.tempdir", None)
    short = tmp_path / "short.npz"  # a member whose stream ends early: one error, as for a truncated file
    with zipfile.ZipFile(path) as zf, zipfile.ZipFile(short, "w", zipfile.ZIP_DEFLATED) as out:
        out.writestr("x.npy", zf.read("x.npy")[:-100])
        out.writestr("y.npy", zf.read("y.npy"))
    with pytest.raises(DfkdError, match="truncated or corrupt"):
        load_images(short, "--eval-data")


def test_truncated_stored_npz_is_one_error(tmp_path):
    path = _npz(tmp_path / "t.npz", np.zeros((50, 28, 28), np.uint8), np.arange(50) % 10)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DfkdError, match="truncated or corrupt"):
        load_images(path, "--eval-data")


def test_channels_last_beyond_three_is_refused_by_its_shape(tmp_path):
    # read as 28-channel images of 28 x 7 pixels: a model of those was trained from it (train-teacher), unsaid
    with pytest.raises(DfkdError, match=r"x of shape \(5, 28, 28, 7\) looks like N x H x W x C with 7 channels "
                                        r"last, and only 1 or 3 channels may come last"):
        load_images(_npz(tmp_path / "w.npz", np.zeros((5, 28, 28, 7), np.uint8), np.arange(5)))
    for shape in ((5, 5, 28, 28), (5, 13, 8, 8), (5, 12, 1, 64), (5, 4, 2, 2)):  # channels first, multispectral
        assert load_images(_npz(tmp_path / "f.npz", np.zeros(shape, np.uint8), np.arange(5))).x.shape == shape
    grey3 = load_images(_npz(tmp_path / "g.npz", np.zeros((5, 3, 28, 28), np.uint8), np.arange(5)))
    check_fits(grey3, 10, GREY, "--data", "g.npz")  # colour for a grey model: averaged, no error


def test_image_folder_decodes_only_what_is_indexed(tmp_path):
    from PIL import Image

    from dfkd.data import FolderImages

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 10 * i + (cls == "b"), np.uint8)).save(tmp_path / cls / f"{i}.png")
    noise = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "b" / "2.png")
    blob = (tmp_path / "b" / "2.png").read_bytes()
    (tmp_path / "b" / "2.png").write_bytes(blob[: len(blob) - 40])  # its header is intact, its pixels are not
    data = load_images(tmp_path, "--eval-data")  # headers only: the broken image is not decoded yet
    assert isinstance(data.x, FolderImages) and data.x.shape == (6, 3, 8, 8) and len(data) == 6
    assert int(data.x[4][0, 0, 0]) == 11 and data.x[torch.tensor([0, 3])][:, 0, 0, 0].tolist() == [0, 1]
    assert data.x[data.y == 0].shape == (3, 3, 8, 8)  # a boolean mask, as a tensor would take it
    half = data.subset(slice(0, 3))
    assert isinstance(half.x, FolderImages) and half.y.tolist() == [0, 0, 0] and len(half) == 3
    with pytest.raises(DfkdError, match=r"--eval-data .*2\.png: not a readable image"):
        data.x[5]
    batches = iterate_batches(data, COLOUR, 4, "cpu")
    assert next(batches)[0].shape == (4, 3, 32, 32)
    with pytest.raises(DfkdError, match="not a readable image"):
        next(batches)


def test_image_folder_of_grey_and_colour_images_reads_them_as_colour(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((8, 8), 77, np.uint8), mode="L").save(tmp_path / "a" / "grey.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a" / "colour.png")
    data = load_images(tmp_path)
    assert data.x.shape == (2, 3, 8, 8) and data.x[1].unique().tolist() == [77]


def test_image_folder_of_several_sizes_is_read_as_centre_crops(tmp_path):
    # an ImageNet-style validation folder: every image its own size, a few grey; the usual evaluation view
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
    wide = np.full((30, 40, 3), 120, np.uint8)
    wide[:, :5] = (255, 0, 0)  # a red left border, outside the centre square (26 px of the 30 px side)
    Image.fromarray(wide).save(tmp_path / "a" / "wide.png")
    Image.fromarray(np.full((60, 50, 3), 30, np.uint8)).save(tmp_path / "a" / "tall.png")
    Image.fromarray(np.full((20, 20), 200, np.uint8), mode="L").save(tmp_path / "b" / "grey.png")
    with pytest.warns(UserWarning, match="differ in size; each is read as its centre square .* resized to 26x26"):
        data = load_images(tmp_path, "--eval-data")
    assert data.x.shape == (3, 3, 26, 26)  # the median of the crops' sides (44, 26, 18)
    x = data.x[torch.arange(3)]  # tall.png, wide.png, grey.png
    assert x.shape == (3, 3, 26, 26) and x[1].unique().tolist() == [120]  # no red: the border is cropped away
    assert x[0].unique().tolist() == [30] and x[2].unique().tolist() == [200]
    assert data.subset(slice(1, 3)).x[0].shape == (3, 26, 26)
    assert next(iterate_batches(data, COLOUR, 2, "cpu"))[0].shape == (2, 3, 32, 32)


def test_image_folder_refusals(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a" / "colour.png")
    (tmp_path / "a" / "colour.png").write_bytes(b"not a png at all")
    with pytest.raises(DfkdError, match=r"colour\.png: not a readable image"):
        load_images(tmp_path)


def test_a_class_folder_without_images_is_named(tmp_path):
    # "labels run 0..2 but class(es) 1 have no image; relabel": the user has folders, not labels
    from PIL import Image

    for cls in ("ant", "bee", "cat"):
        (tmp_path / cls).mkdir()
    for cls in ("ant", "cat"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / cls / "0.png")
    with pytest.raises(DfkdError, match=r"class folder\(s\) 'bee' hold no image; remove them or add images"):
        check_training_labels(load_images(tmp_path), "--data", str(tmp_path))
