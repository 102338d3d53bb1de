"""`dfkd extend`: class-incremental distillation with data-free replay (runs, learns, resumes, refuses)."""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import dfkd.lifelong_train as lt
from dfkd.cli.main import main
from dfkd.errors import DfkdError
from dfkd.lifelong import ExtendConfig, append_labels, extend
from dfkd.lifelong_train import grow_model
from dfkd.modelfile import ModelFile, load_model, save_model
from dfkd.models import create
from dfkd.spec import MNIST_SPEC
from dfkd.teacher import load_teacher

FAST_REPLAY = {"batch_size": 32, "synth_batch_size": 32, "iterations": 10}


def toy_images(classes: range, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class c: a fixed random 28x28 template (seeded by c) plus noise; easy, but not separable by brightness."""
    rng = np.random.default_rng(seed)
    templates = {c: np.random.default_rng(100 + c).random((28, 28)) > 0.7 for c in classes}
    y = rng.choice(list(classes), n)
    x = np.stack([templates[c] * 200 + rng.integers(0, 55, (28, 28)) for c in y]).astype(np.uint8)
    return x, y.astype(np.int64)


def write(path: Path, classes: range, n: int, seed: int) -> str:
    x, y = toy_images(classes, n, seed)
    np.savez(path, x=x, y=y)
    return str(path)


def train_toy_teacher(path: Path, classes: int) -> str:
    """A LeNet-5-half-BN that knows toy classes 0..classes-1 (100 Adam steps)."""
    from dfkd.data import to_model_input

    torch.manual_seed(0)
    kwargs = {"num_classes": classes, "in_channels": 1, "input_size": 32}
    model = create("lenet5_half_bn", **kwargs)
    x, y = toy_images(range(classes), 256, 1)
    xs, ys = to_model_input(torch.from_numpy(x[:, None]), MNIST_SPEC), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for i in range(100):
        idx = torch.arange(i * 32, i * 32 + 32) % len(xs)
        loss = F.cross_entropy(model(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model(path, model.eval(), ModelFile("lenet5_half_bn", kwargs, MNIST_SPEC, classes))
    return str(path)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("lifelong")
    x, y = toy_images(range(5, 7), 128, 5)  # the next task: two classes a 5-class model does not know, labelled from 0
    np.savez(d / "next.npz", x=x, y=y - 5)
    return {"teacher": train_toy_teacher(d / "old.pt", 3), "new": write(d / "new.npz", range(3, 5), 256, 2),
            "old": write(d / "old.npz", range(3), 256, 3), "test": write(d / "test.npz", range(5), 200, 4),
            "next": str(d / "next.npz"), "test7": write(d / "test7.npz", range(7), 140, 6)}


def config(toy: dict[str, str], out: Path, **kw: object) -> ExtendConfig:
    base = {"eval_data": toy["test"], "old_data": toy["old"], "replay": 64, "params": FAST_REPLAY, "steps": 60,
            "batch_size": 32, "lr": 3e-3, "device": "cpu", "checkpoint_every": 20}
    return ExtendConfig(teacher=toy["teacher"], data=toy["new"], out=str(out), **{**base, **kw})


@pytest.fixture(scope="module")
def finished(toy: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[ExtendConfig, dict]:
    cfg = config(toy, tmp_path_factory.mktemp("run") / "new.pt")
    return cfg, extend(cfg, load_teacher(cfg.teacher))


def interrupted(monkeypatch: pytest.MonkeyPatch, module: object, name: str, at: int, run: Callable[[], object]) -> None:
    """`run()` stopped by Ctrl-C at the `at`-th call of `module.name`; the function is put back afterwards."""
    real, calls = getattr(module, name), []

    def stopping(*args: object) -> object:
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(module, name, stopping)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(module, name, real)


def test_smoke_writes_a_model_with_appended_classes(finished: tuple[ExtendConfig, dict]) -> None:
    cfg, report = finished
    model, meta = load_model(cfg.out)
    assert meta.num_classes == 5 and meta.provenance["kind"] == "extended"
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 5)
    assert (report["old_classes"], report["all_classes"], report["replay_images"]) == (3, 5, 64)
    assert {"extend", "finetune", "joint", "teacher"} <= set(report)
    assert (cfg.work_dir() / "report.json").exists() and (cfg.work_dir() / "replay.npz").exists()


def test_extend_keeps_old_classes_that_finetuning_forgets(finished: tuple[ExtendConfig, dict]) -> None:
    _, r = finished
    assert r["teacher"]["old"] > 0.9
    assert r["finetune"]["old"] < 0.5 and r["finetune"]["new"] > 0.9  # forgetting: new data alone
    assert r["extend"]["old"] > 0.9 and r["extend"]["new"] > 0.9
    assert r["extend"]["all"] > r["finetune"]["all"] + 0.3
    assert r["joint"]["all"] > 0.9


def test_grown_model_starts_as_the_teacher_on_old_classes(toy: dict[str, str]) -> None:
    teacher = load_teacher(toy["teacher"])
    model = grow_model(teacher, 5).eval()
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x)[:, :3], teacher(x), atol=1e-6)


def test_repeatable_for_a_second_task(finished: tuple[ExtendConfig, dict], toy: dict[str, str],
                                      tmp_path: Path) -> None:
    cfg, _ = finished
    second = dataclasses.replace(config(toy, tmp_path / "seven.pt", eval_data=toy["test7"], old_data=None,
                                        steps=20), teacher=cfg.out, data=toy["next"])
    report = extend(second, load_teacher(cfg.out))
    assert load_model(second.out)[1].num_classes == 7 and report["old_classes"] == 5
    assert "joint" not in report and "finetune" in report


def test_interrupted_run_resumes_to_the_same_model(toy: dict[str, str], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    whole = config(toy, tmp_path / "a.pt", eval_data=None, old_data=None, steps=50)
    extend(whole, load_teacher(whole.teacher))
    cut = config(toy, tmp_path / "b.pt", eval_data=None, old_data=None, steps=50)
    interrupted(monkeypatch, lt, "abd_loss", 31, lambda: extend(cut, load_teacher(cut.teacher)))
    assert not Path(cut.out).exists()  # nothing that looks finished
    extend(cut, load_teacher(cut.teacher), resume=True)
    a, b = load_model(whole.out)[0].state_dict(), load_model(cut.out)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # SIGTERM (kill, a scheduler) ended the process silently, losing the steps since the last checkpoint (20)
    term = config(toy, tmp_path / "c.pt", eval_data=None, old_data=None, steps=50)
    real, calls, at = lt.abd_loss, [], {"call": 31}

    def terminated(*args: object) -> object:
        calls.append(1)
        if len(calls) == at["call"]:
            signal.raise_signal(signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(lt, "abd_loss", terminated)
    with pytest.raises(KeyboardInterrupt, match="stopped at step 31 of the extend phase; checkpoint saved"):
        extend(term, load_teacher(term.teacher))
    assert torch.load(term.work_dir() / "extend.pt", weights_only=True)["step"] == 31
    # a stop in a phase's last step was forgotten: the run went on through every other phase and exited 0
    calls.clear()
    at["call"] = 50
    last = config(toy, tmp_path / "d.pt", eval_data=None, old_data=None, steps=50)
    with pytest.raises(KeyboardInterrupt, match="stopped at step 50 of the extend phase"):
        extend(last, load_teacher(last.teacher))
    monkeypatch.setattr(lt, "abd_loss", real)
    assert not Path(last.out).exists()
    for cut_run in (term, last):
        extend(cut_run, load_teacher(cut_run.teacher), resume=True)
        c = load_model(cut_run.out)[0].state_dict()
        assert all(torch.equal(a[k], c[k]) for k in a)


class ByBrightness(torch.nn.Module):
    """A 3-class 'model' that answers an image's mean pixel / 20 (clamped to its classes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = (x.mean((1, 2, 3)) * 255 / 20).round().long().clamp(0, 2)
        return F.one_hot(level, 3).float() * 10


def test_data_of_the_old_classes_labelled_from_0_is_refused() -> None:
    # the whole dataset (old classes and new, labelled 0..9) was taken as 10 new classes: a 15-class model whose
    # classes 5..9 were the old 0..4 again
    from dfkd.data import ImageData
    from dfkd.lifelong import check_not_old_classes
    from dfkd.spec import InputSpec
    from dfkd.teacher import Teacher

    teacher = Teacher(ByBrightness(), InputSpec(1, 8, (0.0,), (1.0,)), source="old.pt")
    labels = torch.arange(6).repeat(4)
    whole = ImageData((labels * 20).to(torch.uint8)[:, None, None, None].expand(-1, 1, 8, 8).contiguous(), labels)
    with pytest.raises(DfkdError, match=r"--data n: labels run 0..5, and the old model answers 100 % of the images "
                                        r"labelled 0..2 with that very label: they are its own 3 classes"):
        check_not_old_classes(whole, teacher, "n", torch.device("cpu"))
    new = ImageData(((labels + 3) * 20).to(torch.uint8)[:, None, None, None].expand(-1, 1, 8, 8).contiguous(),
                    labels)  # six new classes from 0: the old model answers its last class to them all
    check_not_old_classes(new, teacher, "n", torch.device("cpu"))
    # images of old classes 0..1 alone, labelled 0..1: taught as new classes 3..4 without a word (old top-1 fell
    # from 99.5 to 43 % on MNIST)
    two = torch.arange(2).repeat(4)
    old_only = ImageData((two * 20).to(torch.uint8)[:, None, None, None].expand(-1, 1, 8, 8).contiguous(), two)
    with pytest.raises(DfkdError, match=r"--data n: labels 0..1 are read as new classes 3..4, but the old model "
                                        r"answers 100 % of the images with that very label: they are its own"):
        check_not_old_classes(old_only, teacher, "n", torch.device("cpu"))
    check_not_old_classes(ImageData(new.x[:8], two), teacher, "n", torch.device("cpu"))  # truly new, from 0


def test_old_data_without_eval_data_is_refused(toy: dict[str, str], tmp_path: Path) -> None:
    # it trains only the joint reference, measured on --eval-data: read, checked and left unused, unsaid
    cfg = config(toy, tmp_path / "a.pt", eval_data=None)
    with pytest.raises(DfkdError, match="--old-data .* add --eval-data TEST, or drop --old-data"):
        extend(cfg, load_teacher(cfg.teacher))
    assert not cfg.work_dir().exists()


@pytest.mark.parametrize("text, why", [("{\n", "not JSON"), ("[1, 2]", "a JSON list, not an object")])
def test_a_damaged_work_folder_is_one_line_on_resume(toy: dict[str, str], tmp_path: Path, text: str,
                                                     why: str) -> None:
    # a JSONDecodeError or AttributeError traceback; a truncated phase checkpoint, torch's RuntimeError
    from types import SimpleNamespace

    from dfkd import lifelong, lifelong_train

    cfg = config(toy, tmp_path / "m.pt")
    cfg.work_dir().mkdir()
    (cfg.work_dir() / "config.json").write_text(text)
    with pytest.raises(DfkdError, match=rf"config.json: damaged \({why}.*put back the file the run wrote"):
        lifelong._check_config(cfg, cfg.work_dir(), resume=True)
    (tmp_path / "phase.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DfkdError, match="phase.pt"):
        lifelong_train._load(SimpleNamespace(checkpoint=tmp_path / "phase.pt"), None)


def test_labels_are_appended_or_kept() -> None:
    from dfkd.data import ImageData

    x = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    assert append_labels(ImageData(x, torch.tensor([0, 1, 1])), 5, "n").y.tolist() == [5, 6, 6]
    assert append_labels(ImageData(x, torch.tensor([5, 7, 6])), 5, "n").y.tolist() == [5, 7, 6]


def test_refusals(toy: dict[str, str], finished: tuple[ExtendConfig, dict], tmp_path: Path) -> None:
    cfg, _ = finished
    with pytest.raises(DfkdError, match="holds an earlier extend run; continue it with --resume"):
        again = dataclasses.replace(cfg, out=str(tmp_path / "x.pt"), work=str(cfg.work_dir()))
        extend(again, load_teacher(cfg.teacher))
    with pytest.raises(DfkdError, match="--resume: steps was 60 .* now 61"):
        extend(dataclasses.replace(cfg, steps=61), load_teacher(cfg.teacher), resume=True)
    with pytest.raises(DfkdError, match="holds no extend run"):
        extend(config(toy, tmp_path / "y.pt"), load_teacher(cfg.teacher), resume=True)
    # a folder of the user's at the work folder named after --out was "an earlier extend run", and --resume then
    # said it held none: the advice looped, and it said to remove the user's folder
    (tmp_path / "z.extend").mkdir()
    (tmp_path / "z.extend" / "notes.txt").write_text("mine")
    with pytest.raises(DfkdError, match=r"--out .*z.pt: its work folder .*z.extend \(named after --out\): holds "
                                        r"files that are not an extend run's \(notes.txt\); give --work DIR"):
        extend(config(toy, tmp_path / "z.pt"), load_teacher(cfg.teacher))
    assert (tmp_path / "z.extend" / "notes.txt").read_text() == "mine"
    with pytest.raises(DfkdError, match=r"--work .*z.extend: holds files that are not an extend run's \(notes.txt\); "
                                        r"give another --work"):  # not "give --work DIR", which was given
        extend(config(toy, tmp_path / "w.pt", work=str(tmp_path / "z.extend")), load_teacher(cfg.teacher))


def test_cli_extend_and_errors(toy: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    args = ["extend", "--teacher", toy["teacher"], "--data", toy["new"], "--out", str(out), "--eval-data",
            toy["test"], "--replay", "32", "--steps", "5", "--batch-size", "16", "--device", "cpu"]
    args += [a for k, v in FAST_REPLAY.items() for a in ("-p", f"{k}={v}")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "fine-tune on new data only" in res.output and out.exists() and "joint" not in res.output
    res = CliRunner().invoke(main, args[:6] + [str(tmp_path / "z.pt"), "--eval-data", toy["new"][:-4] + "nope.npz"])
    assert res.exit_code == 2 and res.output.startswith("error: --eval-data") and "Traceback" not in res.output
    res = CliRunner().invoke(main, args)  # extend has no --force: the message offered it
    assert res.exit_code == 2 and f"--out {out}: already exists; choose another name or remove it" in res.output
    res = CliRunner().invoke(main, [*args[:6], str(tmp_path / "k.pt"), "--method", "kd"])  # "give --data", given
    assert res.exit_code == 2 and "--method kd: learns from your images, it makes no synthetic ones" in res.output
    # a typo in --method or -p was refused after OUT.extend/config.json was written: the corrected command was then
    # refused ("holds an earlier extend run"), and so was --resume ("method was 'nosuch'")
    for typo, said in ((["--method", "nosuch"], "unknown method 'nosuch'"), (["-p", "bogus=1"], "bogus")):
        res = CliRunner().invoke(main, [*args[:6], str(tmp_path / "k.pt"), *typo])
        assert res.exit_code == 2 and said in res.output, res.output
        assert not (tmp_path / "k.extend").exists()
    # a SIGTERM's stop (checkpoint saved) exited 130, as Ctrl-C's, where every other command exits 128 + 15
    real, calls = lt.abd_loss, []

    def terminated(*a: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)
        return real(*a)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(lt, "abd_loss", terminated)
        res = CliRunner().invoke(main, [*args[:6], str(tmp_path / "t.pt"), *args[7:]])
    assert res.exit_code == 128 + signal.SIGTERM and "checkpoint saved" in res.output, res.output


def test_labels_across_the_old_classes_or_other_channels_are_refused(toy: dict[str, str], tmp_path: Path) -> None:
    from dfkd.data import ImageData
    from dfkd.lifelong import check_new_channels

    x = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(DfkdError, match=r"--data n: labels run 3..9, from inside the old model's 5 classes"):
        append_labels(ImageData(x, torch.tensor([3, 5, 9])), 5, "n")
    # more new classes than old ones, labelled from 0 as the help says: refused as "on both sides" of 5, with the
    # advice to label them from 0
    six = ImageData(torch.zeros(6, 1, 8, 8, dtype=torch.uint8), torch.arange(6))
    assert append_labels(six, 5, "n").y.tolist() == [5, 6, 7, 8, 9, 10]
    colour = ImageData(torch.zeros(3, 3, 28, 28, dtype=torch.uint8), torch.tensor([0, 1, 1]))
    with pytest.raises(DfkdError, match="--data c.npz: images have 3 channel.s., the old model takes 1"):
        check_new_channels(colour, load_teacher(toy["teacher"]), "c.npz")


def test_new_classes_without_images_are_warned_about() -> None:
    from dfkd.data import ImageData

    x = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    with pytest.warns(UserWarning, match=r"new class\(es\) 5, 6, 7, 8, 9, ... of the extended model have no image"):
        assert append_labels(ImageData(x, torch.tensor([12, 12, 12])), 5, "n").y.tolist() == [12, 12, 12]


def test_work_that_is_a_file_is_refused(toy: dict[str, str], tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(DfkdError, match="--work .*afile: is a file, not a folder"):
        extend(config(toy, tmp_path / "w.pt", work=str(afile)), load_teacher(toy["teacher"]))
    assert afile.read_text() == "mine"


def test_resume_finishes_a_run_that_wrote_its_model(toy: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    args = ["extend", "--teacher", toy["teacher"], "--data", toy["new"], "--out", str(out), "--eval-data",
            toy["test"], "--replay", "32", "--steps", "3", "--batch-size", "16", "--device", "cpu"]
    args += [a for k, v in FAST_REPLAY.items() for a in ("-p", f"{k}={v}")]
    assert CliRunner().invoke(main, args).exit_code == 0
    (tmp_path / "m.extend" / "report.json").unlink()  # stopped after the model was written, before the end
    res = CliRunner().invoke(main, [*args, "--resume"])
    assert res.exit_code == 0 and "fine-tune on new data only" in res.output, res.output
    assert (tmp_path / "m.extend" / "report.json").exists()


def test_resume_refuses_a_user_file_at_out(toy: dict[str, str], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(toy, tmp_path / "u.pt", eval_data=None, old_data=None, steps=3, checkpoint_every=1)
    monkeypatch.setattr(lt, "abd_loss", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        extend(cfg, load_teacher(cfg.teacher))
    Path(cfg.out).write_text("the user's")
    monkeypatch.undo()
    with pytest.raises(DfkdError, match="u.pt: already exists; choose another name or remove it"):
        extend(cfg, load_teacher(cfg.teacher), resume=True)
    assert Path(cfg.out).read_text() == "the user's"


def test_interrupted_reference_resumes_exactly(toy: dict[str, str], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    kw = {"old_data": None, "steps": 20, "checkpoint_every": 10}
    whole = config(toy, tmp_path / "a.pt", **kw)
    extend(whole, load_teacher(whole.teacher))
    cut = config(toy, tmp_path / "b.pt", **kw)
    # stopped in the fine-tuning reference, before its first checkpoint
    interrupted(monkeypatch, lt, "ce_loss", 5, lambda: extend(cut, load_teacher(cut.teacher)))
    extend(cut, load_teacher(cut.teacher), resume=True)
    a, b = (torch.load(c.work_dir() / "finetune.pt", weights_only=True)["model"] for c in (whole, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_new_class_is_said_to_teach_the_head_alone(toy: dict[str, str], tmp_path: Path) -> None:
    # the new-data loss (cross-entropy over the new classes' logits) is zero for one class: new-class top-1 stayed
    # at 0 % after 10 steps, unsaid
    one = write(tmp_path / "one.npz", range(3, 4), 64, 7)
    cfg = dataclasses.replace(config(toy, tmp_path / "m.pt", eval_data=None, old_data=None, steps=2), data=one)
    with pytest.warns(UserWarning, match="one new class: the new-data loss of Always Be Dreaming .* zero for one "
                                         "class"):
        extend(cfg, load_teacher(cfg.teacher))


def test_new_images_of_another_shape_are_said_to_be_stretched(toy: dict[str, str], tmp_path: Path) -> None:
    # 28x56 new-class images were stretched to the model's square input (new-class top-1 2 % against 36), unsaid
    x, y = toy_images(range(3, 5), 64, 8)
    np.savez(tmp_path / "wide.npz", x=np.concatenate([x, x], axis=2), y=y)
    cfg = dataclasses.replace(config(toy, tmp_path / "m.pt", eval_data=None, old_data=None, steps=2),
                              data=str(tmp_path / "wide.npz"))
    with pytest.warns(UserWarning, match=r"wide.npz: its images are 28x56 stretched to 32x32 for the old model"):
        extend(cfg, load_teacher(cfg.teacher))
