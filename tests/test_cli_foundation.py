"""The command line of the foundation: --help, train-teacher, evaluate, and one-line errors for user mistakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dfkd import load_model
from dfkd.cli.main import main

# Eight positions of a bright 7x7 square on a 3x3 grid (the centre left out), far enough apart that the
# training augmentation's shifts (up to 1/8 of the side) never carry one class onto another.
POSITIONS = [(r, c) for r in range(3) for c in range(3) if (r, c) != (1, 1)]


def _squares(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 8)
    x = rng.integers(0, 40, (n, 28, 28), dtype=np.uint8)  # dim noise, so no two images are equal
    for i, k in enumerate(y):
        r, c = POSITIONS[k]
        x[i, 1 + 9 * r: 8 + 9 * r, 1 + 9 * c: 8 + 9 * c] = 255
    return x, y.astype(np.int64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Two OpenMP threads on a busy two-core machine spin against each other (tens of times slower); one suffices.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    folder = tmp_path_factory.mktemp("squares")
    for name, n, seed in (("train", 400, 0), ("test", 80, 1)):
        x, y = _squares(n, seed)
        np.savez(folder / f"{name}.npz", x=x, y=y)
    return folder


@pytest.fixture(scope="module")
def trained(squares):
    out = squares / "teacher.pt"
    args = ["train-teacher", "--data", str(squares / "train.npz"), "--arch", "lenet5", "--out", str(out),
            "--epochs", "3", "--batch-size", "32", "--device", "cpu", "--seed", "0"]
    result = CliRunner().invoke(main, args)
    return result, out


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def _assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code != 0
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_lists_the_commands():
    result = _run("--help")
    assert result.exit_code == 0
    for command in ("train-teacher", "evaluate", "models"):
        assert command in result.stdout
    assert "Example" in result.stdout


@pytest.mark.parametrize("command", ["train-teacher", "evaluate"])
def test_command_help_shows_an_example(command):
    result = _run(command, "--help")
    assert result.exit_code == 0 and "Example" in result.stdout and "--data" in result.stdout


def test_every_command_help_shows_an_example():  # `dfkd models --help` had none, as the README says each has
    for command in main.commands:
        result = _run(command, "--help")
        assert result.exit_code == 0 and "Example:" in result.stdout, command


def test_models_lists_the_zoo():
    result = _run("models")
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert "lenet5_bn" in names and "resnet18" in names and "wrn_40_2" in names


def test_train_teacher_writes_a_model_file(trained, squares):
    result, out = trained
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout
    model, meta = load_model(out)
    assert meta.arch == "lenet5" and meta.num_classes == 8
    assert meta.input_spec.channels == 1 and meta.input_spec.size == 32
    assert meta.provenance["kind"] == "teacher" and meta.provenance["trained_on"] == "train.npz"
    assert meta.provenance["epochs"] == 3
    assert [p.name for p in squares.iterdir() if p.name.startswith(".")] == []  # no temp file left behind


def test_train_teacher_auto_precision_is_bf16_for_a_heavy_model_on_a_bf16_cpu(squares, tmp_path, monkeypatch):
    import dfkd.methods._recipes
    import dfkd.precision
    import dfkd.train_teacher

    monkeypatch.setattr(dfkd.precision, "cpu_bf16", lambda: "amx_bf16")
    monkeypatch.setattr(dfkd.methods._recipes, "CPU_TEACHER_MACS", 1000)  # a LeNet-5 counts as heavy here
    dtypes: list[torch.dtype] = []
    conv_forward = torch.nn.Conv2d.forward

    def spy(self, x):
        out = conv_forward(self, x)
        dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Conv2d, "forward", spy)
    args = ["train-teacher", "--data", str(squares / "train.npz"), "--arch", "lenet5", "--epochs", "3",
            "--batch-size", "32", "--device", "cpu", "--eval-data", str(squares / "test.npz")]
    result = _run(*args, "--out", str(tmp_path / "bf16.pt"))
    assert result.exit_code == 0, result.output
    assert "precision: bf16 (auto:" in result.output and "--precision fp32 keeps fp32" in result.output
    assert torch.bfloat16 in dtypes, "the training forwards ran in bf16"
    assert torch.float32 in dtypes, "the per-epoch evaluation stays fp32"
    model, meta = load_model(tmp_path / "bf16.pt")
    assert meta.provenance["top1"] >= 0.9, "it learned"
    assert all(t.is_contiguous() for t in model.state_dict().values()), "the file holds plain layouts"
    dtypes.clear()
    result = _run(*args, "--out", str(tmp_path / "fp32.pt"), "--precision", "fp32")
    assert result.exit_code == 0, result.output
    assert "precision" not in result.output and torch.bfloat16 not in dtypes


def test_evaluate_json(trained, squares):
    assert trained[0].exit_code == 0, trained[0].output
    result = _run("evaluate", "--model", str(trained[1]), "--data", str(squares / "test.npz"), "--json",
                  "--device", "cpu")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert isinstance(res, dict) and res["n"] == 80
    assert 0.0 <= res["top1"] <= 1.0 and 0.0 <= res["top5"] <= 1.0
    assert res["top1"] >= 0.9, f"an easy task, yet top-1 is {res['top1']}"


def test_evaluate_with_a_teacher_reports_agreement(trained, squares):
    model = str(trained[1])
    result = _run("evaluate", "--model", model, "--data", str(squares / "test.npz"), "--teacher", model,
                  "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    assert res["agreement"] == 1.0 and res["teacher_top1"] == res["top1"]


def test_evaluate_refuses_agreement_with_a_teacher_of_other_classes(trained, squares):
    # an 8-class model against a 10-class teacher gave an agreement figure, with a low-accuracy warning only
    other = str(Path(__file__).resolve().parents[1] / "examples" / "mnist_lenet5.pt")
    result = _run("evaluate", "--model", str(trained[1]), "--data", str(squares / "test.npz"), "--teacher", other,
                  "--device", "cpu")
    _assert_one_line_error(result, f"--teacher {other}: has 10 classes", "has 8; agreement needs the same classes")


@pytest.mark.parametrize("command", [
    ["synthesize", "--method", "zskd", "--out", "{tmp}/s.npz"], ["evaluate", "--model", "{T}", "--data", "x.npz"],
    ["quantize", "{T}", "--out", "{tmp}/q.onnx"], ["convert", "--out", "{tmp}/c.pt"], ["audit", "x.npz"],
    ["methods", "--params", "dfad"], ["fid-stats", "x.npz", "{tmp}/f", "--features", "teacher"],
    ["extend", "--data", "x.npz", "--out", "{tmp}/e.pt"], ["search", "--eval-data", "x.npz", "--out", "{tmp}/r"]])
def test_a_second_teacher_of_a_one_teacher_command_is_refused(command, trained, tmp_path):
    # click kept the last --teacher: `synthesize --teacher A --teacher B` wrote B's images alone, unsaid
    teacher = str(trained[1])
    args = [a.format(T=teacher, tmp=tmp_path) for a in command] + ["--teacher", teacher, "--teacher", teacher]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "given 2 times" in res.output and "takes one teacher" in res.output, res.output
    assert list(tmp_path.iterdir()) == []


def test_evaluate_human_readable(trained, squares):
    result = _run("evaluate", "--model", str(trained[1]), "--data", str(squares / "test.npz"), "--device", "cpu")
    assert result.exit_code == 0 and "top-1" in result.stdout and "80 images" in result.stdout


def test_evaluate_missing_model_file(tmp_path, squares):
    result = _run("evaluate", "--model", str(tmp_path / "nope.pt"), "--data", str(squares / "test.npz"))
    _assert_one_line_error(result, "--model", "nope.pt", "no such file")


def test_evaluate_corrupt_model_file(tmp_path, squares):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(np.random.default_rng(0).bytes(3000))
    result = _run("evaluate", "--model", str(bad), "--data", str(squares / "test.npz"))
    _assert_one_line_error(result, "--model", "bad.pt", "corrupt")


def test_evaluate_labels_beyond_the_model(tmp_path, trained):
    x, y = _squares(16, 3)
    np.savez(tmp_path / "more.npz", x=x, y=y + 4)  # labels up to 11, the model has 8 classes
    result = _run("evaluate", "--model", str(trained[1]), "--data", str(tmp_path / "more.npz"), "--device", "cpu")
    _assert_one_line_error(result, "--data", "more.npz", "8 classes")


def test_train_teacher_unknown_arch(tmp_path, squares):
    result = _run("train-teacher", "--data", str(squares / "train.npz"), "--arch", "lenet6",
                  "--out", str(tmp_path / "t.pt"))
    _assert_one_line_error(result, "lenet6", "lenet5")
    assert not (tmp_path / "t.pt").exists()


def test_train_teacher_that_diverges_writes_nothing(tmp_path, squares):
    # at --lr 1e30 the loss was nan from the first batch, and train-teacher wrote a model of NaN weights, exit 0
    result = _run("train-teacher", "--data", str(squares / "train.npz"), "--arch", "lenet5", "--epochs", "1",
                  "--lr", "1e30", "--out", str(tmp_path / "t.pt"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    last = result.stderr.replace("\r", "\n").strip().splitlines()[-1]  # after the cleared progress bar
    assert last.startswith("error: training diverged in epoch 1") and "lower --lr (now 1e+30)" in last
    assert last.endswith("t.pt was not written") and not (tmp_path / "t.pt").exists()


def test_train_teacher_of_a_batchnorm_net_trains_a_last_batch_of_one_image(tmp_path, squares):
    # 129 images at batch 128: "Expected more than 1 value per channel when training", a traceback after the epoch
    x, y = _squares(33, 2)
    np.savez(tmp_path / "odd.npz", x=x, y=y)
    result = _run("train-teacher", "--data", str(tmp_path / "odd.npz"), "--arch", "lenet5_bn", "--epochs", "1",
                  "--batch-size", "16", "--out", str(tmp_path / "t.pt"))
    assert result.exit_code == 0, result.output
    assert load_model(tmp_path / "t.pt")[1].arch == "lenet5_bn"
    result = _run("train-teacher", "--data", str(tmp_path / "odd.npz"), "--arch", "lenet5_bn", "--batch-size", "1",
                  "--out", str(tmp_path / "t1.pt"))
    _assert_one_line_error(result, "--batch-size 1", "BatchNorm", "--batch-size 2 or more")
    assert not (tmp_path / "t1.pt").exists()


def test_train_teacher_missing_data(tmp_path):
    result = _run("train-teacher", "--data", str(tmp_path / "none.npz"), "--arch", "lenet5",
                  "--out", str(tmp_path / "t.pt"))
    _assert_one_line_error(result, "--data", "none.npz")
    assert not (tmp_path / "t.pt").exists()


@pytest.mark.parametrize("x, words", [
    # N x H x W x 2 was read as 28-channel images of 28 x 2 pixels, and a teacher of those trained
    (np.zeros((16, 28, 28, 2), np.uint8), ("(16, 28, 28, 2) looks like N x H x W x C with 2 channels last",
                                           "images of 28 channels of 28 x 2 pixels")),
    # it said "input spec: std values must be positive", a spec the user never gave
    (np.full((16, 28, 28), 7, np.uint8), ("every pixel of channel 0 of its first 16 images is 7",)),
])
def test_train_teacher_refuses_images_no_classifier_learns_from(tmp_path, x, words):
    np.savez(tmp_path / "bad.npz", x=x, y=np.arange(16) % 2)
    result = _run("train-teacher", "--data", str(tmp_path / "bad.npz"), "--arch", "lenet5",
                  "--out", str(tmp_path / "t.pt"))
    _assert_one_line_error(result, "--data", *words)
    assert not (tmp_path / "t.pt").exists()


@pytest.mark.parametrize("labels, words", [
    (np.full(16, -1), ("class indices 0..K-1", "-1")),
    (np.full(16, 15), ("every image has label 15", "at least 2 classes")),
    (np.arange(16) % 2 * 2, ("class(es) 1 have no image", "relabel the 2 classes 0..1")),
    (np.arange(16) % 10 + 1, ("labels run 1..10, read as class indices 0..10", "class(es) 0 have no image")),
    (np.zeros(0), ("holds no images",)),
])
def test_train_teacher_refuses_labels_no_classifier_learns_from(tmp_path, labels, words):
    x = np.zeros((len(labels), 28, 28), np.uint8)
    np.savez(tmp_path / "bad.npz", x=x, y=labels.astype(np.int64))
    result = _run("train-teacher", "--data", str(tmp_path / "bad.npz"), "--arch", "lenet5",
                  "--out", str(tmp_path / "t.pt"))
    _assert_one_line_error(result, "--data", "bad.npz", *words)
    assert not (tmp_path / "t.pt").exists()


def test_python_dash_m_dfkd():
    proc = subprocess.run([sys.executable, "-m", "dfkd", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train-teacher" in proc.stdout and "evaluate" in proc.stdout


def test_cli_help_does_not_import_torch() -> None:
    code = "import sys\nfrom dfkd.cli.main import main\nimport dfkd\nprint('torch' in sys.modules, dfkd.__all__[0])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "DfkdError"]


def test_public_names_resolve_lazily() -> None:
    import dfkd

    assert dfkd.load_teacher is __import__("dfkd.teacher", fromlist=["load_teacher"]).load_teacher
    assert all(getattr(dfkd, name) is not None for name in dfkd.__all__)
    with pytest.raises(AttributeError):
        dfkd.no_such_name  # noqa: B018


def test_dfkd_warnings_print_as_one_line_and_others_as_usual() -> None:
    import dfkd.methods._inversion as inv
    from dfkd.cli.main import format_warning

    ours = format_warning(UserWarning("no BatchNorm"), UserWarning, inv.__file__, 70, "self.bn = ...")
    assert ours == "warning: no BatchNorm\n"
    theirs = format_warning(UserWarning("deprecated"), UserWarning, torch.__file__, 3, "x = 1")
    assert torch.__file__ in theirs and "deprecated" in theirs


def test_under_torchrun_only_process_0_prints_dfkds_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    # every start-up warning was printed once per process
    import dfkd.methods._inversion as inv
    from dfkd.cli.main import format_warning

    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # RANK alone (a batch system's): a single process still speaks
    assert format_warning(UserWarning("no BatchNorm"), UserWarning, inv.__file__, 70, "") == "warning: no BatchNorm\n"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert format_warning(UserWarning("no BatchNorm"), UserWarning, inv.__file__, 70, "") == ""
    monkeypatch.setenv("RANK", "0")
    assert format_warning(UserWarning("no BatchNorm"), UserWarning, inv.__file__, 70, "") == "warning: no BatchNorm\n"


def test_bn_free_teacher_warning_reaches_the_user_as_one_line(bnfree_teacher_file: str, tmp_path) -> None:
    cmd = [sys.executable, "-m", "dfkd", "distill", "--teacher", bnfree_teacher_file, "--method", "deepinversion",
           "--steps", "2", "-p", "batch_size=4", "-p", "iterations=2", "-p", "s_steps=2", "--fid-every", "0",
           "--out", str(tmp_path / "run")]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "BatchNorm" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: deepinversion:") and "self.bn" not in res.stderr


def test_methods_params_show_the_recipe_a_teacher_gets(teacher_file: str) -> None:
    paper = CliRunner().invoke(main, ["methods", "--params", "dfad"])
    lenet = CliRunner().invoke(main, ["methods", "--params", "dfad", "--teacher", teacher_file])
    assert paper.exit_code == 0 and lenet.exit_code == 0, lenet.output

    def batch(out: str) -> str:
        return [ln.split()[1] for ln in out.splitlines() if ln.strip().startswith("batch_size")][0]

    assert (batch(paper.output), batch(lenet.output)) == ("512", "64")
    assert "student network: lenet5_half (15,738 parameters" in lenet.output  # the student a run would get
    assert "student init: 10 tensors from lenet5_bn (the first 3, 8, 60, 42 output channels" in lenet.output
    assert "student network" not in paper.output and "student init" not in paper.output
    lone = CliRunner().invoke(main, ["methods", "--teacher", teacher_file])
    assert lone.exit_code == 2 and "--params" in lone.output



def test_methods_params_with_an_unreadable_teacher_says_only_that(tmp_path) -> None:
    # it printed the method's whole description, then the (correct) error
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04 truncated")
    res = CliRunner().invoke(main, ["methods", "--params", "dfad", "--teacher", str(tmp_path / "trunc.pt")])
    _assert_one_line_error(res, f"--teacher {tmp_path / 'trunc.pt'}")
    assert res.stdout == ""


def test_evaluate_names_model_in_its_load_warnings_and_hides_torch_deprecation_of_torchscript(tmp_path, squares):
    # A TorchScript model with a softmax head: the load-time note said "--teacher FILE" to a user who gave --model,
    # and torch's "`torch.jit.load` is deprecated" FutureWarning came with every such file.
    class Softmaxed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(28 * 28, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.flatten(1)).softmax(1)

    path = tmp_path / "probs.pt"
    torch.jit.trace(Softmaxed().eval(), torch.zeros(2, 1, 28, 28)).save(str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _run("evaluate", "--model", str(path), "--data", str(squares / "test.npz"), "--channels", "1",
                      "--input-size", "28", "--mean", "0.5", "--std", "0.5", "--device", "cpu")
    assert result.exit_code == 0, result.output
    said = [str(w.message) for w in caught]
    assert any(m.startswith(f"--model {path}: it outputs probabilities") for m in said), said
    assert not any("--teacher" in m or "jit.load" in m for m in said), said
