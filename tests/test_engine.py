"""The distillation loop: outputs, budgets, resume after a kill, Ctrl-C, divergence, bad eval data."""

from __future__ import annotations

import functools
import io
import json
import logging
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dfkd.utils
from dfkd import engine
from dfkd import search as search_module
from dfkd.config import DistillConfig, build_config
from dfkd.distributed import resume_command
from dfkd.engine import Interrupted, distill, resume
from dfkd.errors import DfkdError
from dfkd.methods import get_method
from dfkd.modelfile import load_model
from dfkd.report import report


class SimulatedKill(Exception):
    pass


def cfg_for(teacher_file: str, out: Path, **kw) -> DistillConfig:
    base = dict(teachers=(teacher_file,), method="dfad", steps=12, out=str(out), log_every=2, image_every=4,
                eval_every=4, ckpt_every=4, params={"batch_size": 8, "s_steps": 2})
    base.update(kw)
    return DistillConfig(**base)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_writes_every_output(teacher_file: str, eval_npz: str, tmp_path: Path) -> None:
    result = distill(cfg_for(teacher_file, tmp_path / "run", eval_data=eval_npz))
    run = result.run_dir
    assert result.finished and result.step == 12
    for name in ("config.json", "metrics.jsonl", "student.pt", "checkpoint.pt"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))
    config = json.loads((run / "config.json").read_text())
    assert config["params"]["batch_size"] == 8 and config["params"]["lr_g"] == 1e-2  # LeNet recipe + override
    assert config["student"] == "lenet5_half"
    student, meta = load_model(run / "student.pt")
    assert meta.arch == "lenet5_half" and meta.provenance["method"] == "dfad"
    assert len(meta.provenance["teacher_sha256"]) == 64
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/student/l1" in r for r in records)
    assert any("student/top1" in r for r in records)
    assert records[-1]["event"] == "finished"
    assert 0.0 <= result.metrics["top1"] <= 1.0


def test_default_output_folder_is_dated_and_named(teacher_file: str, tmp_path: Path) -> None:
    cfg = cfg_for(teacher_file, tmp_path, runs_dir=str(tmp_path / "runs"), steps=2)
    cfg = DistillConfig(**{**cfg.to_dict(), "out": None, "teachers": tuple(cfg.teachers)})
    run = distill(cfg).run_dir
    assert run.parent == tmp_path / "runs" and run.name.endswith("-dfad-lenet5_bn")
    # a teacher of a long file name: the folder's name made from it was too long ("give a shorter name")
    long = tmp_path / ("t" * 240 + ".pt")
    shutil.copy(teacher_file, long)
    run = distill(DistillConfig(**{**cfg.to_dict(), "teachers": (str(long),)})).run_dir
    assert run.parent == tmp_path / "runs" and len(run.name.encode()) <= 247 and "-dfad-ttt" in run.name


def test_a_run_whose_working_folder_is_deleted_checkpoints(teacher_file: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # a checkpoint read os.getcwd(): a FileNotFoundError traceback, and every step since the last checkpoint lost
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    original = engine.Run.checkpoint

    def after_the_first(self, finished: bool = False) -> None:  # noqa: ANN001
        if self.step > 0 and work.exists():
            work.rmdir()
        original(self, finished)

    monkeypatch.setattr(engine.Run, "checkpoint", after_the_first)
    result = distill(cfg_for(teacher_file, tmp_path / "run", steps=8, ckpt_every=4))
    assert result.finished and (tmp_path / "run" / "student.pt").is_file()


def test_config_precedence_file_then_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('method = "dafl"\nsteps = 7\n[params]\nlr_g = 0.5\nbatch_size = 4\n')
    cfg = build_config(str(f), ["batch_size=16"], steps=9, method=None)
    assert cfg.method == "dafl" and cfg.steps == 9
    assert cfg.params == {"lr_g": 0.5, "batch_size": 16}


def test_argument_flags_merge_with_a_config_files_tables(tmp_path: Path) -> None:
    # --student-arg threw away the file's whole student_args table (bn=true went, unsaid), unlike -p with params
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"method": "dafl", "student": "lenet5", "student_args": {"width": 2, "bn": True},
                             "teacher_arch": "torchvision:resnet18", "arch_args": {"num_classes": 10, "k": 5}}))
    cfg = build_config(str(f), [], method=None, student_args={"width": 3}, arch_args={"k": 7})
    assert cfg.student_args == {"width": 3, "bn": True} and cfg.arch_args == {"num_classes": 10, "k": 7}
    # another network: the file's arguments belong to its own one
    cfg = build_config(str(f), [], method=None, student="wrn_16_1", student_args={"depth": 16},
                       teacher_arch="torchvision:resnet34", arch_args={"k": 7})
    assert cfg.student_args == {"depth": 16} and cfg.arch_args == {"k": 7}


def test_a_config_files_paths_and_params_are_named_as_the_files(tmp_path: Path) -> None:
    # a file's missing teacher was "--teacher t.pt: no such file", a flag never typed; a file's params of its own
    # method, run with another --method, named neither the file nor the swap
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"teachers": ["t.pt"], "eval_data": "test.npz"}))
    with pytest.raises(DfkdError, match=rf"^--config {f}: teachers = 't.pt': no such file or folder \(a relative "
                                        r"path in the file is read from the folder you run in, "):
        build_config(str(f), [], method=None)
    with pytest.raises(DfkdError, match=rf"^--config {f}: eval_data = 'test.npz': no such file"):
        build_config(str(f), [], method=None, teachers=(str(f),))  # the flag wins for the teacher
    f.write_text(json.dumps({"quantize": "int4"}))  # "one of None, 'int8'": Python's word, not the file's
    with pytest.raises(DfkdError, match=rf"^--config {f}: quantize = 'int4': must be one of null \(none\), 'int8'$"):
        build_config(str(f), [], method=None)
    f.write_text(json.dumps({"method": "dfq", "params": {"oh": 1.5}}))
    with pytest.raises(DfkdError, match=rf"^--config {f} \(its params are for its method 'dfq'; this run's is "
                                        r"dfad\): method dfad has no parameter\(s\) \['oh'\]"):
        build_config(str(f), [], method="dfad")


def test_a_config_files_device_is_named_as_the_files(tmp_path: Path) -> None:
    # a file's "device": "tpu" was refused as "--device 'tpu'", a flag the user never typed
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"method": "dafl", "device": "tpu"}))
    with pytest.raises(DfkdError, match=rf"^--config {f}: device = 'tpu': not a device name"):
        build_config(str(f), [], method=None)
    assert build_config(str(f), [], device="cpu", method=None).device == "cpu"  # the flag wins: not refused


def test_progress_in_a_log_file_is_redrawn_rarely(teacher_file: str, tmp_path: Path,
                                                   capfd: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # with stderr in a file (a scheduler's log) every redraw is a line there: thousands in a 10-minute run
    distill(cfg_for(teacher_file, tmp_path / "r", steps=200, log_every=1, params={"batch_size": 4, "s_steps": 1}))
    redraws = capfd.readouterr().err.count("\r")
    assert redraws <= 6, redraws
    monkeypatch.setattr(dfkd.utils, "_is_tty", lambda stream: False)  # stderr a log file, however pytest runs
    with dfkd.utils.progress_bar(total=1, file=io.StringIO()) as bar:  # its monitor thread redrew every 10 s
        assert bar.mininterval == bar.maxinterval == dfkd.utils.LOG_REDRAW_SECONDS


def test_a_long_stretch_without_a_checkpoint_gets_one_by_time(teacher_file: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # --ckpt-every counts steps only: on a heavy teacher 250 steps were hours a scheduler's kill took with it
    steps: list[int] = []
    original = engine.Run.checkpoint

    def counted(self, finished: bool = False) -> None:  # noqa: ANN001
        steps.append(self.step)
        original(self, finished)

    monkeypatch.setattr(engine.Run, "checkpoint", counted)
    distill(cfg_for(teacher_file, tmp_path / "a", steps=8, ckpt_every=1000))
    assert steps == [0, 8, 8]  # the start, before the student is written, and the end
    steps.clear()
    monkeypatch.setattr(engine, "CHECKPOINT_SECONDS", 0.0)  # as if each round took longer than the interval
    distill(cfg_for(teacher_file, tmp_path / "b", steps=8, ckpt_every=1000))
    assert steps == [0, 2, 4, 6, 8, 8]
    # under torchrun's agent, which kills its processes 30 s after passing a stop on, the interval is those 30 s
    steps.clear()
    monkeypatch.setattr(engine, "CHECKPOINT_SECONDS", 600.0)
    monkeypatch.setattr(engine, "TORCHRUN_KILL_SECONDS", 0.0)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    distill(cfg_for(teacher_file, tmp_path / "c", steps=8, ckpt_every=1000))
    assert steps == [0, 2, 4, 6, 8, 8]


def test_the_checkpoint_interval_counts_wall_time_not_the_budget_clock(teacher_file: str, eval_npz: str,
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # a kill takes evaluation time with it too: on the CPU budget clock a slow evaluation (here a sleep, which uses
    # no CPU) never made a checkpoint due, and under torchrun's agent a stop could lose far more than 30 s
    steps: list[int] = []
    original, evaluate = engine.Run.checkpoint, engine.Run.evaluate

    def counted(self, finished: bool = False) -> None:  # noqa: ANN001
        steps.append(self.step)
        original(self, finished)

    def slow(self) -> dict[str, float]:  # noqa: ANN001
        time.sleep(0.3)
        return evaluate(self)

    monkeypatch.setattr(engine.Run, "checkpoint", counted)
    monkeypatch.setattr(engine.Run, "evaluate", slow)
    monkeypatch.setattr(engine, "CHECKPOINT_SECONDS", 0.25)
    distill(cfg_for(teacher_file, tmp_path / "a", steps=8, ckpt_every=1000, eval_every=4, eval_data=eval_npz,
                    budget_clock="cpu"))
    assert steps == [0, 4, 8, 8]  # after each slow evaluation, and the end


def test_unknown_param_is_refused(teacher_file: str, tmp_path: Path) -> None:
    with pytest.raises(DfkdError, match="no parameter"):
        distill(cfg_for(teacher_file, tmp_path / "r", params={"lr_gen": 1.0}))


@pytest.mark.parametrize(("method", "precision"), [("dfad", "fp32"), ("dafl", "fp32"), ("dfad", "bf16")])
def test_kill_and_resume_equals_uninterrupted(method: str, precision: str, teacher_file: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Also in bf16 (channels-last), which `--precision auto` picks on a CPU with a bf16 unit for a heavy teacher."""
    params = {"batch_size": 8, **({"s_steps": 2} if method == "dfad" else {})}
    cfg = functools.partial(cfg_for, method=method, params=params, deterministic=True, precision=precision)
    full = distill(cfg(teacher_file, tmp_path / "full"))
    cls = get_method(method)
    original = cls.round
    calls = {"n": 0}

    def dying_round(self):
        calls["n"] += 1
        if calls["n"] == 4:  # dies mid-run: step 6 is logged, the last checkpoint is step 4's
            raise SimulatedKill
        return original(self)

    monkeypatch.setattr(cls, "round", dying_round)
    with pytest.raises(SimulatedKill):
        distill(cfg(teacher_file, tmp_path / "killed"))
    monkeypatch.setattr(cls, "round", original)
    assert not (tmp_path / "killed" / "student.pt").exists(), "a killed run must not look finished"
    resumed = resume(tmp_path / "killed")
    a = torch.load(full.run_dir / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed.run_dir / "student.pt", weights_only=True)["state_dict"]
    assert states_equal(a, b)
    records = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    loss_steps = [r["step"] for r in records if any(k.startswith("loss/") for k in r)]
    assert loss_steps == [2, 4, 6, 8, 10, 12], "replayed steps are logged once, in order"


def test_resume_refuses_a_finished_run_unless_extended(teacher_file: str, tmp_path: Path) -> None:
    run = distill(cfg_for(teacher_file, tmp_path / "r", steps=4)).run_dir
    with pytest.raises(DfkdError, match="already finished"):
        resume(run)
    assert resume(run, steps=8).step == 8


def test_a_run_started_with_relative_paths_resumes_from_another_folder(teacher_file: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # `cd /; dfkd distill --resume RUN` said "--teacher t.pt: no such file" of a --teacher the user never gave
    (tmp_path / "start").mkdir()
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(teacher_file, tmp_path / "start" / "t.pt")
    monkeypatch.chdir(tmp_path / "start")
    run = distill(cfg_for("t.pt", tmp_path / "r", steps=4)).run_dir
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert resume(run, steps=6).step == 6
    assert json.loads((run / "config.json").read_text())["teachers"] == [str(tmp_path / "start" / "t.pt")]


def test_a_resume_whose_files_are_gone_names_them_as_the_runs(teacher_file: str, tmp_path: Path) -> None:
    # "--eval-data ev.npz: no such file or directory", of a flag the user had not given with --resume
    shutil.copy(teacher_file, tmp_path / "t.pt")
    np.savez(tmp_path / "ev.npz", x=np.zeros((4, 28, 28), np.uint8), y=np.arange(4))
    run = distill(cfg_for(str(tmp_path / "t.pt"), tmp_path / "r", steps=4, eval_data=str(tmp_path / "ev.npz"))).run_dir
    (tmp_path / "ev.npz").unlink()
    with pytest.raises(DfkdError, match=f"the run's --eval-data {tmp_path / 'ev.npz'} is gone; give --eval-data FILE"):
        resume(run, steps=6)
    np.savez(tmp_path / "ev2.npz", x=np.zeros((4, 28, 28), np.uint8), y=np.arange(4))
    (tmp_path / "t.pt").rename(tmp_path / "moved.pt")
    with pytest.raises(DfkdError, match=f"the run's teacher {tmp_path / 't.pt'} is gone; put it back, or give its "
                                        r"new place with --resume ... --teacher FILE \(the same file"):
        resume(run, steps=6, eval_data=str(tmp_path / "ev2.npz"))
    (tmp_path / "moved.pt").rename(tmp_path / "t.pt")
    assert resume(run, steps=6, eval_data=str(tmp_path / "ev2.npz")).step == 6


def test_a_moved_teacher_is_given_with_resume(teacher_file: str, tmp_path: Path) -> None:
    # a moved project folder left a run no resume could continue: the old path was gone, and --teacher NEW with
    # --resume "would change the run"
    shutil.copy(teacher_file, tmp_path / "t.pt")
    run = distill(cfg_for(str(tmp_path / "t.pt"), tmp_path / "r", steps=4)).run_dir
    (tmp_path / "t.pt").rename(tmp_path / "moved.pt")
    other = tmp_path / "other.pt"
    torch.save({**torch.load(teacher_file, weights_only=True), "extra": 1}, other)  # the same network, another file
    with pytest.raises(DfkdError, match=f"--teacher {other} is not a teacher the run started with .*by sha256"):
        resume(run, steps=6, fixed={"teachers": (str(other),)})
    assert resume(run, steps=6, fixed={"teachers": (str(tmp_path / "moved.pt"),)}).step == 6
    assert json.loads((run / "config.json").read_text())["teachers"] == [str(tmp_path / "moved.pt")]
    assert resume(run, steps=8).step == 8  # from then on the run knows its new place


def test_report_of_a_resumed_run_is_quiet_about_tensorboards_replayed_steps(
        teacher_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # "Detected out of order event.step likely caused by a TensorFlow restart. Purging ..." with every report
    cls, calls = get_method("dfad"), {"n": 0}
    original = cls.round

    def round_then_sigint(self):
        calls["n"] += 1
        if calls["n"] == 4:
            signal.raise_signal(signal.SIGINT)
        return original(self)

    monkeypatch.setattr(cls, "round", round_then_sigint)
    run = tmp_path / "r"
    with pytest.raises(Interrupted):
        distill(cfg_for(teacher_file, run, steps=16, ckpt_every=2, image_every=2))
    monkeypatch.setattr(cls, "round", original)
    resume(run)
    with caplog.at_level(logging.WARNING):
        assert (run / "synthetic.png") in report(run).pngs
    assert not [r for r in caplog.records if "out of order" in r.getMessage()]


def test_config_json_holds_what_a_resumed_run_goes_on_with(teacher_file: str, tmp_path: Path) -> None:
    # a resume with -p lr_s=0.1 ran at 0.1 and its checkpoint said so, while config.json kept the old rate
    run = distill(cfg_for(teacher_file, tmp_path / "r", steps=4)).run_dir
    before = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text("{ spoilt")
    resume(run, steps=6, params={"lr_s": 0.123})
    after = json.loads((run / "config.json").read_text())
    assert after["params"]["lr_s"] == 0.123 != before["params"]["lr_s"] and after["steps"] == 6
    assert {k: v for k, v in after.items() if k not in ("params", "steps")} == \
        {k: v for k, v in before.items() if k not in ("params", "steps")}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_ctrl_c_saves_and_stops_cleanly(teacher_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        signum: int, capfd: pytest.CaptureFixture[str],
                                        stop_signals_heard: None) -> None:
    # SIGTERM (kill, docker stop, Slurm) stopped a plain run at once, losing the steps since its last checkpoint
    cls = get_method("dfad")
    original = cls.round
    calls = {"n": 0}

    def round_then_sigint(self):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signum)
        return original(self)

    monkeypatch.setattr(cls, "round", round_then_sigint)
    with pytest.raises(Interrupted, match="--resume"):
        distill(cfg_for(teacher_file, tmp_path / "r", steps=40))
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and not ckpt["finished"]
    assert not (tmp_path / "r" / "student.pt").exists()
    # the first signal is answered at once (it printed nothing until the round ended), naming what a second loses
    err = capfd.readouterr().err
    again = "Ctrl-C" if signum == signal.SIGINT else "stop signal"  # a SIGTERM's "second Ctrl-C" (it was)
    assert f"stopping: the run saves a checkpoint at the end of this round and stops (a second {again} stops at " \
           "once, losing the steps since the last checkpoint, at step 4)" in err


def test_a_stop_says_how_long_a_long_round_has_taken(capfd: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # a ViT-B/16 teacher's round took 7 minutes on a CPU, and the stop's wait looked like a hang
    with engine._graceful_stop(True) as stop:
        stop["run"] = SimpleNamespace(finishing=False, saved_step=4, round_seconds=95.4)
        signal.raise_signal(signal.SIGTERM)
        assert stop["stop"]
    assert "(a second stop signal stops at once, losing the steps since the last checkpoint, at step 4); a round " \
           "has taken about 95 s here\n" in capfd.readouterr().err
    # torchrun's agent kills its processes 30 s after it passes the stop on: the run said it was saving
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    with engine._graceful_stop(True) as stop:
        stop["run"] = SimpleNamespace(finishing=False, saved_step=4, round_seconds=95.4)
        signal.raise_signal(signal.SIGTERM)
    assert "a round has taken about 95 s here, and torchrun kills its processes 30 s after it passes a stop on: " \
           "this round may be lost, and the run then resumes from step 4" in capfd.readouterr().err


def test_a_stop_while_the_run_finishes_lets_it_finish_and_says_so(teacher_file: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capfd: pytest.CaptureFixture[str]) -> None:
    # a Ctrl-C in the final evaluation printed "interrupted" with the checkpoint steps behind; now the run is
    # written, and its caller learns of the stop (a search stops there instead of starting the next trial)
    original = engine.log_hparams  # called while the run finishes, after its evaluation
    monkeypatch.setattr(engine, "log_hparams", lambda *a, **k: (signal.raise_signal(signal.SIGINT), original(*a, **k)))
    result = distill(cfg_for(teacher_file, tmp_path / "r", steps=4))
    assert result.finished and result.stop_requested and (tmp_path / "r" / "student.pt").is_file()
    # it said "saves a checkpoint at the end of this round and stops", of a run that then finished
    assert "stopping: the run is writing its student and ends when that is done" in capfd.readouterr().err
    with pytest.raises(KeyboardInterrupt, match="continue the search with --resume"):
        search_module._not_stopped(result)


def test_a_stop_during_start_up_waits_for_the_first_checkpoint(teacher_file: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Ctrl-C while the run was being built left config.json and a log: neither --resume (no checkpoint) nor the
    # same command (not empty) would take the folder
    original = engine._start
    monkeypatch.setattr(engine, "_start", lambda run, log: (signal.raise_signal(signal.SIGINT), original(run, log)))
    run = tmp_path / "r"
    with pytest.raises(Interrupted, match=f"stopped at step 0; checkpoint saved. Continue with: .*--resume {run}$"):
        distill(cfg_for(teacher_file, run, steps=40))  # at once: no first round waited for (minutes on a heavy one)
    assert resume(run, steps=4).step == 4


def test_a_signal_ignored_before_the_run_stays_ignored(teacher_file: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # `nohup dfkd distill ...` ignores SIGHUP; the run's handler took it back, so a closed terminal stopped the run
    original = engine._start
    monkeypatch.setattr(engine, "_start", lambda run, log: (signal.raise_signal(signal.SIGHUP), original(run, log)))
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert distill(cfg_for(teacher_file, tmp_path / "r", steps=4)).finished
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.mark.parametrize("made", [True, False])
def test_a_second_stop_before_the_first_checkpoint_leaves_no_half_run(teacher_file: str, tmp_path: Path, made: bool,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def twice(run: object, log: object) -> None:
        log.event(0, event="first words")
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(engine, "_start", twice)
    run = tmp_path / "r"
    if made:
        run.mkdir()  # the user's empty folder stays, empty
    with pytest.raises(KeyboardInterrupt, match="before the run's first checkpoint: nothing of it is kept"):
        distill(cfg_for(teacher_file, run, steps=40))
    assert (list(run.iterdir()) == []) if made else not run.exists()
    monkeypatch.undo()
    assert distill(cfg_for(teacher_file, run, steps=2)).step == 2  # the same command starts it again


def test_the_resume_command_names_torchrun_for_a_run_of_several_processes(teacher_file: str, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # a 2-process run stopped by Ctrl-C said "continue with dfkd distill --resume", which refuses it
    assert resume_command("r") == "dfkd distill --resume r"
    assert resume_command("my runs/r 1") == "dfkd distill --resume 'my runs/r 1'"  # pasted, it must work
    assert resume_command("r", 2) == "torchrun --nproc-per-node 2 -m dfkd distill --resume r"
    original = get_method("dfad").round

    def round_then_sigint(self):
        signal.raise_signal(signal.SIGINT)
        return original(self)

    monkeypatch.setattr(get_method("dfad"), "round", round_then_sigint)
    run = tmp_path / "r"
    with pytest.raises(Interrupted, match=f"Continue with: dfkd distill --resume {run}$"):
        distill(cfg_for(teacher_file, run, steps=40))
    assert f"no (continue with dfkd distill --resume {run})" in report(run).text()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    started = [{**r, "processes": 2} if r.get("event") == "start" else r for r in records]  # as torchrun's run
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in started))
    assert f"no (continue with torchrun --nproc-per-node 2 -m dfkd distill --resume {run})" in report(run).text()


@pytest.mark.parametrize("objective", [False, True])
def test_non_finite_loss_stops_with_resumable_checkpoint(teacher_file: str, tmp_path: Path, objective: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cls = get_method("dfad")
    original = cls.round
    calls = {"n": 0}

    def blow_up(self):
        calls["n"] += 1
        logs = original(self)
        return {**logs, "student/l1": float("nan")} if calls["n"] == 4 else logs

    monkeypatch.setattr(cls, "round", blow_up)
    params = {"batch_size": 8, "s_steps": 2, **({"feature_loss": "sp"} if objective else {})}
    with pytest.raises(DfkdError, match="diverged at step 8.*--resume") as err:
        distill(cfg_for(teacher_file, tmp_path / "r", params=params))
    # with a feature objective on, its weight is named beside the learning rates (at its paper's weight, on a
    # BN-free student, it can blow the student up)
    assert ("-p feature_weight=" in str(err.value)) == objective
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and not ckpt["finished"]
    assert not (tmp_path / "r" / "student.pt").exists()


def test_eval_data_that_does_not_fit_is_refused_before_training(teacher_file: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((8, 28, 28), np.uint8), y=np.arange(8, dtype=np.int64) + 10)
    with pytest.raises(DfkdError, match="labels run 10..17"):
        distill(cfg_for(teacher_file, tmp_path / "r", eval_data=str(bad)))
    assert not (tmp_path / "r").exists(), "no run folder is left behind"


def test_out_folder_with_a_run_is_not_overwritten(teacher_file: str, tmp_path: Path) -> None:
    distill(cfg_for(teacher_file, tmp_path / "r", steps=2))
    with pytest.raises(DfkdError, match=f"already holds a dfkd distill run .*`dfkd distill --resume {tmp_path / 'r'}`"):
        distill(cfg_for(teacher_file, tmp_path / "r", steps=2))
    # a run of torchrun's two processes was told the plain `dfkd distill --resume`, which refuses it
    log = tmp_path / "r" / "metrics.jsonl"
    lines = log.read_text().splitlines()
    start = json.loads(lines[0])
    assert start["event"] == "start"
    log.write_text("\n".join([json.dumps({**start, "processes": 2}), *lines[1:]]) + "\n")
    with pytest.raises(DfkdError, match=f"`torchrun --nproc-per-node 2 -m dfkd distill --resume {tmp_path / 'r'}`"):
        distill(cfg_for(teacher_file, tmp_path / "r", steps=2))


def test_a_folder_of_the_users_files_is_not_called_a_run(teacher_file: str, tmp_path: Path) -> None:
    # "already holds a run; continue it with --resume" for a folder holding the user's own student.pt
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "student.pt").write_text("the user's model")
    with pytest.raises(DfkdError, match=r"the folder is not empty \(holds student.pt\)") as err:
        distill(cfg_for(teacher_file, mine, steps=2))
    assert "--resume" not in str(err.value) and (mine / "student.pt").read_text() == "the user's model"


class FakeClock:
    """`time` for the engine: every perf_counter() call is `tick` seconds after the previous one."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def test_time_budget_stops_the_run(teacher_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dfkd.engine

    monkeypatch.setattr(dfkd.engine, "time", FakeClock(1.0))  # each round takes 1 s on this clock
    result = distill(cfg_for(teacher_file, tmp_path / "r", steps=None, budget_minutes=0.05))
    assert result.finished and result.step == 3 * 2, "3 s of 1-s rounds of 2 student steps"
    ckpt = torch.load(result.run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["elapsed"] == pytest.approx(3.0) and ckpt["finished"]


class SplitClock(FakeClock):
    """Rounds take 1 s of wall time but 3 s of process CPU time (three busy threads)."""

    def __init__(self) -> None:
        super().__init__(1.0)
        self.cpu = 0.0

    def process_time(self) -> float:
        self.cpu += 3.0
        return self.cpu


@pytest.mark.parametrize(("clock", "rounds"), [("wall", 6), ("cpu", 2)])
def test_budget_clock_chooses_what_the_minutes_count(teacher_file: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, clock: str,
                                                     rounds: int) -> None:
    import dfkd.engine

    monkeypatch.setattr(dfkd.engine, "time", SplitClock())
    result = distill(cfg_for(teacher_file, tmp_path / "r", steps=None, budget_minutes=0.1, budget_clock=clock))
    assert result.finished and result.step == rounds * 2, f"6 s of budget on the {clock} clock"


def test_default_budget_is_ten_minutes(teacher_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dfkd.engine

    monkeypatch.setattr(dfkd.engine, "time", FakeClock(30.0))  # each round takes 30 s on this clock
    result = distill(cfg_for(teacher_file, tmp_path / "r", steps=None, budget_minutes=None))
    assert result.finished and result.step == 20 * 2, "600 s of 30-s rounds of 2 student steps"
    assert torch.load(result.run_dir / "checkpoint.pt", weights_only=True)["elapsed"] == pytest.approx(600.0)


def test_bn_free_teacher_warns_once_and_runs(bnfree_teacher_file: str, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="no BatchNorm statistics") as record:
        distill(cfg_for(bnfree_teacher_file, tmp_path / "r", method="dfq", steps=4,
                        params={"batch_size": 8, "s_steps": 2}))
    assert len([w for w in record if "BatchNorm" in str(w.message)]) == 1


def test_a_run_saved_before_a_setting_existed_resumes_with_what_it_ran(teacher_file: str, tmp_path: Path) -> None:
    """fast's CPU recipe clips the student's gradient now; a checkpoint without `clip_s` ran unclipped, and its
    resume stays unclipped (a resume ends with the student the uninterrupted run would have)."""
    params = {"batch_size": 8, "synth_batch_size": 8, "g_steps": 1, "s_steps": 2}
    run = distill(cfg_for(teacher_file, tmp_path / "r", method="fast", steps=4, params=params)).run_dir
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["params"]["clip_s"] == 1.0  # today's recipe
    del ckpt["config"]["params"]["clip_s"]  # as a run saved before the setting
    torch.save(ckpt, run / "checkpoint.pt")
    resume(run, steps=8)
    resumed = torch.load(run / "checkpoint.pt", weights_only=True)
    assert resumed["step"] == 8 and resumed["config"]["params"]["clip_s"] is None


def test_a_resume_checks_the_settings_it_is_given_not_those_the_run_started_with(teacher_file: str,
                                                                                   tmp_path: Path) -> None:
    # a bound added since (a learning rate at most 1e6) refused an older run's saved setting as "-p lr_d=...", a flag
    # the user never typed; what --resume gives is still checked
    run = distill(cfg_for(teacher_file, tmp_path / "r", steps=2)).run_dir
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["config"]["params"]["lr_d"] = 2e6  # dfad has no discriminator here: no effect on the run
    torch.save(ckpt, run / "checkpoint.pt")
    with pytest.raises(DfkdError, match=r"^-p lr_s=2000000.0: method dfad needs a finite number > 0 and <= 1e\+06"):
        resume(run, steps=3, params={"lr_s": 2e6})
    assert resume(run, steps=3).step == 3


def test_a_warm_up_without_student_steps_is_said_and_shown_on_the_bar(teacher_file: str, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # NAYER's warm-up synthesizes for rounds before the first student step; on a heavy teacher the step count sat
    # at 0 for minutes with nothing said.
    monkeypatch.setattr(dfkd.utils, "_is_tty", lambda stream: True)  # the bar as a terminal shows it
    params = {**get_method("nayer").quick, "warmup_rounds": 2, "gwp_loops": 1, "s_steps": 2}
    result = distill(cfg_for(teacher_file, tmp_path / "run", method="nayer", steps=4, params=params))
    assert result.finished and result.step == 4
    events = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    notes = [e for e in events if e.get("event") == "note" and "warm-up round" in e["message"]]
    assert len(notes) == 1 and notes[0]["message"].startswith("warm-up round 1/2") and notes[0]["step"] == 0
    err = capsys.readouterr().err
    assert "nayer: warm-up round 1/2" in err and "warm-up round 2/2" in err  # the note, then the bar's postfix
    said = report(result.run_dir).text()
    assert said.count("note:     step 0: warm-up round 1/2") == 1, said  # dfkd report says it too


def test_the_bar_drops_its_first_round_tag_once_the_student_steps(teacher_file: str, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dfkd.utils, "_is_tty", lambda stream: True)  # the bar as a terminal shows it
    # The tag stayed on the bar after the first round (dfad "2/4 ... synthesizing before the first student step"),
    # so a heavy teacher's second round, minutes long, read as if no student step had been made.
    cfg = DistillConfig(teachers=(teacher_file,), method="dfad", steps=4, out=str(tmp_path), fid_every=0,
                        params={"batch_size": 8, "s_steps": 2})
    distill(cfg)
    bars = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.startswith("dfad:")]
    assert any("0/4" in line and "synthesizing before the first student step" in line for line in bars)
    stepped = [line for line in bars if "2/4" in line or "4/4" in line]
    assert stepped and not any("synthesizing" in line for line in stepped), stepped
