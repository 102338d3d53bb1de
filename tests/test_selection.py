"""The student EMA, the held-out synthetic set and the student a run writes, through kills and resumes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dfkd.config import DistillConfig
from dfkd.engine import distill, resume
from dfkd.errors import DfkdError
from dfkd.methods import get_method
from dfkd.selection import HeldOut, Selector, class_balanced_agreement, make_ema, update_ema

SELECT = {"select_every": 2, "heldout_size": 24, "heldout_chunk": 8, "ema_decay": 0.9, "watch_every": 2}


class SimulatedKill(Exception):
    pass


def cfg_for(teacher_file: str, out: Path, method: str = "dfad", **kw) -> DistillConfig:
    params = {"batch_size": 8, **({"s_steps": 2} if method == "dfad" else {}), **SELECT, **kw.pop("params", {})}
    # deterministic: these runs are compared bit for bit, on a GPU too
    base = dict(steps=16, log_every=2, image_every=4, eval_every=4, ckpt_every=4, fid_every=0, deterministic=True)
    return DistillConfig(teachers=(teacher_file,), method=method, out=str(out), params=params, **{**base, **kw})


def student_of(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "student.pt", map_location="cpu", weights_only=True)["state_dict"]


def finished_event(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def test_class_balanced_agreement_weighs_every_class_alike() -> None:
    labels = torch.tensor([0] * 8 + [1, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0] * 8 + [0, 0]), 3).float()
    assert class_balanced_agreement(logits, labels, 3) == pytest.approx(1 / 3)  # plain agreement would be 0.8


def test_ema_averages_weights_and_batchnorm_buffers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = make_ema(model, 0.5)  # 0.5 per step: 0.25 over a round of two steps, 0.125 over three
    update_ema(ema, model, 2)
    ema.multi_avg_fn.done = 10**6  # past the warm-up (its own test below)
    w0, m0 = model[0].weight.detach().clone(), model[1].running_mean.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model(torch.randn(8, 3))  # a train-mode forward moves the BN running mean
    update_ema(ema, model, 2)
    assert torch.allclose(ema.module[0].weight, 0.25 * w0 + 0.75 * model[0].weight)
    assert torch.allclose(ema.module[1].running_mean, 0.25 * m0 + 0.75 * model[1].running_mean)
    w1 = ema.module[0].weight.detach().clone()
    update_ema(ema, model, 0)  # a round without student steps (a warm-up) leaves it
    assert torch.equal(ema.module[0].weight, w1)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    update_ema(ema, model, 3)  # a longer round weighs the student more
    assert torch.allclose(ema.module[0].weight, 0.125 * w1 + 0.875 * model[0].weight)
    assert make_ema(model, 0.0) is None
    with pytest.raises(DfkdError, match="ema_decay=1"):
        make_ema(model, 1.0)


def test_the_ema_decay_warms_up_so_a_short_run_does_not_average_its_first_student() -> None:
    model = nn.Linear(3, 4)
    ema = make_ema(model, 0.998)
    w0 = model.weight.detach().clone()
    update_ema(ema, model, 10)  # copies the student of step 10
    with torch.no_grad():
        model.weight.add_(1.0)
    update_ema(ema, model, 10)  # t = 20: per-step decay min(0.998, 21 / 30) = 0.7, over 10 steps 0.7 ** 10
    d = 0.7 ** 10
    assert torch.allclose(ema.module.weight, d * w0 + (1 - d) * model.weight)
    assert ema.multi_avg_fn.done == 20
    ema.multi_avg_fn.done = 100_000  # late in a long run the set decay holds
    assert ema.multi_avg_fn.decay() == pytest.approx(0.998 ** 10)


def test_heldout_reservoir_keeps_its_size_and_takes_later_draws() -> None:
    h = HeldOut(10, seed=0)
    for i in range(5):
        h.add(torch.full((4, 1), float(i)), torch.full((4, 3), float(i)))
    assert len(h) == 10 and h.seen == 20
    kept = set(h.x.flatten().tolist())
    assert 0.0 in kept or 1.0 in kept, "early draws stay represented"
    assert kept & {3.0, 4.0}, "later draws enter"


def test_a_resumed_heldout_set_lives_where_the_student_computes() -> None:
    """A checkpoint loads on the CPU; a GPU run's held-out set must go back to the GPU (meta stands in for it)."""
    h = HeldOut(4, seed=0)
    h.add(torch.rand(4, 1, 2, 2), torch.eye(4))
    again = HeldOut(4, seed=0)
    again.load_state_dict(h.state_dict(), torch.device("meta"))
    assert again.x.device.type == "meta" and again.logits.device.type == "meta" and again.size == 4


def test_heldout_draws_do_not_touch_the_run(teacher_file: str, tmp_path: Path) -> None:
    """Selection on or off, the raw student trains identically (its draws fork the RNG, generator BN restored)."""
    on = distill(cfg_for(teacher_file, tmp_path / "on", params={"ema_decay": 0.0}))
    off = distill(cfg_for(teacher_file, tmp_path / "off", params={"select_every": 0, "ema_decay": 0.0}))
    on_ck = torch.load(on.run_dir / "checkpoint.pt", weights_only=True)
    off_ck = torch.load(off.run_dir / "checkpoint.pt", weights_only=True)
    for part in ("student", "synth"):
        a, b = on_ck["method"][part], off_ck["method"][part]
        flat_a = a if part == "student" else a["generator"]
        flat_b = b if part == "student" else b["generator"]
        assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), part
    held = on_ck["extra"]["watch"]["selector"]["heldout"]
    assert held["seen"] == 8 * 8 and held["x"].shape[0] == 24


@pytest.mark.parametrize("method", ["dfad", "dafl"])
def test_kill_and_resume_ends_with_the_same_selected_student(method: str, teacher_file: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    full = distill(cfg_for(teacher_file, tmp_path / "full", method))
    cls = get_method(method)
    original = cls.round
    calls = {"n": 0}

    def dying_round(self):
        calls["n"] += 1
        if calls["n"] == (5 if method == "dfad" else 9):  # after the step-8 checkpoint, before the next one
            raise SimulatedKill
        return original(self)

    monkeypatch.setattr(cls, "round", dying_round)
    with pytest.raises(SimulatedKill):
        distill(cfg_for(teacher_file, tmp_path / "killed", method))
    monkeypatch.setattr(cls, "round", original)
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["step"] == 8
    resumed = resume(tmp_path / "killed")
    a, b = student_of(full.run_dir), student_of(resumed.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full.selected and full.selected == resumed.selected
    wa = torch.load(full.run_dir / "checkpoint.pt", weights_only=True)["extra"]["watch"]["selector"]
    wb = torch.load(resumed.run_dir / "checkpoint.pt", weights_only=True)["extra"]["watch"]["selector"]
    assert all(torch.equal(wa["ema"][k], wb["ema"][k]) for k in wa["ema"])
    assert torch.equal(wa["heldout"]["x"], wb["heldout"]["x"]) and wa["best_info"] == wb["best_info"]


def test_a_student_that_swings_away_at_the_end_is_not_the_one_written(teacher_file: str, eval_npz: str,
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The last round wrecks the raw student (a swing); student.pt is the kept best or the EMA, not the wreck."""
    cls = get_method("dfad")
    original = cls.round
    calls = {"n": 0}

    def swing_at_the_end(self):
        calls["n"] += 1
        logs = original(self)
        if calls["n"] == 8:
            with torch.no_grad():
                for p in self.student.parameters():
                    p.copy_(torch.randn_like(p) * 3)
        return logs

    monkeypatch.setattr(cls, "round", swing_at_the_end)
    result = distill(cfg_for(teacher_file, tmp_path / "r", eval_data=eval_npz))
    wrecked = torch.load(result.run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["method"]["student"]
    written = student_of(result.run_dir)
    assert not all(torch.equal(written[k], wrecked[k]) for k in written)
    assert not result.selected.startswith(f"raw at step {result.step}"), "a snapshot from before the wreck, or the EMA"
    event = finished_event(result.run_dir)
    assert event["selected"] == result.selected
    assert {"student/top1_raw", "student/top1_ema", "student/top1_best", "student/top1_selected"} <= event.keys()
    scores = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()
              if "select/kl" in x][-1]
    # the wreck is worse by the selection signal (its agreement can tie: a batch the teacher gives one class)
    assert scores["select/kl"] > min(scores["select/kl_ema"], scores["select/kl_best"])
    provenance = torch.load(result.run_dir / "student.pt", weights_only=True)["provenance"]
    assert provenance["selected"] == result.selected


def test_selection_off_writes_the_raw_student(teacher_file: str, tmp_path: Path) -> None:
    result = distill(cfg_for(teacher_file, tmp_path / "r", params={"select_every": 0}))
    raw = torch.load(result.run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["method"]["student"]
    written = student_of(result.run_dir)
    assert all(torch.equal(written[k], raw[k]) for k in written) and result.selected == ""


def test_pool_methods_have_no_heldout_set_and_write_the_raw_student(teacher_file: str, tmp_path: Path) -> None:
    cfg = cfg_for(teacher_file, tmp_path / "r", "deepinversion", steps=4,
                  params={"batch_size": 4, "iterations": 2})
    result = distill(cfg)
    raw = torch.load(result.run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["method"]["student"]
    assert all(torch.equal(v, raw[k]) for k, v in student_of(result.run_dir).items())
    assert "select/agreement" not in (result.run_dir / "metrics.jsonl").read_text()


def test_a_near_tie_goes_to_the_final_student_a_clear_win_to_the_snapshot(tiny_teacher) -> None:  # noqa: ANN001
    from dfkd.methods.base import Method
    from dfkd.models import create
    from dfkd.selection import Selector

    cls = get_method("dfad")
    params = {**cls.default_params(tiny_teacher), "batch_size": 8, **SELECT, "select_margin": 0.5}
    student = create("lenet5_half", num_classes=10, in_channels=1, input_size=32)
    method: Method = cls(tiny_teacher, student, params, torch.device("cpu"))
    sel = Selector(method, seed=0)
    sel.check(2)  # keeps a snapshot of the current student
    with torch.no_grad():
        student.classifier.bias.add_(torch.linspace(0, 1e-3, 10))  # a different student, scoring (almost) the same
    name, model, _ = sel.choose(4)
    assert name.startswith("raw") and model is student, "within the margin the final student wins"
    sel.margin = -1.0  # any snapshot now counts as clearly better
    name, model, _ = sel.choose(4)
    assert name == "raw at step 2" and model is sel.best


def test_a_disabled_selector_keeps_neither_ema_nor_heldout_set(tiny_teacher) -> None:  # noqa: ANN001
    """What a --quantize run gets: its int8 file is made from the raw student, so student.pt is that one."""
    from dfkd.models import create
    from dfkd.selection import Selector

    cls = get_method("dfad")
    params = {**cls.default_params(tiny_teacher), "batch_size": 8, **SELECT}
    method = cls(tiny_teacher, create("lenet5_half", num_classes=10, in_channels=1, input_size=32), params,
                 torch.device("cpu"))
    sel = Selector(method, seed=0, enabled=False)
    assert sel.ema is None and sel.heldout is None and sel.check(2) == {}
    name, model, scores = sel.choose(2)
    assert name == "raw" and model is method.student and scores == {}


def test_ema_starts_with_the_first_student_steps_not_the_warm_up(teacher_file: str, tmp_path: Path) -> None:
    from dfkd.methods.nayer import NAYER

    # NAYER's warm-up rounds make no student step; one round of 4 steps follows. The EMA's first update copies the
    # student, so it must be the trained student, not the untrained one of a warm-up round averaged in.
    params = {**NAYER.quick, "warmup_rounds": 2, "s_steps": 4, "ema_decay": 0.9, "select_every": 0}
    result = distill(cfg_for(teacher_file, tmp_path / "r", "nayer", steps=4, params=params))
    ckpt = torch.load(result.run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    ema = ckpt["extra"]["watch"]["selector"]["ema"]
    raw = ckpt["method"]["student"]
    assert int(ema["n_averaged"]) == 1
    assert all(torch.allclose(ema[f"module.{k}"], v) for k, v in raw.items())


def test_heldout_kl_sees_what_agreement_does_not() -> None:
    # The same answers, less sure of them: top-1 agreement cannot tell the two students apart; the KL can.
    torch.manual_seed(0)
    teacher = nn.Linear(6, 4)
    h = HeldOut(32, seed=0)
    x = torch.randn(32, 6)
    h.add(x, teacher(x).detach())
    same, timid = nn.Linear(6, 4), nn.Linear(6, 4)
    same.load_state_dict(teacher.state_dict())
    timid.load_state_dict({k: v * 0.2 for k, v in teacher.state_dict().items()})
    exact, unsure = h.scores(same, 4), h.scores(timid, 4)
    assert exact["agreement"] == unsure["agreement"] == 1.0
    assert exact["kl"] == pytest.approx(0.0, abs=1e-6) and unsure["kl"] > 0.05


@pytest.mark.parametrize("signal", ["kl", "agreement"])
def test_the_written_student_follows_the_selection_signal(tiny_teacher, signal: str) -> None:  # noqa: ANN001
    # A snapshot equal to the teacher, then the student made unsure of the same answers: the KL prefers the snapshot
    # clearly; agreement calls it a tie, which goes to the final student.
    cls = get_method("dfad")
    params = {**cls.default_params(tiny_teacher), "batch_size": 8, **SELECT, "ema_decay": 0.0, "select_margin": 0.0,
              "select_signal": signal}
    student = copy.deepcopy(tiny_teacher.module)
    method = cls(tiny_teacher, student, params, torch.device("cpu"))
    sel = Selector(method, seed=0)
    sel.check(2)  # keeps the teacher's copy
    with torch.no_grad():
        student.classifier.weight.mul_(0.2)
        student.classifier.bias.mul_(0.2)
    name, model, scores = sel.choose(4)
    assert scores["raw"]["agreement"] == scores["best"]["agreement"] and scores["raw"]["kl"] > scores["best"]["kl"]
    if signal == "kl":
        assert name == "raw at step 2" and model is sel.best
    else:
        assert name == "raw at step 4" and model is student


def test_an_unknown_selection_signal_is_refused(tiny_teacher) -> None:  # noqa: ANN001
    cls = get_method("dfad")
    method = cls(tiny_teacher, copy.deepcopy(tiny_teacher.module),
                 {**cls.default_params(tiny_teacher), **SELECT, "select_signal": "acc"}, torch.device("cpu"))
    with pytest.raises(DfkdError, match="select_signal='acc': use kl .* or agreement"):
        Selector(method, seed=0)


def test_a_checkpoints_heldout_set_without_teacher_logits_is_labelled_again(tiny_teacher) -> None:  # noqa: ANN001
    # Checkpoints from before the KL signal kept the teacher's arg-max only
    h = HeldOut(8, seed=0)
    x = torch.rand(8, 1, 32, 32)
    h.add(x, tiny_teacher(x).detach())
    old = {**h.state_dict(), "labels": h.labels}
    del old["logits"]
    again = HeldOut(8, seed=0)
    again.load_state_dict(old, torch.device("cpu"), tiny_teacher)
    assert torch.allclose(again.logits, h.logits, atol=1e-5) and again.seen == 8
