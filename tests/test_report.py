"""FIDs inside a distill run, what TensorBoard holds afterwards, and `dfkd report`."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import stop_in_round

import dfkd.io
from dfkd.checkpoint import load_checkpoint
from dfkd.cli.main import main
from dfkd.config import DistillConfig
from dfkd.engine import distill
from dfkd.errors import DfkdError
from dfkd.modelfile import ModelFile, save_model
from dfkd.models import create
from dfkd.monitor import compute_fid_stats
from dfkd.report import RunSummary, report
from dfkd.spec import MNIST_SPEC

KW = {"num_classes": 10, "in_channels": 1, "input_size": 32}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("fidrun")
    torch.manual_seed(0)
    m = create("lenet5_bn", **KW).train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 1, 32, 32))
    save_model(d / "t.pt", m.eval(), ModelFile("lenet5_bn", KW, MNIST_SPEC, 10))
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", x=rng.integers(0, 256, (64, 28, 28), dtype=np.uint8), y=rng.integers(0, 10, 64))
    compute_fid_stats(d / "data.npz", d / "ref.npz", "teacher", teacher=d / "t.pt", device="cpu")
    return {"dir": str(d), "teacher": str(d / "t.pt"), "data": str(d / "data.npz"), "ref": str(d / "ref.npz")}


def cfg(files: dict[str, str], out: str, **kw: object) -> DistillConfig:
    base = dict(method="dfq", teachers=(files["teacher"],), steps=20, out=str(Path(files["dir"]) / out),
                log_every=10, image_every=10, eval_every=10, ckpt_every=10, fid_every=10, fid_samples=64,
                fid_ref=files["ref"], eval_data=files["data"], device="cpu", params={"batch_size": 16})
    base.update(kw)
    return DistillConfig(**base)


@pytest.fixture(scope="module")
def run_dir(files: dict[str, str]) -> Path:
    return distill(cfg(files, "run")).run_dir


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_event_files_hold_grids_losses_and_fids(run_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={IMAGES: 0, SCALARS: 0})
    acc.Reload()
    tags = acc.Tags()
    assert "synthetic/images" in tags[IMAGES]
    grid = acc.Images("synthetic/images")[-1]
    assert grid.encoded_image_string.startswith(PNG) and grid.width > 32 and grid.height > 32
    assert {"loss/gen/bn", "loss/student/kd"} <= set(tags[SCALARS])
    for tag in ("fid/bn", "fid/teacher"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [10, 20]  # every fid_every steps; the end of the run adds no duplicate
        assert all(np.isfinite(e.value) and e.value >= -1e-6 for e in events)
    assert [e.step for e in acc.Scalars("hparam/fid_bn")] == [20] and "hparam/top1" in tags[SCALARS]


def test_fids_reach_metrics_jsonl(run_dir: Path) -> None:
    fid = [r for r in records(run_dir) if "fid/bn" in r]
    assert [r["step"] for r in fid] == [10, 20] and all("fid/teacher" in r for r in fid)


def test_fid_monitoring_is_off_with_zero_and_never_changes_training(files: dict[str, str], run_dir: Path) -> None:
    off = distill(cfg(files, "off", fid_every=0, fid_ref=None)).run_dir
    assert not any(k.startswith("fid/") for r in records(off) for k in r)
    a = torch.load(run_dir / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(off / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # monitoring draws on forked RNG streams


def test_mismatched_reference_is_refused_before_training(files: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(5), sigma=np.eye(5), features=np.array("teacher"))
    with pytest.raises(DfkdError, match="5-dimensional"):
        distill(cfg(files, "bad", fid_ref=str(bad)))
    assert not (Path(files["dir"]) / "bad" / "checkpoint.pt").exists()


def test_report_writes_pngs_and_prints_the_summary(run_dir: Path) -> None:
    res = CliRunner().invoke(main, ["report", str(run_dir)])
    assert res.exit_code == 0, res.output
    for name in ("synthetic.png", "curves.png"):
        assert (run_dir / name).read_bytes().startswith(PNG)
    out = res.output
    assert "method:   dfq" in out and "student: lenet5_half" in out and "t.pt" in out
    assert "steps:    20 of 20" in out and "finished: yes" in out
    assert "accuracy: student top-1" in out and "(teacher " in out
    written = torch.load(run_dir / "student.pt", weights_only=True)["provenance"]["eval_top1"]
    assert f"accuracy: student top-1 {100 * written:.2f}% (teacher " in out
    assert "FID:" in out and "bn " in out and "teacher " in out


@pytest.mark.parametrize("finished", [True, False])
def test_report_accuracy_is_the_written_students(tmp_path: Path, finished: bool) -> None:
    # the README's demo: student.pt (an EMA snapshot) 93.39 %, and the report said "student top-1 95.73%", the last
    # raw student's
    series = {"student/top1": [(1575, 0.9573)], "student/top1_selected": [(1575, 0.9339)],
              "student/teacher_top1": [(0, 0.9921)]}
    text = RunSummary(tmp_path, {"method": "dfad", "steps": 1575}, 1575, 60.0, finished, series).text()
    line = "accuracy: student top-1 93.39% (teacher 99.21%; the last raw student 95.73%)" if finished else \
        "accuracy: student top-1 95.73% (teacher 99.21%)"  # unfinished: no student.pt yet, the raw one is all
    assert line in text


def test_report_of_an_unfinished_run_without_events(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"method": "dafl", "teachers": ["t.pt"], "steps": 100}))
    lines = [{"step": 0, "event": "start"}, {"step": 10, "loss/student/kd": 2.0},
             {"step": 20, "loss/student/kd": 1.0}, {"step": 20, "student/top1": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = report(tmp_path)
    assert summary.step == 20 and not summary.finished
    assert summary.series["loss/student/kd"] == [(10, 2.0), (20, 1.0)]
    assert "finished: no" in summary.text() and "50.00%" in summary.text()
    assert (tmp_path / "curves.png").is_file() and not (tmp_path / "synthetic.png").exists()


def test_report_names_log_lines_it_cannot_read(tmp_path: Path) -> None:
    # a metrics.jsonl with binary garbage was skipped without a word (and a record without a step, or with a text
    # one, was a KeyError / TypeError traceback)
    (tmp_path / "config.json").write_text(json.dumps({"method": "dafl", "teachers": ["t.pt"], "steps": 100}))
    good = [{"step": 0, "event": "start"}, {"step": 10, "loss/student/kd": 2.0}]
    odd = [{"loss/student/kd": 5.0}, {"step": "20", "loss/student/kd": 4.0}, {"step": 30, "event": "stop"}]
    text = b"".join(json.dumps(x).encode() + b"\n" for x in good + odd) + b"\x00\xff\xfe garbage\n" + \
        json.dumps({"step": 40, "loss/student/kd": 1.0}).encode() + b"\n" + b'{"step": 50, "loss/stu'
    (tmp_path / "metrics.jsonl").write_bytes(text)
    summary = report(tmp_path)
    assert summary.series["loss/student/kd"] == [(10, 2.0), (40, 1.0)] and summary.step == 40
    assert summary.unreadable == 3  # the cut-off last line is how a killed run's log ends: not counted
    assert f"log:      3 line(s) of {tmp_path / 'metrics.jsonl'} are not JSON records" in summary.text()
    (tmp_path / "metrics.jsonl").write_bytes(b"".join(json.dumps(x).encode() + b"\n" for x in good))
    assert "log:" not in report(tmp_path).text()


def test_report_leaves_a_users_picture_in_the_run_folder(tmp_path: Path) -> None:
    # `dfkd report RUN` replaced a curves.png the user had put into the run folder
    (tmp_path / "config.json").write_text(json.dumps({"method": "dafl", "teachers": ["t.pt"], "steps": 100}))
    lines = [{"step": 0, "event": "start"}, {"step": 10, "loss/student/kd": 2.0}, {"step": 20, "loss/student/kd": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    mine = tmp_path / "curves.png"
    mine.write_bytes(PNG + b"the user's own plot")
    res = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert f"kept:     {mine} (not marked as dfkd report's, so not overwritten" in res.output
    assert mine.read_bytes() == PNG + b"the user's own plot" and "wrote:" not in res.output
    mine.unlink()
    for _ in range(2):  # dfkd's own picture is drawn again, also after the folder moved
        res = CliRunner().invoke(main, ["report", str(tmp_path)])
        assert res.exit_code == 0 and f"wrote:    {mine}" in res.output and "kept:" not in res.output, res.output
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    tmp_path.rename(moved)
    res = CliRunner().invoke(main, ["report", str(moved)])
    assert res.exit_code == 0 and f"wrote:    {moved / 'curves.png'}" in res.output, res.output


def test_report_of_a_read_only_run_folder_still_prints_its_summary(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # it printed only an error about a hidden temporary file, and no summary
    (tmp_path / "config.json").write_text(json.dumps({"method": "dafl", "teachers": ["t.pt"], "steps": 100}))
    lines = [{"step": 0, "event": "start"}, {"step": 10, "loss/student/kd": 2.0}, {"step": 20, "loss/student/kd": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

    def denied(*args: object, **kwargs: object) -> None:  # as a read-only folder is to a user who is not root
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(dfkd.io.tempfile, "mkstemp", denied)
    res = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert res.exit_code == 0 and "steps:    20 of 100" in res.output, res.output
    assert f"not written: {tmp_path / 'curves.png'} (Permission denied; make it and its folder writable" \
        in res.output and "wrote:" not in res.output
    assert not (tmp_path / "curves.png").exists()


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(DfkdError, match="not a dfkd run folder"):
        report(tmp_path)
    with pytest.raises(DfkdError, match="nope: no such run folder"):  # it said "not a dfkd run folder"
        report(tmp_path / "nope")


def test_report_reads_a_transfer_file_whatever_its_name(transfer_file: str, tmp_path: Path) -> None:
    # `dfkd synthesize --out tr` writes the file as named, distill --transfer-data reads it; report said "not a
    # dfkd run folder"


    shutil.copy(transfer_file, tmp_path / "tr")
    res = CliRunner().invoke(main, ["report", str(tmp_path / "tr")])
    assert res.exit_code == 0 and "images:   256 of 1x32x32" in res.output, res.output


def test_report_reads_a_run_folder_named_like_a_transfer_file(run_dir: Path, tmp_path: Path) -> None:
    # `distill --out mrun.npz` made a run folder that report took for a file: "is a folder; give a transfer .npz"
    shutil.copytree(run_dir, tmp_path / "mrun.npz")
    res = CliRunner().invoke(main, ["report", str(tmp_path / "mrun.npz")])
    assert res.exit_code == 0 and "method:   dfq" in res.output, res.output


def test_report_of_a_transfer_file_never_overwrites_a_users_picture(transfer_file: str, tmp_path: Path) -> None:
    # `dfkd report tr1.npz` replaced a tr1_samples.png of the user's
    shutil.copy(transfer_file, tmp_path / "tr1.npz")
    mine = tmp_path / "tr1_samples.png"
    mine.write_text("the user's file")
    res = CliRunner().invoke(main, ["report", str(tmp_path / "tr1.npz")])
    # the report is printed all the same (a receiver on a read-only share got none): the picture is extra
    assert res.exit_code == 0 and "images:   256 of 1x32x32" in res.output, res.output
    assert f"not written: the samples picture {mine}: already exists and is not a picture dfkd drew" in res.output
    assert mine.read_text() == "the user's file"
    mine.unlink()
    for _ in range(2):  # dfkd's own picture of the same file is drawn again
        res = CliRunner().invoke(main, ["report", str(tmp_path / "tr1.npz")])
        assert res.exit_code == 0 and f"wrote:    {mine}" in res.output, res.output
    # ... also after the folder moved (the picture's mark held the file's absolute path: "not dfkd's")
    shutil.move(tmp_path, tmp_path.with_name(tmp_path.name + "-moved"))
    moved = tmp_path.with_name(tmp_path.name + "-moved")
    res = CliRunner().invoke(main, ["report", str(moved / "tr1.npz")])
    assert res.exit_code == 0 and f"wrote:    {moved / 'tr1_samples.png'}" in res.output, res.output


def test_report_of_a_transfer_file_on_a_read_only_share_prints_its_report(transfer_file: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # the temporary picture could not be made: exit 2, "free some space", and no report
    import errno

    import dfkd.io

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    shutil.copy(transfer_file, tmp_path / "tr.npz")
    monkeypatch.setattr(dfkd.io.tempfile, "mkstemp", read_only)
    res = CliRunner().invoke(main, ["report", str(tmp_path / "tr.npz")])
    assert res.exit_code == 0 and "images:   256 of 1x32x32" in res.output, res.output
    assert "not written: cannot write" in res.output and "(a read-only mount); write somewhere writable" in res.output


def test_how_the_teacher_file_was_read_is_in_the_run_log_and_report(tmp_path: Path) -> None:
    """A softmax-head teacher is read through the log of its probabilities: the load-time warning also goes to
    metrics.jsonl, so `dfkd report` still says it after the console is gone."""

    torch.manual_seed(0)
    net = torch.nn.Sequential(create("lenet5_bn", **KW), torch.nn.Softmax(1)).eval()
    program = torch.export.export(net, (torch.randn(2, 1, 32, 32),), dynamic_shapes=({0: torch.export.Dim("n")},))
    torch.export.save(program, str(tmp_path / "t.pt2"))
    with pytest.warns(UserWarning, match="it outputs probabilities"):
        res = CliRunner().invoke(main, ["distill", "--teacher", str(tmp_path / "t.pt2"), "--channels", "1",
                                        "--input-size", "32", "--mean", "0.1307", "--std", "0.3081", "--method", "dfad",
                                        "--steps", "2", "-p", "batch_size=8", "--fid-every", "0",
                                        "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    events = [json.loads(a) for a in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "teacher_note"] == [0]
    out = CliRunner().invoke(main, ["report", str(tmp_path / "run")]).output
    assert "note:     --teacher" in out and "it outputs probabilities" in out


def test_report_of_a_run_resumed_and_stopped_before_its_next_picture(files: dict[str, str], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # TensorBoard purges the images at and after the step a resumed run's events restart from: the tag stayed with
    # no image, and `dfkd report` was an IndexError traceback
    from dfkd.engine import Interrupted, resume

    run = distill(dataclasses.replace(cfg(files, "unused"), out=str(tmp_path / "r"), method="dfad", steps=3,
                                      fid_every=0, fid_ref=None, image_every=250,
                                      params={"batch_size": 8, "s_steps": 1})).run_dir
    stop_in_round(monkeypatch, "dfad", 2)
    with pytest.raises(Interrupted):
        resume(run, steps=100)
    summary = report(run)
    assert summary.step == 5 and "finished: no" in summary.text()


def test_a_damaged_run_folder_is_reported_in_words(run_dir: Path, tmp_path: Path) -> None:
    """A fuzzing hunt's run folders: each of these was a traceback, and a bad checkpoint read as finished."""
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    (run / "deploy.json").write_text("{garbage")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "teachers": [5]}))
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "step": "many"}, run / "checkpoint.pt")
    with pytest.warns(UserWarning, match="checkpoint.pt: unreadable .*read from metrics.jsonl"):
        text = report(run).text()
    assert "deploy.json: unreadable" in text
    with pytest.raises(DfkdError, match=r"checkpoint.pt: a damaged checkpoint \(step of the wrong kind\)"):
        load_checkpoint(run / "checkpoint.pt")
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    with pytest.raises(DfkdError, match="metrics.jsonl: is a folder, not the run's metrics log"):
        report(run)


def test_report_says_what_the_run_keeps_on_disk(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"method": "fast", "teachers": ["t.pt"], "steps": 100}))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss/student/kd": 2.0}) + "\n")
    assert "disk:" not in report(tmp_path).text()
    (tmp_path / "pool-00000.bin").write_bytes(b"\0" * (3 << 20))
    (tmp_path / "rank1").mkdir()
    (tmp_path / "rank1" / "bank-00000.bin").write_bytes(b"\0" * (1 << 20))
    assert "disk:     4.0 MiB of synthetic images (pool/bank *.bin), kept so --resume" in report(tmp_path).text()
