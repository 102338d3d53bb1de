"""A run prints its resolved recipe at start (which, why, departures from the paper) and stores resolved values."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dfkd.build import warn_no_effect
from dfkd.checkpoint import load_checkpoint
from dfkd.cli.main import main
from dfkd.config import DistillConfig
from dfkd.cost import millions
from dfkd.engine import distill, resume
from dfkd.methods import get_method, list_methods
from dfkd.methods.base import BASE_DEFAULTS
from dfkd.synthesis import synthesize
from dfkd.teacher import load_teacher
from dfkd.transfer import load_transfer

QUICK = {"batch_size": 8, "s_steps": 2}


def run(teacher_file: str, out: Path, **params) -> tuple[dict, dict]:
    cfg = DistillConfig(teachers=(teacher_file,), method="dfq", steps=2, out=str(out), fid_every=0,
                        params={**QUICK, **params})
    run_dir = distill(cfg).run_dir
    config = json.loads((run_dir / "config.json").read_text())
    return config, load_checkpoint(run_dir / "checkpoint.pt")["config"]


def test_multiply_adds_read_in_millions_or_billions() -> None:
    # a 224-px ViT printed "1.13e+04M"
    assert [millions(m) for m in (417_000, 101_000_000, 999_000_000, 11_300_000_000, None)] == \
        ["0.417M", "101M", "999M", "11.3G", "?"]


def test_the_resolved_cpu_recipe_is_printed_and_saved(teacher_file: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    config, ckpt = run(teacher_file, tmp_path / "cpu")
    err = capsys.readouterr().err
    assert ("recipe: cpu (teacher 1x32x32 inputs (mnist kind), 61,990 parameters, 0.417M multiply-adds an image: "
            "MNIST kind and <= 5M multiply-adds") in err
    assert "departs from the paper: ngf = 16 (paper: 64; cpu recipe)" in err
    assert "departs from the paper: s_optimizer = 'adam' (paper: 'sgd'; cpu recipe)" in err
    assert "departs from the paper: batch_size = 8 (paper: 256; set by you)" in err
    assert "why the cpu recipe: batch 64, student Adam 2e-3" in err
    for saved in (config, ckpt):
        p = saved["params"]
        assert (p["recipe"], p["ngf"], p["s_optimizer"], p["batch_size"]) == ("cpu", 16, "adam", 8)


def test_recipe_paper_is_printed_and_saved(teacher_file: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config, ckpt = run(teacher_file, tmp_path / "paper", recipe="paper")
    err = capsys.readouterr().err
    assert "recipe: paper (set by recipe=paper)" in err
    moved = [ln.strip() for ln in err.splitlines() if "departs from the paper" in ln]
    assert sorted(moved) == ["departs from the paper: batch_size = 8 (paper: 256; set by you)",
                             "departs from the paper: s_steps = 2 (paper: 10; set by you)"]
    for saved in (config, ckpt):
        p = saved["params"]
        assert (p["recipe"], p["ngf"], p["s_optimizer"], p["lr_s"], p["weight_decay"]) == \
            ("paper", 64, "sgd", 0.1, 1e-4)


def test_dfkd_own_settings_are_not_called_departures_from_the_paper(teacher_file: str, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    run(teacher_file, tmp_path / "own", ema_decay=0.0, input_stats=False, recipe="paper")
    err = capsys.readouterr().err
    assert "dfkd setting (not the paper's): ema_decay = 0.0 (default: 0.998; set by you)" in err
    assert "dfkd setting (not the paper's): input_stats = False (default: True; set by you)" in err
    moved = sorted(ln.strip() for ln in err.splitlines() if "departs from the paper" in ln)
    assert moved == ["departs from the paper: batch_size = 8 (paper: 256; set by you)",
                     "departs from the paper: s_steps = 2 (paper: 10; set by you)"]


def test_where_a_pool_is_stored_is_a_dfkd_setting() -> None:
    from dfkd.methods import get_method
    from dfkd.methods._recipes import departures

    cls = get_method("cmi")
    params = {**cls.finalize(cls.paper_params(None)), "pool_dir": "/x", "g_steps": 7}
    assert departures(cls, None, params, {"pool_dir": "/x", "g_steps": 7}) == [
        "departs from the paper: g_steps = 7 (paper: 200; set by you)",
        "dfkd setting (not the paper's): pool_dir = '/x' (default: None; set by you)"]


def test_resolved_config_has_no_value_chosen_later(teacher_file: str, tmp_path: Path) -> None:
    cfg = DistillConfig(teachers=(teacher_file,), method="deepinversion", steps=1, out=str(tmp_path / "di"),
                        fid_every=0, params={"batch_size": 4, "iterations": 2, "s_steps": 1})
    p = json.loads((distill(cfg).run_dir / "config.json").read_text())["params"]
    assert p["synth_batch_size"] == 256 and p["recipe"] == "cpu"  # the CPU recipe's, not None


def test_methods_params_shows_the_recipe_and_the_kept_deviations(teacher_file: str) -> None:
    out = CliRunner().invoke(main, ["methods", "--params", "cmi"]).output
    assert "recipe: paper (no teacher given: the paper's settings)" in out and "every setting is the paper's" in out
    assert "kept deviation: the pool is an ImagePool" in out
    assert "  ngf            64" in out
    lenet = CliRunner().invoke(main, ["methods", "--params", "cmi", "--teacher", teacher_file]).output
    assert "recipe: cpu (teacher 1x32x32" in lenet and "departs from the paper: g_steps = 40 (paper: 200" in lenet
    forced = CliRunner().invoke(main, ["methods", "--params", "cmi", "--teacher", teacher_file, "--recipe", "paper"])
    assert "recipe: paper (set by recipe=paper)" in forced.output and "  ngf            64" in forced.output


def test_methods_params_marks_the_settings_a_method_does_not_use() -> None:
    out = CliRunner().invoke(main, ["methods", "--params", "zskd"]).output
    assert "  g_steps        1          (not used: its synthesis steps per batch are -p di_iters)" in out
    assert "  di_iters       1500\n" in out


def test_methods_params_shows_the_clip_of_the_default_student(teacher_file: str) -> None:
    out = CliRunner().invoke(main, ["methods", "--params", "dfad", "--teacher", teacher_file]).output
    assert "  clip_s         1.0" in out and "clip_s = 1 (default: None; the student has no normalisation" in out
    assert "  clip_s         None" in CliRunner().invoke(main, ["methods", "--params", "dfad"]).output  # no student


def no_effect_warnings(record: pytest.WarningsRecorder) -> list[str]:
    return sorted(str(w.message) for w in record if "has no effect" in str(w.message))


def test_a_setting_the_run_does_not_use_is_said_to_have_no_effect(teacher_file: str, tmp_path: Path) -> None:
    # -p g_steps with zskd (its iterations are di_iters) or -p momentum with an Adam student did nothing, silently
    with pytest.warns(UserWarning) as record:
        run(teacher_file, tmp_path / "dfq", momentum=0.5, gamma=0.5, lr_s=1e-3)  # dfq's CPU recipe: Adam, cosine
    assert no_effect_warnings(record) == [
        "-p gamma=0.5 has no effect: dfq does not use it here (the schedule is cosine; -p schedule=multistep "
        "uses it)",
        "-p momentum=0.5 has no effect: dfq does not use it here (the student's optimizer is adam; -p "
        "s_optimizer=sgd uses it)"]


SELECTION = {"heldout_size", "heldout_chunk", "select_margin", "select_signal"}
SWITCHED = {"ta_threshold", "ta_max_draws", "select_every", *SELECTION, "reptile_alpha", "reset_at", "warmup",
            "bn_mmt", "flip_p"}


@pytest.mark.parametrize(("method", "params", "unused"), [
    ("dfad", {}, {"ta_threshold", "ta_max_draws"}),
    ("dfad", {"ta_verify": True}, set()),
    ("zskt", {"ta_verify": True, "select_every": 0}, SELECTION),
    ("fast", {}, {"select_every", *SELECTION, "reptile_alpha"}),
    ("fast", {"is_maml": 0, "reset_l0": 0, "adv": 0, "bn": 0},
     {"select_every", *SELECTION, "reset_at", "warmup", "bn_mmt"}),
    ("nayer", {"bn": 0}, {"select_every", *SELECTION, "bn_mmt"}),
    ("zskd", {"augment": "none"}, {"select_every", *SELECTION, "flip_p"}),
    ("zskd", {}, {"select_every", *SELECTION}),
])
def test_a_setting_another_setting_turns_off_has_no_effect(method: str, params: dict, unused: set[str]) -> None:
    # -p ta_threshold without ta_verify, reptile_alpha under MAML, warmup with adv=0, the selection's settings of a
    # pool method or with select_every=0: each printed "(set by you)" and did nothing, unsaid
    cls = get_method(method)
    assert set(cls.no_effect({**cls.default_params(None), **params})) & SWITCHED == unused


def test_an_ensemble_setting_in_a_run_of_one_teacher_is_said_to_have_no_effect(teacher_file: str,
                                                                                tmp_path: Path) -> None:
    # -p teacher_weighting=confidence with one teacher was taken ("set by you") and did nothing, unsaid
    with pytest.warns(UserWarning) as record:
        run(teacher_file, tmp_path / "one", teacher_weighting="confidence", teacher_weights=[5])  # weights: unsaid too
    assert no_effect_warnings(record) == [
        '-p teacher_weighting="confidence" has no effect: dfq does not use it here (the run has one teacher; repeat '
        "--teacher for an ensemble)",
        "-p teacher_weights=[5] has no effect: dfq does not use it here (the run has one teacher; repeat --teacher "
        "for an ensemble)"]


def test_a_smaller_batch_says_the_synthesis_keeps_its_own() -> None:
    # -p batch_size=2 to fit memory on a heavy teacher: the synthesis still made its recipe's batches, unsaid
    with pytest.warns(UserWarning, match=r"-p batch_size=2 sets the student's batch; nayer synthesizes images 64 at "
                                         r"a time \(-p synth_batch_size=N sets that\)"):
        warn_no_effect(get_method("nayer"), {**get_method("nayer").default_params(None), "synth_batch_size": 64,
                                             "batch_size": 2}, {"batch_size": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_no_effect(get_method("nayer"), {"synth_batch_size": 8, "batch_size": 2}, {"batch_size": 2,
                                                                                      "synth_batch_size": 8})
        warn_no_effect(get_method("deepinversion"), {"synth_batch_size": None, "batch_size": 2}, {"batch_size": 2})
        # a config file's synth_batch_size equal to the recipe's is left out of what the user "set", but named
        warn_no_effect(get_method("nayer"), {"synth_batch_size": 64, "batch_size": 2}, {"batch_size": 2},
                       named={"batch_size", "synth_batch_size"}, from_file={"synth_batch_size"})
    # a config file's value is named as the file's (it said "-p batch_size=2", a flag the user never typed)
    with pytest.warns(UserWarning, match=r"^--config's batch_size=2 sets the student's batch"):
        warn_no_effect(get_method("nayer"), {"synth_batch_size": 64, "batch_size": 2}, {"batch_size": 2},
                       named={"batch_size"}, from_file={"batch_size"})


def test_a_resumed_run_does_not_warn_of_its_saved_settings_again(teacher_file: str, tmp_path: Path,
                                                                 recwarn: pytest.WarningsRecorder) -> None:
    cfg = DistillConfig(teachers=(teacher_file,), method="dfad", steps=2, out=str(tmp_path / "dfad"), fid_every=0,
                        params={**QUICK, "T": 4.0})
    run_dir = distill(cfg).run_dir
    assert no_effect_warnings(recwarn) == [
        "-p T=4.0 has no effect: dfad does not use it here (its student loss is the L1 distance between logits, "
        "which has no temperature)"]
    recwarn.clear()
    assert resume(run_dir, steps=3).step == 3
    assert no_effect_warnings(recwarn) == []


def test_a_resumed_run_names_the_settings_as_its_start_did(teacher_file: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    # a resume said every saved setting was "set by you" and its recipe "set by recipe=cpu" (its config holds them all)
    def moved(err: str) -> list[str]:
        return sorted(ln.strip() for ln in err.splitlines() if "departs from the paper" in ln or "clip_s" in ln)

    cfg = DistillConfig(teachers=(teacher_file,), method="dfad", steps=2, out=str(tmp_path / "r"), fid_every=0,
                        params={**QUICK, "lr_g": 0.02})
    run_dir = distill(cfg).run_dir
    start = capsys.readouterr().err
    assert "departs from the paper: ngf = 16 (paper: 64; cpu recipe)" in moved(start)
    resume(run_dir, steps=3, params={"lr_s": 0.001})
    again = capsys.readouterr().err
    assert "set by recipe=" not in again and "recipe: cpu (teacher 1x32x32 inputs" in again
    assert moved(again) == sorted([*(ln for ln in moved(start) if "lr_s" not in ln),
                                   "departs from the paper: lr_s = 0.001 (paper: 0.01; set by you)"])
    # a checkpoint written before it kept the user's keys: the settings the recipe holds are the recipe's
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    del ckpt["extra"]["yours"]
    torch.save(ckpt, run_dir / "checkpoint.pt")
    resume(run_dir, steps=4)
    old = capsys.readouterr().err
    assert "set by recipe=" not in old and "recipe: cpu (teacher 1x32x32 inputs" in old
    assert moved(old) == moved(again)


def test_what_a_method_ignores_follows_its_settings() -> None:
    assert set(get_method("zskd").no_effect({"s_optimizer": "sgd", "schedule": "multistep", "discriminator": "logits",
                                             "feature_loss": "at"})) == {"g_steps", "select_every", *SELECTION}
    assert "s_steps" in get_method("dafl").no_effect({}) and "T" in get_method("zskt").no_effect({})
    assert "lr_d" in get_method("dfad").no_effect({}) and "lr_d" not in get_method("online").no_effect({})
    assert "g_steps" not in get_method("fast").no_effect({}) and "T" not in get_method("fast").no_effect({})
    for name in list_methods():  # a method ignores only shared settings, never one its own recipe sets
        cls = get_method(name)
        assert set(cls.ignores) <= set(BASE_DEFAULTS), name
        own = {k for klass in cls.__mro__ for k in klass.__dict__.get("defaults", {})}
        assert not set(cls.ignores) & own, name


def test_synthesize_does_not_call_the_recipe_it_hands_on_without_effect(teacher_file: str, tmp_path: Path,
                                                                        recwarn: pytest.WarningsRecorder) -> None:
    # dfad does not use T, but `synthesize` writes it into the file's student recipe, which the receiver trains with
    synthesize(load_teacher(teacher_file), "dfad", 8, tmp_path / "s.npz", params={**QUICK, "T": 4.0}, steps=1,
               views=1)
    assert no_effect_warnings(recwarn) == [] and load_transfer(tmp_path / "s.npz").recipe["T"] == 4.0
