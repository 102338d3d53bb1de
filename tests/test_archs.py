"""Architectures by name: torchvision:, timm:, module:callable, --arch-arg, classes from the state_dict, spec flags."""

from __future__ import annotations

import json
import sys
import uuid
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

from dfkd import DfkdError, InputSpec, ModelFile, load_teacher, save_model
from dfkd.archs import arch_kind, build_model, class_candidates, flag_spec, parse_arch_args
from dfkd.config import DistillConfig, build_config
from dfkd.engine import distill, resume
from dfkd.modelfile import load_model

SPEC32 = InputSpec(3, 32, (0.5,), (0.25,))
DEMO = str(Path(__file__).resolve().parents[1] / "examples" / "mnist_lenet5.pt")

USER_CODE = '''
import os  # what a file's name must not reach through the module (os.system)

from torch import nn


def build(width, num_classes=10):
    """A factory function with a required argument."""
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class Wide(nn.Module):
    def __init__(self, width, num_classes):
        super().__init__()
        self.body = build(width, num_classes)

    def forward(self, x):
        return self.body(x)
'''


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    name = f"userarch_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(USER_CODE)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def _tv_state(tmp_path, classes=10):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=classes).eval()
    path = tmp_path / "tv.pt"
    torch.save(model.state_dict(), path)
    return model, path


def _same(t, model, shape=(2, 3, 32, 32)):
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.allclose(t(x), model(x), atol=1e-5)


def test_arch_kind_and_arch_args():
    assert [arch_kind(a) for a in ("resnet18", "torchvision:resnet18", "timm:resnet18", "my.mod:build")] == \
        ["zoo", "torchvision", "timm", "module"]
    assert parse_arch_args(["width=4", "name=wide", "dims=[1, 2]", "bn=true"]) == \
        {"width": 4, "name": "wide", "dims": [1, 2], "bn": True}
    with pytest.raises(DfkdError, match="--arch-arg 'width'.*KEY=VALUE"):
        parse_arch_args(["width"])


def test_classes_from_the_classifier():
    state = torchvision.models.resnet18(weights=None, num_classes=7).state_dict()
    assert class_candidates(state)[0] == 7
    sorted_names = dict(sorted(state.items()))  # as a safetensors file gives them: "fc" after "bn1", before "layer"
    assert 7 in class_candidates(sorted_names)
    assert class_candidates({"w": torch.zeros(3)}) == []


def test_classes_from_a_pointwise_convolution_classifier(tmp_path):
    # SqueezeNet classifies with a 1x1 convolution and has no 2-D weight: it was built for 1000 classes and refused
    model = torchvision.models.squeezenet1_1(weights=None, num_classes=10).eval()
    path = tmp_path / "squeeze.pt"
    torch.save(model.state_dict(), path)
    t = load_teacher(path, arch="torchvision:squeezenet1_1", spec=InputSpec(3, 64, (0.5,) * 3, (0.25,) * 3))
    assert t.num_classes == 10 and t.arch_kwargs == {"num_classes": 10}


def test_googlenet_as_teacher_and_student(tmp_path):
    # a GoogLeNet fine-tuned without its auxiliary heads was refused with 600 characters of missing aux keys; its
    # ImageNet-born transform_input went unsaid; as a student its training-mode named tuple crashed the run
    model = torchvision.models.googlenet(weights=None, num_classes=5, aux_logits=False, init_weights=True).eval()
    path = tmp_path / "gn.pt"
    torch.save(model.state_dict(), path)
    spec = InputSpec(3, 64, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(DfkdError, match="the file has no auxiliary heads .*: give --arch-arg aux_logits=false"):
        load_teacher(path, arch="torchvision:googlenet", spec=spec)
    with pytest.warns(UserWarning, match="transform_input=True.*add --arch-arg transform_input=true"):
        t = load_teacher(path, arch="torchvision:googlenet", arch_args={"aux_logits": False}, spec=spec)
    _same(t, model)
    student = build_model("torchvision:googlenet", {"num_classes": 5}, flag="--student").train()
    assert torch.is_tensor(student(torch.zeros(2, 3, 64, 64)))


def test_torchvision_state_dict_with_inferred_classes(tmp_path):
    model, path = _tv_state(tmp_path, classes=7)
    t = load_teacher(path, arch="torchvision:resnet18", spec=SPEC32)
    assert t.num_classes == 7 and t.arch == "torchvision:resnet18" and t.arch_kwargs == {"num_classes": 7}
    assert t.stage_paths() == ["layer1", "layer2", "layer3", "layer4"] and t.penultimate_path() == "fc"
    _same(t, model)
    # torchvision's factory by module path is the same thing, recorded under the name a model file accepts
    assert load_teacher(path, arch="torchvision.models:resnet18", spec=SPEC32).arch == "torchvision:resnet18"


def test_library_models_never_download(tmp_path, monkeypatch):
    _, path = _tv_state(tmp_path)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(DfkdError, match="weights come from your file"):
        load_teacher(path, arch="torchvision:resnet18", spec=SPEC32, arch_args={"weights": "DEFAULT"})
    with pytest.raises(DfkdError, match="'pretrained'"):
        build_model("timm:resnet18", {"pretrained": True})
    assert build_model("torchvision:resnet18", {"num_classes": 3}).fc.out_features == 3


def test_unknown_library_names_suggest_close_ones():
    with pytest.raises(DfkdError, match="torchvision:resnt18: not a torchvision classification model.*resnet18"):
        build_model("torchvision:resnt18", {})
    pytest.importorskip("timm")
    with pytest.raises(DfkdError, match="timm:resnet_18: not a timm model"):
        build_model("timm:resnet_18", {})


def test_missing_timm_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(DfkdError, match=r'timm is not installed; install it with pip install -e "\.\[timm\]"'):
        build_model("timm:resnet18", {})


def test_timm_spec_from_its_pretrained_config(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model("test_resnet", pretrained=False, num_classes=4).eval()
    torch.save(model.state_dict(), tmp_path / "t.pt")
    with pytest.warns(UserWarning, match="timm's pretrained config"):
        t = load_teacher(tmp_path / "t.pt", arch="timm:test_resnet")
    assert (t.spec.channels, t.spec.size, t.spec.mean) == (3, 160, (0.5, 0.5, 0.5)) and t.num_classes == 4
    with pytest.warns(UserWarning, match="--mean/--std not given"):  # size from the flags, normalisation from timm
        assert flag_spec(3, 32, (), (), "timm:test_resnet") == InputSpec(3, 32, (0.5,), (0.5,))
    # --mean/--std alone: the shape from timm's config, unsaid (a model fine-tuned at 96 px ran at 160 here)
    with pytest.warns(UserWarning, match=r"--channels/--input-size not given; using timm's pretrained config "
                                         r"\(3x160x160\); pass --channels and --input-size"):
        assert flag_spec(None, None, (0.4,), (0.2,), "timm:test_resnet") == InputSpec(3, 160, (0.4,), (0.2,))


def test_spec_flags_never_default_to_zero_and_one():
    assert flag_spec(None, None, (), ()) is None
    with pytest.raises(DfkdError, match="without --mean/--std.*--mean 0 --std 1"):
        flag_spec(3, 32, (), ())
    with pytest.raises(DfkdError, match="--mean/--std without --channels and --input-size: the input flags go "
                                        "together.*add --channels and --input-size"):
        flag_spec(None, None, (0.5,), (0.2,))
    with pytest.raises(DfkdError, match="--input-size without --channels: .*add --channels"):
        flag_spec(None, 300, (), ())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert flag_spec(1, 28, (0.0,), (1.0,)) == InputSpec(1, 28, (0.0,), (1.0,))


@pytest.mark.parametrize("channels, size", [(1, 100_000), (100_000, 32)])
def test_a_spec_no_probe_batch_fits_in_memory_is_refused(channels, size):
    # 100,000 px a side: the teacher's probe batch alone would be 120 GB (it was a MemoryError traceback)
    with pytest.raises(DfkdError, match=f"--channels {channels} --input-size {size}: .*at most 512 channels and "
                                        "4096 px a side"):
        flag_spec(channels, size, (0.5,), (0.2,))
    assert flag_spec(3, 4096, (0.5,), (0.2,)).size == 4096


def test_user_factory_function_with_arch_args(tmp_path, user_code):
    torch.manual_seed(0)
    model = build_model(f"{user_code}:build", {"width": 4, "num_classes": 6}).eval()
    torch.save(model.state_dict(), tmp_path / "u.pt")
    t = load_teacher(tmp_path / "u.pt", arch=f"{user_code}:build", spec=SPEC32, arch_args={"width": 4})
    assert t.num_classes == 6 and t.arch_kwargs == {"width": 4, "num_classes": 6}
    _same(t, model)
    with pytest.raises(DfkdError, match="could not build it.*width"):  # the required argument is missing
        load_teacher(tmp_path / "u.pt", arch=f"{user_code}:build", spec=SPEC32)
    with pytest.raises(DfkdError, match="do not fit"):  # a class taking the same arguments: its weights are body.*
        load_teacher(tmp_path / "u.pt", arch=f"{user_code}:Wide", spec=SPEC32, arch_args={"width": 4})


def test_model_file_rebuilds_library_and_user_architectures(tmp_path, user_code):
    model = build_model(f"{user_code}:Wide", {"width": 4, "num_classes": 6}).eval()
    save_model(tmp_path / "m.pt", model, ModelFile(f"{user_code}:Wide", {"width": 4, "num_classes": 6}, SPEC32, 6))
    loaded, meta = load_model(tmp_path / "m.pt")
    _same(loaded, model)
    tv = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    save_model(tmp_path / "tv.pt", tv, ModelFile("torchvision:resnet18", {"num_classes": 3}, SPEC32, 3))
    assert torch.load(tmp_path / "tv.pt", weights_only=True)["version"] == 2
    _same(load_model(tmp_path / "tv.pt")[0], tv)


@pytest.mark.parametrize("target", ["os:system", "subprocess:run", "pathlib:Path.touch"])
def test_a_model_file_cannot_make_dfkd_call_any_function(tmp_path, target):
    path = tmp_path / "evil.pt"
    payload = {"format": "dfkd-model", "version": 2, "arch": target, "arch_kwargs": {"args": "touch pwned"},
               "input_spec": SPEC32.to_dict(), "num_classes": 10, "state_dict": {}}
    torch.save(payload, path)
    with pytest.raises(DfkdError, match="not a function of"):
        load_model(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("target, kwargs", [("dfkd.io:os.system", {"command": "touch pwned"}),
                                            ("USER:os.system", {"command": "touch pwned"}),
                                            ("dfkd.io:atomic_write_text", {"path": "pwned", "text": "x"})])
def test_a_model_file_cannot_reach_a_function_through_a_module_or_call_dfkds(tmp_path, user_code, target, kwargs):
    """The function's own module counts, not the one the name starts from; dfkd's own are not the user's code
    (an editable install lies outside site-packages). Both ran the command before."""
    target = target.replace("USER", user_code)
    payload = {"format": "dfkd-model", "version": 2, "arch": target, "arch_kwargs": kwargs,
               "input_spec": SPEC32.to_dict(), "num_classes": 10, "state_dict": {}}
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(DfkdError, match="a file may name an nn.Module class or a factory function of your own code"):
        load_model(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
    model = build_model(f"{user_code}:build", {"width": 4, "num_classes": 6})  # the user's own factory still is
    save_model(tmp_path / "own.pt", model, ModelFile(f"{user_code}:build", {"width": 4, "num_classes": 6}, SPEC32, 6))
    _same(load_model(tmp_path / "own.pt")[0], model)


@pytest.mark.parametrize("key", ["teacher_arch", "student"])
def test_a_config_file_cannot_make_dfkd_call_any_function(tmp_path, key):

    pwned = tmp_path / "pwned"
    args = {"teacher_arch": "arch_args", "student": "student_args"}[key]
    config = tmp_path / "evil.json"
    config.write_text(json.dumps({key: "os:system", args: {"command": f"touch {pwned}"}}))
    with pytest.raises(DfkdError, match=f"--config {config}: {key} os:system: a file may name an nn.Module class"):
        build_config(str(config), teachers=(DEMO,))
    assert not pwned.exists()
    # typed on the command line it is the user's choice (and fails later, as not an nn.Module, after running)
    flag = {"teacher_arch": "os:getcwd", "student": "os:getcwd"}[key]
    assert getattr(build_config(str(config), teachers=(DEMO,), **{key: flag}), key) == flag


def test_a_config_that_is_a_folder_is_named_so(tmp_path):

    with pytest.raises(DfkdError, match=f"--config {tmp_path}: is a folder"):  # it said "no such file"
        build_config(str(tmp_path), teachers=(DEMO,))


def test_a_method_setting_at_a_configs_top_level_is_pointed_to_params(tmp_path):

    (tmp_path / "c.toml").write_text("batch_size = 8\nsteps = 3\n")
    with pytest.raises(DfkdError, match=r"unknown setting\(s\) \['batch_size'\]; method settings such as batch_size "
                                        r"go under params"):
        build_config(str(tmp_path / "c.toml"), teachers=(DEMO,))
    (tmp_path / "c.toml").write_text("steps = 3\n[params]\nbatch_size = 8\n")
    assert build_config(str(tmp_path / "c.toml"), teachers=(DEMO,)).params == {"batch_size": 8}
    (tmp_path / "c.toml").write_text("stepz = 3\n")
    with pytest.raises(DfkdError, match=r"unknown setting\(s\) \['stepz'\]; known"):  # no hint where none fits
        build_config(str(tmp_path / "c.toml"), teachers=(DEMO,))


def test_a_run_folder_cannot_make_a_resume_call_any_function(tmp_path):

    run = distill(DistillConfig(teachers=(DEMO,), method="dfad", steps=2, out=str(tmp_path / "r"), fid_every=0,
                                params={"batch_size": 8, "s_steps": 1})).run_dir
    pwned = tmp_path / "pwned"
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["config"].update(teacher_arch="os:system", arch_args={"command": f"touch {pwned}"})
    torch.save(ckpt, run / "checkpoint.pt")
    with pytest.raises(DfkdError, match=f"{run}/checkpoint.pt: teacher_arch os:system: a file may name"):
        resume(run, steps=4)
    assert not pwned.exists()
