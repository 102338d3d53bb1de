"""Speed settings (dfkd.precision, dfkd.logbuf): mixed precision learns, the step loop never waits for the device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import dfkd
import dfkd.engine
from dfkd.config import DistillConfig
from dfkd.engine import Run, distill, new_run_dir, resume
from dfkd.errors import DfkdError
from dfkd.logbuf import LossBuffer
from dfkd.methods import get_method
from dfkd.precision import Precision, bf16_flag, compile_in_place, eager, resolve_precision
from dfkd.runlog import RunLog

ROOT = Path(__file__).resolve().parent.parent
TEACHER = str(ROOT / "examples" / "mnist_lenet5_bn.pt")
MNIST_TEST = str(ROOT / "examples" / "mnist_test.npz")
#: Tensor methods that copy a device value to the host (and so wait for the device).
SYNCS = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy")
PACKAGE = Path(dfkd.__file__).resolve().parent


#: Files whose tensors are host tensors by construction, whatever the run's device: the record store (indices and
#: rows it keeps in RAM) and the augmentations (offsets drawn from the CPU generator, so a seed repeats a run on
#: any device). On a CPU-only machine the spy cannot tell a host tensor from a device one, so these are named.
HOST_ONLY = ("store.py", "augment.py")


def _dfkd_code(filename: str) -> bool:
    """Code of the package (not torch's, not the tests'), outside the host-only files."""
    path = Path(filename).resolve()
    roots = (PACKAGE, PACKAGE.parent / "generators")  # dfkd.generators may live beside the package
    return any(path.is_relative_to(r) for r in roots) and path.name not in HOST_ONLY


@contextmanager
def count_syncs() -> Iterator[Counter]:
    """Count calls of host-sync tensor methods made from dfkd code, by (method, file:line)."""
    seen: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def spy(name: str):  # noqa: ANN202
        original = originals[name]

        def call(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            frame = sys._getframe(1)
            if _dfkd_code(frame.f_code.co_filename):
                seen[(name, f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}")] += 1
            return original(self, *args, **kwargs)
        return call

    for name in SYNCS:
        setattr(torch.Tensor, name, spy(name))
    try:
        yield seen
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_the_spy_sees_a_sync() -> None:
    from dfkd.methods.base import step_logs

    with count_syncs() as seen:
        float(torch.tensor(1.0))  # from this test file: not counted
        LossBuffer().read()  # nothing to read: no sync
        buf = LossBuffer()
        buf.add(step_logs("s", {"loss": torch.tensor(2.0)}))
        assert buf.read() == {"s/total": 2.0}
    assert sum(seen.values()) == 1 and next(iter(seen))[0] == "tolist"


@pytest.mark.parametrize(("method", "precision"), [("dfad", "fp32"), ("dfad", "bf16"), ("deepinversion", "bf16"),
                                                   ("cmi", "bf16"), ("fast", "bf16")])
def test_step_loop_makes_no_host_sync_between_logging_steps(method: str, precision: str, tmp_path: Path) -> None:
    """N rounds of the loop with no logging, evaluation, checkpoint or watch step in between: the only read-back is
    the window's losses at the end, one `tolist` for every term together (and they are finite, or the loop
    would have raised). A GAN method, an inversion method and the two learnable-latent ones."""
    quick = get_method(method).quick
    cfg = DistillConfig(teachers=(TEACHER,), method=method, steps=6, out=str(tmp_path / "r"), log_every=1000,
                        precision=precision,
                        eval_every=1000, image_every=1000, ckpt_every=1000, fid_every=0,
                        params={**quick, "watch_every": 0, "select_every": 0})
    run = Run(cfg, new_run_dir(cfg, TEACHER)[0])
    log = RunLog(run.run_dir, None)
    try:
        with count_syncs() as seen:
            run.loop(log)
    finally:
        run.method.close()
        log.close()
    assert run.step == 6
    assert dict(seen) == {("tolist", next(k[1] for k in seen if k[1].startswith("logbuf.py"))): 1}, dict(seen)


def test_loss_buffer_logs_window_means_and_catches_a_nan(tmp_path: Path) -> None:
    buf = LossBuffer()
    buf.add({"a": torch.tensor(1.0), "b": 3.0})
    buf.add({"a": torch.tensor(3.0), "b": 5.0})
    assert buf.read(reset=False) == {"a": 2.0, "b": 4.0}
    assert buf.read() == {"a": 2.0, "b": 4.0} and not buf
    buf.add({"a": torch.tensor(float("nan"))})
    buf.add({"a": torch.tensor(1.0)})
    assert buf.read()["a"] != buf.read(reset=False).get("a", 0.0)  # NaN stays NaN over the window


def accuracy_curve(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["student/top1"] for r in lines if "student/top1" in r]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_bf16_autocast_run_learns(device: str, tmp_path: Path) -> None:
    """The MNIST demo teacher distilled under bf16 autocast (real-image KD, the fastest learner): finite losses,
    held-out accuracy rising well above chance. The data-free families run under bf16 in the no-sync test.

    KD's recipe for this teacher clips the student's gradient: unclipped at lr 0.05 this BN-free LeNet-5-half is
    unstable in fp32 too (measured 2026-12-04, 300 steps: 57.6 % on a CPU, a constant output on an H200 in fp32
    without channels-last or cudnn.benchmark). With the clip, 150 steps, seeds 0-3 ended at 91-95 % under bf16 on
    a CPU."""
    import numpy as np

    digits = np.load(MNIST_TEST)
    np.savez(tmp_path / "train.npz", x=digits["x"][:5000], y=digits["y"][:5000])
    np.savez(tmp_path / "held.npz", x=digits["x"][5000:6000], y=digits["y"][5000:6000])
    cfg = DistillConfig(teachers=(TEACHER,), method="kd", data=str(tmp_path / "train.npz"), steps=150, device=device,
                        out=str(tmp_path / "r"), precision="bf16", eval_data=str(tmp_path / "held.npz"),
                        eval_every=50, log_every=10, seed=0, fid_every=0,
                        params={"batch_size": 64, "select_every": 0, "watch_every": 0})
    result = distill(cfg)
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [v for r in lines for k, v in r.items() if k.startswith("loss/")]
    assert len(losses) >= 6 and all(torch.isfinite(torch.tensor(losses)))
    acc = accuracy_curve(result.run_dir)
    assert acc[-1] >= acc[0] and acc[-1] > 0.7, acc
    assert json.loads((result.run_dir / "config.json").read_text())["precision"] == "bf16"


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_a_forward_after_a_step_in_the_same_round_sees_the_new_weights(name: str) -> None:
    """A round steps its optimisers inside one autocast context (50 student steps a round for fast, Adam steps on
    the images for DeepInversion); autocast's cast cache would feed every later forward the first one's weights."""
    if name == "fp16" and not torch.cuda.is_available():
        pytest.skip("fp16 autocast is a GPU setting")
    device = torch.device("cuda" if name == "fp16" else "cpu")
    net = torch.nn.Linear(8, 8).to(device)
    x = torch.randn(4, 8, device=device, requires_grad=True)  # a leaf, like DeepInversion's images
    opt = torch.optim.SGD([*net.parameters(), x], lr=1.0)
    with Precision(name, device).autocast():
        first = net(x)
        first.float().square().sum().backward()
        opt.step()
        second = net(x)
    assert not torch.equal(first, second)
    with torch.no_grad():
        assert torch.allclose(second.float(), net(x).float(), rtol=0.05, atol=0.05), "the stepped weights and input"


def test_fp16_uses_a_loss_scale_that_is_checkpointed(tmp_path: Path) -> None:
    cfg = DistillConfig(teachers=(TEACHER,), method="dfad", steps=4, out=str(tmp_path / "r"), precision="fp16",
                        fid_every=0, params={"batch_size": 8, "select_every": 0})
    result = distill(cfg)
    ckpt = torch.load(result.run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["extra"]["precision"]["scaler"]["scale"] > 0
    assert result.step == 4


def test_resume_may_change_precision(tmp_path: Path) -> None:
    """A run started in bf16 continues in fp32 (e.g. moved from a GPU to a CPU): the weights are fp32 either way."""
    cfg = DistillConfig(teachers=(TEACHER,), method="dfad", steps=4, out=str(tmp_path / "r"), precision="bf16",
                        fid_every=0, params={"batch_size": 8, "select_every": 0})
    distill(cfg)
    result = resume(tmp_path / "r", steps=8, precision="fp32")
    assert result.step == 8
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["precision"] == "fp32"


def test_defaults_per_device_and_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dfkd.precision, "cpu_bf16", lambda: None)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cpu"), heavy=True) == "fp32", "bf16 emulated: slower than fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", torch.device("cuda")) == "fp32", "bf16 is opt-in on a GPU"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(DfkdError, match="--precision fp8"):
        resolve_precision("fp8", torch.device("cpu"))
    with pytest.raises(DfkdError, match="--precision fp32"):
        resolve_precision("bf16", torch.device("meta"))
    with pytest.warns(UserWarning, match="--precision fp16 on a CPU: float16 has no fast path there"):
        assert resolve_precision("fp16", torch.device("cpu"), world=1) == "fp16"  # 11x slower than fp32, unsaid
    with pytest.raises(DfkdError, match="fp16 with 2 processes.*bf16"):
        resolve_precision("fp16", torch.device("cpu"), world=2)  # a skipped step on one rank would hang the others


def test_auto_is_bf16_on_a_cpu_with_a_bf16_unit_for_a_heavy_teacher_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dfkd.precision, "cpu_bf16", lambda: "amx_bf16")
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, heavy=True) == "bf16"
    assert resolve_precision("auto", cpu, heavy=False) == "fp32", "a LeNet gains 1.1x: not worth bf16's rounding"
    assert resolve_precision("fp32", cpu, heavy=True) == "fp32", "an explicit choice stands"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", torch.device("cuda"), heavy=True) == "fp32"


def test_the_bf16_unit_is_read_from_the_cpu_flags() -> None:
    line = "flags\t\t: fpu sse2 avx2 avx512f {} fma\n"
    assert bf16_flag("processor\t: 0\n" + line.format("amx_bf16 amx_tile")) == "amx_bf16"
    assert bf16_flag(line.format("avx512_bf16")) == "avx512_bf16"
    assert bf16_flag(line.format("avx512vl")) is None
    assert bf16_flag("Processor\t: ARMv7\n") is None  # no flags line


def test_a_heavy_teacher_on_a_bf16_cpu_runs_in_bf16_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(dfkd.precision, "cpu_bf16", lambda: "amx_bf16")
    monkeypatch.setattr(dfkd.engine, "heavy_teacher", lambda teacher: 101_000_000)  # as a WRN-16-2 at 32 px
    cfg = DistillConfig(teachers=(TEACHER,), method="dfad", steps=2, out=str(tmp_path / "r"), fid_every=0,
                        params={"batch_size": 8, "select_every": 0})
    run = Run(cfg, new_run_dir(cfg, TEACHER)[0])
    try:
        assert run.precision.dtype is torch.bfloat16
        conv = next(m for m in run.method.student.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert any("precision: bf16" in line and "101M" in line and "--precision fp32" in line
                   for line in run.recipe_lines)
    finally:
        run.close()
    monkeypatch.setattr(dfkd.engine, "heavy_teacher", lambda teacher: None)  # a LeNet: fp32, nothing said
    cfg = replace(cfg, out=str(tmp_path / "r2"))
    run = Run(cfg, new_run_dir(cfg, TEACHER)[0])
    try:
        assert run.precision.dtype is None and not any("precision" in line for line in run.recipe_lines)
    finally:
        run.close()


def test_cli_refuses_a_bad_precision_in_a_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"precision": "half"}))
    out = subprocess.run([sys.executable, "-m", "dfkd", "distill", "--teacher", TEACHER, "--config", str(conf),
                          "--steps", "2", "--out", str(tmp_path / "r")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "precision" in out.stderr and "'bf16'" in out.stderr
    assert not (tmp_path / "r").exists()


def test_bf16_losses_are_fp32() -> None:
    from dfkd.losses import batch_stats, kl_div

    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = torch.nn.Linear(4, 3)(torch.randn(5, 4))
        assert s.dtype == torch.bfloat16
        assert kl_div(s, s.detach() + 1).dtype == torch.float32
        conv = torch.nn.Conv2d(3, 4, 3)(torch.randn(2, 3, 8, 8))
        assert all(t.dtype == torch.float32 for t in batch_stats(conv))


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    def broken_compile(fn, **kwargs):  # noqa: ANN001, ANN003, ANN202 - a compiler that fails at the first call
        def call(*a, **k):  # noqa: ANN002, ANN003, ANN202
            raise RuntimeError("no C++ compiler here\nmore detail")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    net = torch.nn.Linear(3, 2)
    keys = list(net.state_dict())
    compile_in_place(net, "student")
    x = torch.randn(4, 3)
    y1, y2 = net(x), net(x)
    err = capsys.readouterr().err
    assert err.count("warning: --compile: the student did not compile (RuntimeError: no C++ compiler here)") == 1
    assert len(err.strip().splitlines()) == 1
    assert torch.equal(y1, y2) and list(net.state_dict()) == keys


def test_a_copy_of_a_compiled_network_runs_its_own_weights() -> None:
    net = torch.nn.Linear(3, 2)
    calls = []
    net._compiled_call_impl = lambda *a, **k: calls.append(1) or net._call_impl(*a, **k)
    import copy

    twin = eager(copy.deepcopy(net))
    with torch.no_grad():
        twin.weight.zero_()
        twin.bias.zero_()
    assert torch.equal(twin(torch.ones(1, 3)), torch.zeros(1, 2)) and not calls


def test_prepare_keeps_state_dict_keys() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    keys = list(net.state_dict())
    Precision("bf16", torch.device("cpu"), compile=False).prepare({"student": net})
    assert list(net.state_dict()) == keys


def deterministic_flags() -> tuple[bool, bool, bool, bool]:
    cudnn = torch.backends.cudnn
    return (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_deterministic_sets_the_flags_for_the_run_and_puts_them_back(device: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = deterministic_flags()
    p = Precision("fp32", torch.device(device), deterministic=True)
    p.prepare({})  # no networks: flags only (a "cuda" Precision builds nothing on the device here)
    assert deterministic_flags() == (False, True, True, True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    p.restore()
    assert deterministic_flags() == before
    fast = Precision("fp32", torch.device(device))
    fast.prepare({})
    assert torch.backends.cudnn.benchmark == (device == "cuda") and not torch.are_deterministic_algorithms_enabled()
    fast.restore()
    assert deterministic_flags() == before


def test_a_deterministic_run_records_it_and_leaves_the_process_as_it_was(tmp_path: Path) -> None:
    before = deterministic_flags()
    cfg = DistillConfig(teachers=(TEACHER,), method="dfad", steps=2, out=str(tmp_path / "r"), fid_every=0,
                        deterministic=True, params={"batch_size": 8, "select_every": 0})
    distill(cfg)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["deterministic"] is True
    assert deterministic_flags() == before


def test_a_resume_whose_checkpoint_does_not_fit_leaves_the_process_as_it_was(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    before = deterministic_flags()
    cfg = DistillConfig(teachers=(TEACHER,), method="dfad", steps=2, out=str(tmp_path / "r"), fid_every=0,
                        deterministic=True, params={"batch_size": 8, "select_every": 0})
    distill(cfg)

    def unfit(self: Run, ckpt: dict) -> None:
        assert torch.are_deterministic_algorithms_enabled()  # prepared before the checkpoint is read
        raise DfkdError("the checkpoint does not fit")

    monkeypatch.setattr(Run, "_restore", unfit)
    with pytest.raises(DfkdError, match="does not fit"):
        resume(tmp_path / "r", steps=4)
    assert deterministic_flags() == before


def test_cli_resume_takes_precision_compile_and_deterministic(tmp_path: Path) -> None:
    run = tmp_path / "r"
    base = [sys.executable, "-m", "dfkd", "distill"]
    first = subprocess.run(base + ["--teacher", TEACHER, "--steps", "2", "--precision", "bf16", "--out", str(run),
                                   "--deterministic", "-p", "batch_size=8"], capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stderr
    assert torch.load(run / "checkpoint.pt", weights_only=True)["config"]["deterministic"] is True
    again = subprocess.run(base + ["--resume", str(run), "--steps", "4", "--precision", "fp32", "--no-compile",
                                   "--no-deterministic"], capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0, again.stderr
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 4 and saved["config"]["precision"] == "fp32" and saved["config"]["compile"] is False
    assert saved["config"]["deterministic"] is False
