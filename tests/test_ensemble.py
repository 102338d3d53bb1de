"""Several teachers as one: weighted logits against hand values, BN paths of every member, refusals, a CLI run."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from dfkd.bnstats import BNInputs
from dfkd.cli.main import main
from dfkd.ensemble import EnsembleTeacher, load_teachers, repeated_teacher
from dfkd.errors import DfkdError
from dfkd.methods import get_method
from dfkd.modelfile import ModelFile, load_model, save_model
from dfkd.spec import MNIST_SPEC, InputSpec
from dfkd.students import build_student
from dfkd.teacher import Teacher
from tests.conftest import KWARGS, make_teacher_module

A = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
B = np.array([[0.0, 0.0, 4.0], [1.0, 1.0, 1.0]])


class Fixed(nn.Module):
    """Answers fixed logits whatever the image (row i % 2 for sample i, so any batch size works)."""

    def __init__(self, logits: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits, dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.logits[torch.arange(len(x), device=x.device) % len(self.logits)]
        return self.scale * rows + 0 * x.flatten(1).sum(1, keepdim=True)


def fixed_pair(**kw) -> EnsembleTeacher:
    spec = InputSpec(1, 16, (0.5,), (0.5,))
    return EnsembleTeacher([Teacher(Fixed(A), spec, source="a.pt"), Teacher(Fixed(B), spec, source="b.pt")], **kw)


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_mean_of_logits_hand_value():
    out = fixed_pair()(torch.zeros(2, 1, 16, 16))
    assert np.allclose(out.numpy(), [[1.0, 0.0, 2.0], [0.5, 1.0, 0.5]])


def test_fixed_weights_hand_value():
    out = fixed_pair(weights=[3, 1])(torch.zeros(2, 1, 16, 16))
    assert np.allclose(out.numpy(), 0.75 * A + 0.25 * B)


def test_confidence_weighting_hand_value():
    out = fixed_pair(weights=[1, 1], weighting="confidence")(torch.zeros(2, 1, 16, 16)).numpy()
    ca, cb = _softmax(A).max(1), _softmax(B).max(1)  # per-sample confidence of each teacher
    wa = ca / (ca + cb)
    expected = wa[:, None] * A + (1 - wa[:, None]) * B
    assert np.allclose(out, expected, atol=1e-6)
    # Sample 1: teacher B is uniform (confidence 1/3), so A, more confident, dominates.
    assert wa[1] > 0.5 and not np.allclose(out, (A + B) / 2)


def two_archs() -> tuple[Teacher, Teacher]:
    a = Teacher(make_teacher_module("lenet5_bn", seed=0), MNIST_SPEC, source="a.pt", arch="lenet5_bn")
    b = Teacher(make_teacher_module("lenet5_half_bn", seed=1), MNIST_SPEC, source="b.pt", arch="lenet5_half_bn")
    return a, b


def test_real_teachers_average_and_stay_frozen():
    a, b = two_archs()
    e = EnsembleTeacher([a, b])
    x = torch.randn(4, 1, 32, 32)
    assert torch.allclose(e(x), (a(x) + b(x)) / 2, atol=1e-6)
    e.train()
    assert all(not p.requires_grad for p in e.parameters())
    assert e.num_classes == 10 and e.arch == "lenet5_bn" and e.source == "a.pt + b.pt"
    logits, feats = e.forward_with_features(x)
    assert torch.allclose(logits, e(x), atol=1e-6) and torch.equal(feats, a.forward_with_features(x)[1])


def test_bn_paths_of_every_teacher_and_bn_matching_over_all():
    a, b = two_archs()
    e = EnsembleTeacher([a, b])
    assert e.bn_paths() == [f"t0.{p}" for p in a.bn_paths()] + [f"t1.{p}" for p in b.bn_paths()]
    assert len(e.bn_paths()) == 6
    bn = BNInputs(e, "dfq")
    bn.set_active(True)
    e(torch.randn(4, 1, 32, 32))
    layers = bn.layers()
    assert len(layers) == 6
    assert layers[3][0].shape[1] == b.module_at(b.bn_paths()[0]).num_features  # t1's first BN, its own width
    bn.close()
    assert e.stage_paths() == ["t0.stage1", "t0.stage2", "t0.stage3"] and e.penultimate_path() == "t0.classifier"
    # a member without BatchNorm was warned of alone and said nothing beside another (an ONNX export folds it)
    plain = Teacher(make_teacher_module("lenet5", seed=2), MNIST_SPEC, source="plain.pt", arch="lenet5")
    with pytest.warns(UserWarning, match="dfq: the teacher plain.pt offers no BatchNorm statistics .* the other "
                                         "teachers' layers only"):
        BNInputs(EnsembleTeacher([a, plain]), "dfq").close()


def test_other_normalisation_is_converted():
    a, _ = two_archs()
    other = InputSpec(1, 32, (0.5,), (0.25,))
    module = make_teacher_module("lenet5_half_bn", seed=1)
    b = Teacher(module, other, source="b.pt")
    x = torch.randn(2, 1, 32, 32)  # normalised as a's spec says
    expected_b = module(other.normalize(MNIST_SPEC.denormalize(x)))
    assert torch.allclose(EnsembleTeacher([a, b])(x), (a(x) + expected_b) / 2, atol=1e-5)


def test_mismatched_classes_or_shape_is_refused_naming_both_files():
    a, _ = two_archs()
    torch.manual_seed(0)
    five = Teacher(nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 5)), MNIST_SPEC, source="five.pt")
    with pytest.raises(DfkdError, match=r"a\.pt has 10 classes but --teacher five\.pt has 5"):
        EnsembleTeacher([a, five])
    small = Teacher(nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)), InputSpec(1, 28, (0.1,), (0.3,)),
                    source="small.pt")
    with pytest.raises(DfkdError, match=r"a\.pt takes 1x32x32 .* small\.pt takes 1x28x28"):
        EnsembleTeacher([a, small])


def test_bad_weights_are_refused():
    with pytest.raises(DfkdError, match="give 2 non-negative weights"):
        fixed_pair(weights=[1, 2, 3])
    with pytest.raises(DfkdError, match="confidence"):
        fixed_pair(weighting="vote")


def test_a_method_distills_from_two_teachers_with_bn_over_both():
    torch.manual_seed(0)
    e = EnsembleTeacher(list(two_archs()))
    cls = get_method("dfq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = cls(e, build_student("lenet5_half", KWARGS), {**cls.default_params(e), **cls.quick,
                                                          "feature_loss": "at"}, torch.device("cpu"))
    logs = m.round()
    assert np.isfinite(list(logs.values())).all() and "student/at" in logs
    assert len(m.bn.paths) == 6
    assert all(p.grad is None for p in e.parameters())
    m.close()


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("teachers")
    save_model(d / "a.pt", make_teacher_module("lenet5_bn", 0), ModelFile("lenet5_bn", KWARGS, MNIST_SPEC, 10))
    save_model(d / "b.pt", make_teacher_module("lenet5_half_bn", 1),
               ModelFile("lenet5_half_bn", KWARGS, MNIST_SPEC, 10))
    return str(d / "a.pt"), str(d / "b.pt")


def test_a_teacher_given_twice_is_said_when_the_run_starts(teacher_files: tuple[str, str], tmp_path: Path):
    # accepted without a word: each step cost twice as much for the same answers; its resume, which cannot drop the
    # repeat, is not told again
    a = teacher_files[0]
    copy = tmp_path / "copy.pt"
    copy.write_bytes(Path(a).read_bytes())
    members = [load_teachers([p]) for p in (a, teacher_files[1], str(copy))]
    assert repeated_teacher([a, a], members[:1] * 2).startswith(f"--teacher {a} is given twice: the ensemble counts")
    assert repeated_teacher([a, teacher_files[1], str(copy)], members).startswith(
        f"--teacher {copy} is a copy of --teacher {a} (the same sha256): ")
    assert repeated_teacher(teacher_files, members[:2]) is None
    args = ["--method", "dfad", "-p", "batch_size=8", "-p", "s_steps=1", "--fid-every", "0"]
    with pytest.warns(UserWarning, match=f"^--teacher {a} is given twice"):
        r = CliRunner().invoke(main, ["distill", "--teacher", a, "--teacher", a, "--steps", "2", *args, "--out",
                                      str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = CliRunner().invoke(main, ["distill", "--resume", str(tmp_path / "r"), "--steps", "3"])
    assert r.exit_code == 0 and not [w for w in caught if "twice" in str(w.message)], r.output


def test_load_teachers_one_or_several(teacher_files: tuple[str, str]):
    assert not isinstance(load_teachers(teacher_files[:1]), EnsembleTeacher)
    with pytest.raises(DfkdError, match="one per --teacher"):  # two weights for one teacher were taken silently
        load_teachers(teacher_files[:1], weights=[2, 1])
    e = load_teachers(teacher_files, weights=[1, 3], weighting="confidence")
    assert isinstance(e, EnsembleTeacher) and e.member_weights == [0.25, 0.75] and e.weighting == "confidence"
    assert e.sha256.count(",") == 1


def test_an_architecture_flag_no_file_uses_is_named_in_a_warning(teacher_files: tuple[str, str], tmp_path: Path):
    """dfkd model files bring their network: --teacher-arch/--arch-arg are ignored for them, and the user is told."""
    with pytest.warns(UserWarning, match=r"--teacher-arch resnet18 --arch-arg width=2 not used: .*a\.pt is a dfkd "
                                         r"model file of lenet5_bn.*b\.pt is a dfkd model file of lenet5_half_bn, each "
                                         r"bringing its own network"):
        load_teachers(teacher_files, arch="resnet18", arch_args={"width": 2})
    module = load_model(teacher_files[0])[0]
    torch.save(module.state_dict(), tmp_path / "sd.pt")
    with warnings.catch_warnings():  # a plain state_dict among the teachers uses the flag: no warning
        warnings.simplefilter("error")
        load_teachers([teacher_files[0], str(tmp_path / "sd.pt")], arch="lenet5_bn", spec=MNIST_SPEC)


def test_cli_two_teachers_with_objective_flags(teacher_files: tuple[str, str], tmp_path: Path):
    out = tmp_path / "run"
    args = ["distill", "--teacher", teacher_files[0], "--teacher", teacher_files[1], "--method", "dfad",
            "--steps", "10", "--feature-loss", "rkd", "--feature-loss", "sp", "--discriminator", "logits",
            "--disc-weight", "0.5", "-p", "batch_size=8", "-p", "s_steps=1", "-p", "teacher_weights=[2, 1]",
            "--fid-every", "0", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    params = json.loads((out / "config.json").read_text())["params"]
    assert params["feature_loss"] == ["rkd", "sp"] and params["discriminator"] == "logits"
    assert params["disc_weight"] == 0.5 and params["teacher_weights"] == [2, 1]
    _, meta = load_model(out / "student.pt")
    assert meta.provenance["teacher"] == " + ".join(teacher_files)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/student/rkd_angle" in r and "loss/student/disc_d" in r for r in records)


def test_an_ensemble_whose_teacher_moved_resumes_with_that_file_alone(teacher_files: tuple[str, str],
                                                                      tmp_path: Path):
    # the stop message says "give its new place with --teacher FILE": for an ensemble that was refused ("its sha256
    # differs", of the very file), as were the teachers in another order
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(Path(teacher_files[0]).read_bytes())
    b.write_bytes(Path(teacher_files[1]).read_bytes())
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["distill", "--teacher", str(a), "--teacher", str(b), "--method", "dfad", "--steps",
                                  "2", "-p", "batch_size=8", "-p", "s_steps=1", "--fid-every", "0", "--out", str(out)])
    assert r.exit_code == 0, r.output
    moved = b.rename(tmp_path / "b2.pt")
    r = CliRunner().invoke(main, ["distill", "--resume", str(out), "--steps", "3", "--teacher", str(a)])
    assert r.exit_code == 2 and f"the run's teacher {b} is not where it was nor a --teacher given" in r.output
    r = CliRunner().invoke(main, ["distill", "--resume", str(out), "--steps", "3", "--teacher", str(moved)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["teachers"] == [str(a), str(moved)]
    r = CliRunner().invoke(main, ["distill", "--resume", str(out), "--steps", "4", "--teacher", str(moved),
                                  "--teacher", str(a)])
    assert r.exit_code == 0, r.output  # any order: the run keeps its own
    assert json.loads((out / "config.json").read_text())["teachers"] == [str(a), str(moved)]
    r = CliRunner().invoke(main, ["report", str(out)])
    assert f"teacher: {a} + {moved}" in r.output  # it named the first alone


def test_a_first_teacher_without_hooks_leaves_the_others_bn_layers_to_the_fid(teacher_files: tuple[str, str],
                                                                               tmp_path: Path):
    # a TorchScript first teacher made the ensemble unhookable: the BN-FID over the second one's BatchNorm layers
    # failed after the whole budget ("has no module hooks ... to use feature-based losses"), and so did --resume
    script = tmp_path / "a_ts.pt"
    r = CliRunner().invoke(main, ["export", teacher_files[0], "--format", "torchscript", "--out", str(script)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["distill", "--teacher", str(script), "--teacher", teacher_files[1], "--method",
                                  "dfad", "--steps", "3", "-p", "batch_size=8", "-p", "s_steps=1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert (out / "student.pt").is_file() and any("fid/bn" in rec for rec in records)
    e = load_teachers([str(script), teacher_files[1]])
    assert e.bn_paths() and all(p.startswith("t1.") for p in e.bn_paths())
    with pytest.raises(DfkdError, match="a_ts.pt has no module hooks"):
        e.tap(["t0.anything"])


def test_the_spec_flags_of_an_ensemble_leave_a_files_own_normalisation(teacher_files: tuple[str, str],
                                                                       tmp_path: Path):
    # the flags a state_dict member needs replaced a dfkd file member's normalisation, unsaid (the CIFAR-10
    # WRN-16-1 at --mean 0 --std 1 answered 30.75 % of its test set, 81.03 % with its own)
    torch.save(load_model(teacher_files[1])[0].state_dict(), tmp_path / "sd.pt")
    flags = InputSpec(1, 32, (0.0,), (1.0,))
    e = load_teachers([teacher_files[0], str(tmp_path / "sd.pt")], arch="lenet5_half_bn", spec=flags,
                      weights=[1, 0])
    assert e.members[0].spec == MNIST_SPEC and e.members[1].spec == flags
    # the flags were then dropped unsaid
    with pytest.warns(UserWarning, match=r"a.pt: keeps the normalisation the file declares .* --mean/--std are for the "
                                         r"teachers of the ensemble that declare none"):
        load_teachers([teacher_files[0], str(tmp_path / "sd.pt")], arch="lenet5_half_bn", spec=flags)
    # an archive of `dfkd export` declares its spec too: the flags replaced it without a word (26 % for 99.6 %)
    r = CliRunner().invoke(main, ["export", teacher_files[0], "--format", "torchscript", "--out",
                                  str(tmp_path / "ts.pt")])
    assert r.exit_code == 0, r.output
    exported = load_teachers([str(tmp_path / "ts.pt"), str(tmp_path / "sd.pt")], arch="lenet5_half_bn", spec=flags)
    assert exported.members[0].spec == MNIST_SPEC
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(e(x), load_teachers([teacher_files[0]])(x), atol=1e-5)
    # one file given other numbers still takes them (the flags' meaning), and is told so
    with pytest.warns(UserWarning, match=r"declares the normalisation mean \[0.1307\] std \[0.3081\]; --mean/--std "
                                         r"make it mean \[0\] std \[1\]"):
        assert load_teachers([teacher_files[0]], spec=flags).spec == flags
    with warnings.catch_warnings():  # its own values as people type them (4 decimals) are its own
        warnings.simplefilter("error")
        load_teachers([teacher_files[0]], spec=InputSpec(1, 32, (0.13072,), (0.30809,)))


def test_teachers_that_name_their_classes_otherwise_are_refused(teacher_files: tuple[str, str], tmp_path: Path):
    # the same ten digits named in opposite orders were averaged logit by logit: 71.95 % where each was 99 %
    module, meta = load_model(teacher_files[0])
    names = [str(i) for i in range(10)]
    save_model(tmp_path / "a.pt", module, dataclasses.replace(meta, class_names=names))
    save_model(tmp_path / "b.pt", module, dataclasses.replace(meta, class_names=names[::-1]))
    with pytest.raises(DfkdError, match=r"names them \['9', '8'.* in another order; the ensemble averages logit k"):
        load_teachers([str(tmp_path / "a.pt"), str(tmp_path / "b.pt")])
    assert isinstance(load_teachers([str(tmp_path / "a.pt"), str(tmp_path / "a.pt")]), EnsembleTeacher)
    # a first teacher without names: the others were compared with it alone, so any two orders passed
    with pytest.raises(DfkdError, match="in another order"):
        load_teachers([teacher_files[0], str(tmp_path / "a.pt"), str(tmp_path / "b.pt")])
    assert load_teachers([teacher_files[0], str(tmp_path / "a.pt")]).class_names == names  # the student's names


def test_state_dicts_of_two_architectures_are_told_to_convert_first(teacher_files: tuple[str, str], tmp_path: Path):
    # "check the architecture name": no name could fit both, since one --teacher-arch serves every teacher
    for i, f in enumerate(teacher_files):
        torch.save(load_model(f)[0].state_dict(), tmp_path / f"sd{i}.pt")
    with pytest.raises(DfkdError, match=r"sd1.pt with --teacher-arch lenet5_bn.*; in an ensemble one --teacher-arch "
                                        r".* convert state_dicts of other architectures .* \(dfkd convert"):
        load_teachers([str(tmp_path / "sd0.pt"), str(tmp_path / "sd1.pt")], arch="lenet5_bn", spec=MNIST_SPEC)
