"""`--method auto`: the choice from the teacher's measured properties, the start-up line, config.json, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dfkd.auto import AUTO, RULES, choose, profile
from dfkd.checkpoint import load_checkpoint
from dfkd.cli.main import main
from dfkd.config import DistillConfig, build_config, check_method_params
from dfkd.engine import distill, resume
from dfkd.errors import DfkdError
from dfkd.methods import get_method
from dfkd.modelfile import load_model
from dfkd.teacher import Teacher, load_teacher
from tests.conftest import KWARGS, MNIST_SPEC, make_teacher_module
from tests.test_engine import SimulatedKill, states_equal

QUICK = {"batch_size": 8, "s_steps": 2}


def tiny(arch: str) -> Teacher:
    return Teacher(make_teacher_module(arch), MNIST_SPEC, arch=arch, arch_kwargs=KWARGS)


def test_auto_picks_fast_for_mnist_kind_teachers_with_or_without_bn() -> None:
    bn, plain = profile(tiny("lenet5_bn")), profile(tiny("lenet5"))
    assert bn.bn and not plain.bn and bn.kind == plain.kind == "mnist" and bn.params < 200_000
    assert [(choose(p).method, choose(p).recipe) for p in (bn, plain)] == [("fast", None), ("fast", "cpu")]
    assert 1.0 <= bn.noise_classes <= 10 and bn.logit_scale > 0 and 0.1 <= bn.noise_confidence <= 1
    assert "no BatchNorm, MNIST-kind" in choose(plain).when


def test_a_bn_free_teachers_confidence_on_noise_does_not_change_the_pick() -> None:
    # the benchmark's BN-free MNIST-kind teachers spread 0.26-0.72 on noise; fast led dfad on all of them
    teacher = tiny("lenet5")
    hesitant = profile(teacher)
    final = [m for m in teacher.module.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        final.weight.mul_(200.0)
        final.bias.add_(torch.linspace(0, 20, final.bias.numel()))
    confident = profile(teacher)
    assert hesitant.noise_confidence < 0.3 and confident.noise_confidence > 0.7
    assert choose(hesitant) == choose(confident) and choose(confident).method == "fast"
    assert get_method("fast").default_params(teacher)["recipe"] == "cpu"
    assert get_method("fast").default_params(teacher)["input_stats"], "its BN term falls back to the input"


def test_auto_picks_dfq_with_its_cpu_recipe_for_a_cifar_bn_teacher() -> None:
    from dfkd.spec import InputSpec

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10))
    teacher = Teacher(net.eval(), InputSpec(3, 32, (0.5,) * 3, (0.25,) * 3), fmt="pickle")
    rule = choose(profile(teacher))
    assert (rule.method, rule.recipe) == ("dfq", "cpu")


def test_a_heavy_mnist_kind_bn_teacher_gets_dfq_with_its_cpu_recipe() -> None:
    # fast's row is for the teachers its CPU recipe was measured on (at most 5M multiply-adds); on a 101M one
    # (a Fashion-MNIST WRN-16-2) dfq with its CPU recipe led fast by 8-10 points
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
                              torch.nn.Conv2d(64, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(16, 10))
    prof = profile(Teacher(net.eval(), MNIST_SPEC, fmt="pickle"))
    assert prof.bn and prof.kind == "mnist" and prof.macs is not None and prof.macs > 5_000_000
    assert (choose(prof).method, choose(prof).recipe) == ("dfq", "cpu")
    light = profile(tiny("lenet5_bn"))
    assert light.macs is not None and light.macs < 1_000_000 and choose(light).method == "fast"


def test_auto_picks_fast_with_its_cpu_recipe_for_a_bn_free_cifar_teacher() -> None:
    # dfad, which auto once picked here, ended at chance on a BN-free CIFAR-10 LeNet-5 with its paper recipe
    from dfkd.spec import InputSpec

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 10))
    teacher = Teacher(net.eval(), InputSpec(3, 32, (0.5,) * 3, (0.25,) * 3), fmt="pickle")
    prof = profile(teacher)
    assert not prof.bn and prof.kind == "cifar"
    rule = choose(prof)
    assert (rule.method, rule.recipe) == ("fast", "cpu")


def test_a_bn_free_teacher_of_64_px_gets_fast_which_runs(tmp_path: Path) -> None:
    from dfkd.modelfile import ModelFile, save_model
    from dfkd.models import create
    from dfkd.spec import InputSpec

    kwargs = {"num_classes": 10, "in_channels": 3, "input_size": 64}
    spec = InputSpec(3, 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    torch.manual_seed(0)
    net = create("lenet5", **kwargs).eval()
    prof = profile(Teacher(net, spec, arch="lenet5", arch_kwargs=kwargs))
    assert not prof.bn and prof.kind == "imagenet"
    assert (choose(prof).method, choose(prof).recipe) == ("fast", None) and "not measured" in choose(prof).when
    save_model(tmp_path / "t.pt", net, ModelFile("lenet5", kwargs, spec, 10))
    cfg = DistillConfig(teachers=(str(tmp_path / "t.pt"),), steps=2, out=str(tmp_path / "r"), fid_every=0,
                        params=dict(get_method("fast").quick))
    result = distill(cfg)
    assert result.step == 2 and json.loads((result.run_dir / "config.json").read_text())["method"] == "fast"


def test_the_profile_is_deterministic_and_leaves_the_run_rng_alone() -> None:
    teacher = tiny("lenet5_bn")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = profile(teacher)
    assert torch.equal(torch.rand(3), expected), "probing drew from the global RNG"
    assert a == profile(teacher)


def test_every_rule_names_a_registered_method_with_evidence() -> None:
    for rule in RULES:
        get_method(rule.method)
        assert rule.evidence and rule.when
    assert RULES[-1].test(profile(tiny("lenet5")))  # the last row catches every teacher


def test_auto_is_the_default_and_the_run_says_and_records_its_choice(bnfree_teacher_file: str,
                                                                     tmp_path: Path) -> None:
    assert DistillConfig().method == AUTO
    assert build_config(None, (), teachers=(bnfree_teacher_file,)).method == AUTO
    res = CliRunner().invoke(main, ["distill", "--teacher", bnfree_teacher_file, "--steps", "2", "--device", "cpu",
                                    "-p", "batch_size=8", "-p", "s_steps=2", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("auto: "))
    assert "auto: chose fast (recipe cpu): no BatchNorm, MNIST-kind inputs [1x32x32 inputs (mnist kind), 61,706 " \
           "parameters, 0.417M multiply-adds an input, no BatchNorm;" in line
    assert "logit scale" in line and "evidence: README" in line
    assert "recipe: cpu (set by --method auto for this teacher" in res.output  # not credited to the user
    assert "set by recipe=" not in res.output
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoint.pt")["config"]
    for saved in (config, ckpt):
        assert saved["method"] == "fast" and saved["auto_choice"]["method"] == "fast"
        assert saved["auto_choice"]["profile"]["bn"] is False and saved["params"]["s_steps"] == 2
        assert saved["auto_choice"]["recipe_by_auto"] is True and saved["params"]["recipe"] == "cpu"
    again = CliRunner().invoke(main, ["distill", "--resume", str(tmp_path / "r"), "--method", "auto", "--steps", "4"])
    assert again.exit_code == 0, again.output  # the same command with --resume: auto is the method it chose
    assert load_checkpoint(tmp_path / "r" / "checkpoint.pt")["step"] == 4


def test_a_named_method_is_not_replaced(teacher_file: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = DistillConfig(teachers=(teacher_file,), method="dfad", steps=2, out=str(tmp_path / "r"), fid_every=0,
                        params=QUICK)
    config = json.loads((distill(cfg).run_dir / "config.json").read_text())
    assert config["method"] == "dfad" and config["auto_choice"] is None
    assert "auto:" not in capsys.readouterr().err


def test_auto_on_a_bn_teacher_runs_fast(teacher_file: str, tmp_path: Path) -> None:
    cfg = DistillConfig(teachers=(teacher_file,), steps=2, out=str(tmp_path / "r"), fid_every=0,
                        params=dict(get_method("fast").quick))
    result = distill(cfg)
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["method"] == "fast" and result.step == 2
    assert result.run_dir.name == "r"


def test_resume_of_an_auto_run_continues_the_chosen_method_exactly(bnfree_teacher_file: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def cfg(out: str) -> DistillConfig:
        return DistillConfig(teachers=(bnfree_teacher_file,), steps=12, out=str(tmp_path / out), log_every=2,
                             eval_every=4, ckpt_every=4, image_every=4, fid_every=0, params=QUICK,
                             deterministic=True)  # bit-equal on a GPU too

    full = distill(cfg("full"))
    cls = get_method("fast")
    original, calls = cls.round, {"n": 0}

    def dying_round(self):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 4:
            raise SimulatedKill
        return original(self)

    monkeypatch.setattr(cls, "round", dying_round)
    with pytest.raises(SimulatedKill):
        distill(cfg("killed"))
    monkeypatch.setattr(cls, "round", original)
    resumed = resume(tmp_path / "killed")
    a = torch.load(full.run_dir / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed.run_dir / "student.pt", weights_only=True)["state_dict"]
    assert states_equal(a, b)
    assert load_model(resumed.run_dir / "student.pt")[1].provenance["method"] == "fast"


def test_a_setting_the_chosen_method_lacks_is_refused_naming_both(teacher_file: str, tmp_path: Path) -> None:
    cfg = DistillConfig(teachers=(teacher_file,), steps=2, out=str(tmp_path / "r"), params={"balance": 1.0})
    with pytest.raises(DfkdError, match=r"--method auto chose fast for this teacher .*balance.*name a method"):
        distill(cfg)
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_a_setting_no_candidate_takes_is_refused_before_loading(tmp_path: Path) -> None:
    with pytest.raises(DfkdError, match=r"-p: no method --method auto may choose .* \['lr_gg'\]"):
        build_config(None, ("lr_gg=1",), teachers=(str(tmp_path / "missing.pt"),))


def test_methods_lists_auto_and_shows_its_rule() -> None:
    out = CliRunner().invoke(main, ["methods"]).output
    assert out.splitlines()[0].startswith("auto ")
    rule = CliRunner().invoke(main, ["methods", "--params", "auto"]).output
    assert "1. BatchNorm, MNIST-kind inputs" in rule and "-> fast" in rule and "-> dfq" in rule
    assert "[default: auto]" in CliRunner().invoke(main, ["distill", "--help"]).output


def test_a_recipe_the_user_sets_under_auto_is_credited_to_the_user(bnfree_teacher_file: str, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["distill", "--teacher", bnfree_teacher_file, "--steps", "1", "--device", "cpu",
                                    "-p", "recipe=paper", "-p", "batch_size=8", "-p", "s_steps=1",
                                    "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "recipe: paper (set by recipe=paper)" in res.output and "set by --method auto" not in res.output
    choice = json.loads((tmp_path / "r" / "config.json").read_text())["auto_choice"]
    assert choice["recipe"] == "paper" and choice["recipe_by_auto"] is False


class TokenMixer(torch.nn.Module):
    """A BN-free 28 px classifier whose only mixing is torch's multi-head attention over 7x7 patches."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Conv2d(1, 16, 7, stride=7)
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.attn(tokens, tokens, tokens)[0].mean(1))


VIT = ["--teacher-arch", "timm:vit_tiny_patch16_224", "--arch-arg", "img_size=28", "--arch-arg", "patch_size=7",
       "--arch-arg", "in_chans=1", "--arch-arg", "embed_dim=16", "--arch-arg", "depth=1", "--arch-arg", "num_heads=2",
       "--channels", "1", "--input-size", "28", "--mean", "0.286", "--std", "0.353"]


def test_attention_is_seen_in_torch_timm_and_torchscript_teachers_and_not_in_cnns() -> None:
    from dfkd.auto import has_attention
    from dfkd.spec import InputSpec

    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1, embed_dim=16, depth=1,
                            num_heads=2, num_classes=10)
    scripted = torch.jit.script(TokenMixer())
    assert all(has_attention(m) for m in (TokenMixer(), vit, scripted))
    assert not any(has_attention(make_teacher_module(a)) for a in ("lenet5", "lenet5_bn"))
    spec = InputSpec(1, 28, (0.286,), (0.353,))
    prof = profile(Teacher(TokenMixer(), spec))
    assert prof.attention and not prof.bn and prof.kind == "mnist" and "attention layers" in prof.words()
    rule = choose(prof)
    assert (rule.method, rule.recipe, dict(rule.params)) == ("fast", "cpu", {"oh": 2.0, "g_steps": 10})
    assert choose(profile(tiny("lenet5"))).params == {}  # a CNN keeps fast's own settings
    for row in RULES:  # every row's settings are ones its method takes, in range
        check_method_params(row.method, row.settings())


def test_attention_is_seen_in_an_onnx_vit_and_not_in_an_onnx_cnn(tmp_path: Path) -> None:
    pytest.importorskip("onnx2torch")
    timm = pytest.importorskip("timm")
    from dfkd.auto import has_attention
    from dfkd.export import export_model
    from dfkd.spec import InputSpec

    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, embed_dim=16, depth=1,
                            num_heads=2, num_classes=10).eval()
    spec = InputSpec(1, 16, (0.5,), (0.5,))
    export_model(vit, spec, 10, "onnx", tmp_path / "vit.onnx")
    export_model(make_teacher_module("lenet5").eval(), MNIST_SPEC, 10, "onnx", tmp_path / "cnn.onnx")
    vit_t, cnn_t = load_teacher(tmp_path / "vit.onnx"), load_teacher(tmp_path / "cnn.onnx")
    assert isinstance(vit_t.module, torch.fx.GraphModule)  # the graph, not timm's modules
    assert has_attention(vit_t) and not has_attention(cnn_t)
    softmax_head = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Softmax(1)))
    assert not has_attention(softmax_head)  # a softmax at the output is not attention


def test_auto_sets_its_rows_settings_credits_itself_and_yields_to_the_users(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1, embed_dim=16, depth=1,
                            num_heads=2, num_classes=10)
    torch.save(vit.state_dict(), tmp_path / "vit.pt")

    def run(out: str, *params: str) -> tuple[str, dict]:
        flags = [f for p in ("synth_batch_size=8", "batch_size=8", "s_steps=1", *params) for f in ("-p", p)]
        res = CliRunner().invoke(main, ["distill", "--teacher", str(tmp_path / "vit.pt"), *VIT, "--steps", "1",
                                        "--device", "cpu", *flags, "--out", str(tmp_path / out)])
        assert res.exit_code == 0, res.output
        return res.output, json.loads((tmp_path / out / "config.json").read_text())

    out, config = run("a")
    assert "auto: chose fast (recipe cpu) with -p oh=2.0 -p g_steps=10: no BatchNorm, attention layers" in out
    assert "oh = 2.0 (paper: 0.4; set by --method auto)" in out
    assert "g_steps = 10 (paper: 5; set by --method auto)" in out
    assert config["params"]["oh"] == 2.0 and config["params"]["g_steps"] == 10
    assert config["auto_choice"]["set_by_auto"] == ["g_steps", "oh", "recipe"]
    again = CliRunner().invoke(main, ["distill", "--resume", str(tmp_path / "a"), "--steps", "2"])
    assert again.exit_code == 0, again.output  # a resumed run keeps the row's settings, still credited to auto
    assert f"resumed {tmp_path / 'a'} at step 1" in again.output
    assert "g_steps = 10 (paper: 5; set by --method auto)" in again.output, "the recipe lines again on resume"
    resumed = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    assert resumed["step"] == 2 and resumed["config"]["params"]["g_steps"] == 10
    assert resumed["config"]["auto_choice"]["set_by_auto"] == ["g_steps", "oh", "recipe"]
    out, config = run("b", "oh=1.0")  # the user's value wins, and is theirs
    assert "oh = 1.0 (paper: 0.4; set by you)" in out and config["params"]["g_steps"] == 10
    assert config["auto_choice"]["set_by_auto"] == ["g_steps", "recipe"]
    out, config = run("c", "recipe=paper")  # the paper's recipe: none of the row's settings
    assert config["params"]["g_steps"] == 5 and config["params"]["oh"] == 0.4
    assert config["auto_choice"]["set_by_auto"] == [] and "set by --method auto" not in out


def test_a_run_recorded_before_rows_set_settings_still_credits_its_recipe() -> None:
    from dfkd.auto import set_by_auto

    assert set_by_auto({"method": "fast", "recipe": "cpu", "recipe_by_auto": True}) == ("recipe",)
    assert set_by_auto({"method": "fast", "recipe": "paper", "recipe_by_auto": False}) == ()
    assert set_by_auto(None) == ()


def test_methods_params_auto_with_a_teacher_shows_its_row_and_defaults(bnfree_teacher_file: str,
                                                                       tmp_path: Path) -> None:
    # the teacher (and every teacher option) was ignored: the rule table alone, even for a file that does not exist
    rule = choose(profile(load_teacher(bnfree_teacher_file)))
    res = CliRunner().invoke(main, ["methods", "--params", "auto", "--teacher", bnfree_teacher_file])
    assert res.exit_code == 0, res.output
    assert f"for --teacher {bnfree_teacher_file}: {rule.method}" in res.output and rule.when in res.output
    assert f"defaults for --teacher {bnfree_teacher_file}:" in res.output and "student network:" in res.output
    missing = CliRunner().invoke(main, ["methods", "--params", "auto", "--teacher", str(tmp_path / "no.pt")])
    assert missing.exit_code == 2 and "no such file" in missing.output
    alone = CliRunner().invoke(main, ["methods", "--params", "auto", "--recipe", "cpu"])
    assert alone.exit_code == 2 and "the recipe is the teacher's row's; give --teacher" in alone.output
