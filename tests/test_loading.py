"""`dfkd.load_teacher`: every supported file format, every way a file can be wrong, and the pickle gate."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import uuid
import warnings
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

import dfkd
from dfkd import DfkdError, InputSpec, ModelFile, load_teacher, save_model
from dfkd.perimage import PerImage
from dfkd.teacher_options import TeacherOptions

SPEC = InputSpec(1, 32, (0.1307,), (0.3081,))
KWARGS = {"num_classes": 10, "in_channels": 1, "input_size": 32}
# TorchScript is deprecated in torch 2.x, yet users still hold such files: loading them is part of the product.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")

USER_MODULE = '''
import torch
from torch import nn


class Net(nn.Module):
    """A user's classifier with a fixed input size (16x16 grey images) and 5 classes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 16 * 16, 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))
'''


class ScriptableNet(nn.Module):
    """Small enough for `torch.jit.script`; with BatchNorm, so its missing hooks show."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class Evil:
    """Unpickling it runs `fn(*args)`: the malicious-file stand-in."""

    def __init__(self, fn, args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Two OpenMP threads on a busy two-core machine spin against each other (tens of times slower); one suffices.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _zoo(name: str = "lenet5_bn") -> nn.Module:
    torch.manual_seed(0)
    return dfkd.create_model(name, **KWARGS).eval()


def _same_outputs(teacher: dfkd.Teacher, model: nn.Module, shape=(3, 1, 32, 32)) -> None:
    x = torch.randn(shape)
    with torch.no_grad():
        a, b = teacher(x), model(x)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()


def _error(path, **kw) -> str:
    with pytest.raises(DfkdError) as e:
        load_teacher(path, **kw)
    return str(e.value)


# ---------------------------------------------------------------------------------------------- formats that load


@pytest.mark.parametrize("arrays, says", [({"x": np.zeros((2, 8, 8), np.uint8), "probs": np.ones((2, 1))},
                                           "is a transfer file (dfkd synthesize): train from it with dfkd distill "
                                           "--transfer-data"),
                                          ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.zeros(2, np.int64)},
                                           "is an .npz of arrays (x, y): data, not a model")])
def test_an_npz_given_as_a_model_is_named_for_what_it_is(tmp_path, arrays, says):
    # export and quantize of a transfer file said "not a readable PyTorch file ... truncated or corrupt?"
    np.savez(tmp_path / "t.npz", **arrays)
    with pytest.raises(DfkdError, match=re.escape(f"--teacher {tmp_path / 't.npz'}: {says}") + "$"):
        load_teacher(tmp_path / "t.npz")


def test_dfkd_model_file(tmp_path):
    model, path = _zoo(), tmp_path / "t.pt"
    save_model(path, model, ModelFile("lenet5_bn", dict(KWARGS), SPEC, 10, class_names=list("abcdefghij")))
    t = load_teacher(path)
    assert t.fmt == "dfkd" and t.spec == SPEC and t.num_classes == 10
    assert t.arch == "lenet5_bn" and t.arch_kwargs == KWARGS and t.class_names == list("abcdefghij")
    assert len(t.sha256) == 64 and t.source == str(path)
    _same_outputs(t, model)


def test_flags_override_the_file_spec(tmp_path):
    path = tmp_path / "t.pt"
    save_model(path, _zoo(), ModelFile("lenet5_bn", dict(KWARGS), SPEC, 10))
    other = InputSpec(1, 32, (0.5,), (0.25,))
    assert load_teacher(path, spec=other).spec == other


def test_state_dict_with_zoo_arch(tmp_path):
    model, path = _zoo(), tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    t = load_teacher(path, arch="lenet5_bn", spec=SPEC)
    assert t.fmt == "state_dict" and t.arch == "lenet5_bn" and t.num_classes == 10
    _same_outputs(t, model)


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict"])
def test_wrapped_state_dict(tmp_path, key):
    model, path = _zoo(), tmp_path / "ckpt.pt"
    torch.save({"epoch": 7, key: model.state_dict(), "best_acc": 0.99}, path)
    _same_outputs(load_teacher(path, arch="lenet5_bn", spec=SPEC), model)


def test_data_parallel_prefix_is_dropped(tmp_path):
    model, path = _zoo(), tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    _same_outputs(load_teacher(path, arch="lenet5_bn", spec=SPEC), model)


def _lenet5_of_7_classes() -> nn.Module:
    torch.manual_seed(0)
    return dfkd.create_model("lenet5", **{**KWARGS, "num_classes": 7}).eval()


@pytest.mark.parametrize("name", ["weights.safetensors", "weights.pt"])
def test_safetensors_state_dict_with_its_names_sorted(tmp_path, name):
    # safetensors (timm's and Hugging Face's format) sorts the names: classifier.weight (7 classes) comes before
    # fc.0.weight (84 units), so "the last 2-D weight" alone would build an 84-class LeNet; found by content
    from safetensors.torch import save_file

    model, path = _lenet5_of_7_classes(), tmp_path / name
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    t = load_teacher(path, arch="lenet5", spec=SPEC)
    assert t.fmt == "state_dict" and t.num_classes == 7 and t.arch_kwargs["num_classes"] == 7
    _same_outputs(t, model)


def test_safetensors_without_batchnorm_counters_finds_its_classes(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model, path = dfkd.create_model("lenet5_bn", **{**KWARGS, "num_classes": 7}).eval(), tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if "num_batches_tracked" not in k}, str(path))
    t = load_teacher(path, arch="lenet5_bn", spec=SPEC)
    assert t.num_classes == 7
    _same_outputs(t, model)


def test_a_torch_saved_state_dict_in_sorted_order_finds_its_classes(tmp_path):
    model, path = _lenet5_of_7_classes(), tmp_path / "sorted.pt"
    torch.save(dict(sorted(model.state_dict().items())), path)
    t = load_teacher(path, arch="lenet5", spec=SPEC)
    assert t.num_classes == 7
    _same_outputs(t, model)


def test_a_truncated_or_empty_safetensors_file_says_so(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in _zoo().state_dict().items()}, str(path))
    data = path.read_bytes()
    (tmp_path / "half.safetensors").write_bytes(data[: len(data) // 2])
    msg = _error(tmp_path / "half.safetensors", arch="lenet5_bn", spec=SPEC)
    assert "half.safetensors" in msg and "not a readable safetensors file" in msg and "truncated or corrupt" in msg
    assert "\n" not in msg
    save_file({}, str(tmp_path / "none.safetensors"))
    msg = _error(tmp_path / "none.safetensors", arch="lenet5_bn", spec=SPEC)
    assert "none.safetensors" in msg and "holds no tensors" in msg


def test_torch_compile_prefix_is_dropped(tmp_path):
    model, path = _zoo(), tmp_path / "compiled.pt"
    torch.save({f"_orig_mod.module.{k}": v for k, v in model.state_dict().items()}, path)  # compiled DDP model
    _same_outputs(load_teacher(path, arch="lenet5_bn", spec=SPEC), model)


def test_a_lightning_checkpoint_reads_the_network_under_its_attribute(tmp_path):
    model, path = _lenet5_of_7_classes(), tmp_path / "epoch=3.ckpt"
    state = {f"model.module.{k}": v for k, v in model.state_dict().items()}  # a DataParallel network inside
    state["criterion.weight"] = torch.ones(7)  # a weighted loss's class weights, saved beside the network
    torch.save({"epoch": 3, "global_step": 120, "state_dict": state, "hyper_parameters": {"lr": 0.1}}, path)
    with pytest.warns(UserWarning, match="under 'model.'; 1 other entries of the file left out"):
        t = load_teacher(path, arch="lenet5", spec=SPEC)
    assert t.num_classes == 7
    _same_outputs(t, model)


def test_a_trusted_checkpoint_with_python_objects_beside_its_state_dict_loads(tmp_path):
    import argparse

    model, path = _zoo(), tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"args": argparse.Namespace(lr=0.1)}}, path)
    assert "--trust-pickle" in _error(path, arch="lenet5_bn", spec=SPEC)
    _same_outputs(load_teacher(path, arch="lenet5_bn", spec=SPEC, trust_pickle=True), model)


def test_two_networks_of_the_architecture_in_one_file_is_refused(tmp_path):
    model, path = _zoo(), tmp_path / "distill.ckpt"
    state = {f"{who}.{k}": v for who in ("student", "teacher") for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, path)
    msg = _error(path, arch="lenet5_bn", spec=SPEC)
    assert "'student.', 'teacher.'" in msg and "save the network you mean as a state_dict of its own" in msg


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write a user's model file into tmp_path, importable as `<name>:Net` when run from tmp_path."""
    name = f"usernet_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.setattr(sys, "path", list(sys.path))  # loading may add the working folder: undo it afterwards
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def _user_state(tmp_path, name):
    sys.path.insert(0, str(tmp_path))
    net = __import__(name).Net().eval()
    sys.path.remove(str(tmp_path))
    path = tmp_path / "user.pt"
    torch.save(net.state_dict(), path)
    return net, path


def test_trusted_pickle_finds_its_classes_in_the_working_folder(tmp_path, user_module):
    # The `dfkd` script does not put the working folder on sys.path: --teacher-arch module:Class found the user's
    # code there while a pickle of the same class failed with "run from the folder with their code".
    sys.path[:] = [p for p in sys.path if p not in ("", str(tmp_path))]
    net, _ = _user_state(tmp_path, user_module)
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    sys.modules.pop(user_module)
    t = load_teacher(path, trust_pickle=True, spec=InputSpec(1, 16, (0.5,), (0.5,)))
    _same_outputs(t, net, (2, 1, 16, 16))


def test_a_quantized_model_is_refused_for_its_float_one(tmp_path):
    # quantize_dynamic's packed int8 weights: the state_dict was called "neither a dfkd model file nor a
    # state_dict", the pickle "batch-dependent" (its activations are quantized per batch)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation of its int8 tensors
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        torch.save(quantized.state_dict(), tmp_path / "q_sd.pt")
        torch.save(quantized, tmp_path / "q_pickle.pt")
        for name, kw in (("q_sd.pt", {"arch": "my:Net"}), ("q_pickle.pt", {"trust_pickle": True})):
            msg = _error(tmp_path / name, spec=InputSpec(1, 4, (0.5,), (0.5,)), **kw)
            assert "a quantized model" in msg and "float model" in msg, msg


def test_state_dict_with_module_class(tmp_path, user_module):
    net, path = _user_state(tmp_path, user_module)
    spec = InputSpec(1, 16, (0.5,), (0.5,))
    t = load_teacher(path, arch=f"{user_module}:Net", spec=spec)
    assert t.fmt == "state_dict" and t.num_classes == 5
    assert t.bn_paths() == ["bn"] and t.penultimate_path() == "fc"
    _same_outputs(t, net, (2, 1, 16, 16))


def test_module_class_imported_from_the_working_folder(tmp_path, user_module):
    _, path = _user_state(tmp_path, user_module)
    sys.modules.pop(user_module, None)
    sys.path[:] = [p for p in sys.path if p not in ("", str(tmp_path), os.getcwd())]
    t = load_teacher(path, arch=f"{user_module}:Net", spec=InputSpec(1, 16, (0.5,), (0.5,)))
    assert t.num_classes == 5


def test_torchscript(tmp_path):
    torch.manual_seed(0)
    net, path = ScriptableNet().eval(), tmp_path / "ts.pt"
    torch.jit.script(net).save(str(path))
    t = load_teacher(path, spec=InputSpec(1, 16, (0.5,), (0.5,)))
    assert t.fmt == "torchscript" and t.num_classes == 6 and not t.hookable
    _same_outputs(t, net, (2, 1, 16, 16))


@pytest.mark.parametrize("fmt", ["torchscript", "export", "pickle", "onnx"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])  # float64: model.double()
def test_a_half_precision_teacher_is_held_in_float32(tmp_path, fmt, dtype):
    """A module saved after `model.half()` took no float32 image ("Input type and weight type should be the same",
    told as a wrong input shape); its weights are now made float32 (the same values), with a warning."""
    torch.manual_seed(0)
    net, path, x = ScriptableNet().eval().to(dtype), tmp_path / f"m.{fmt}", torch.randn(3, 1, 16, 16)
    if fmt == "torchscript":
        torch.jit.script(net).save(str(path))
    elif fmt == "export":
        path = tmp_path / "m.pt2"
        torch.export.save(torch.export.export(net, (x.to(dtype),), dynamic_shapes=({0: torch.export.Dim("n")},)),
                          str(path))
    elif fmt == "pickle":
        torch.save(net, path)
    else:
        pytest.importorskip("onnx2torch")
        if dtype != torch.float16:
            pytest.skip("ONNX Conv takes no bfloat16; onnx2torch no float64 graph")
        torch.onnx.export(net, (x.to(dtype),), str(path), dynamo=False, input_names=["x"])
    with pytest.warns(UserWarning, match=f"its weights are {str(dtype).removeprefix('torch.')}; dfkd holds them"):
        t = load_teacher(path, spec=InputSpec(1, 16, (0.5,), (0.5,)), trust_pickle=fmt == "pickle")
    assert {p.dtype for p in t.parameters()} == {torch.float32}
    with torch.no_grad():
        expected = net.float()(x)
    assert torch.allclose(t(x), expected, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_an_export_archive_saved_on_a_gpu_is_named_so(tmp_path, monkeypatch):
    # "could not be read (Attempting to deserialize object on a CUDA device ...); is it corrupt or truncated?"
    path = tmp_path / "m.pt2"
    ep = torch.export.export(ScriptableNet().eval(), (torch.randn(2, 1, 16, 16),))
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")  # as saved from a GPU
        torch.export.save(ep, str(path))
    with pytest.raises(DfkdError, match="holds CUDA weights .* export it again from the CPU"):
        load_teacher(path, spec=InputSpec(1, 16, (0.5,), (0.5,)))


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """The BN LeNet-5 as ONNX: as `dfkd export` writes it (its spec inside) and as torch.onnx.export alone does."""
    pytest.importorskip("onnx2torch")
    from dfkd.export import export_model

    d, model = tmp_path_factory.mktemp("onnx"), _zoo()
    export_model(model, SPEC, 10, "onnx", d / "dfkd.onnx")
    torch.onnx.export(model, torch.randn(1, 1, 32, 32), str(d / "plain.onnx"), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    return model, d


def test_onnx_teacher_is_a_pytorch_module_with_gradients(onnx_files):
    model, d = onnx_files
    t = load_teacher(d / "dfkd.onnx")  # its spec from the file's dfkd_spec entry
    assert t.fmt == "onnx" and t.spec == SPEC and t.num_classes == 10 and t.hookable
    _same_outputs(t, model)
    x = torch.randn(2, 1, 32, 32, requires_grad=True)
    t(x).logsumexp(1).sum().backward()  # what every synthesis needs of a teacher
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert "an ONNX file carries no input spec" in _error(d / "plain.onnx")
    _same_outputs(load_teacher(d / "plain.onnx", spec=SPEC), model)


def test_an_onnx_teacher_without_batchnorm_says_where_its_statistics_went(onnx_files):
    from dfkd.bnstats import BNInputs

    t = load_teacher(onnx_files[1] / "dfkd.onnx")
    with pytest.warns(UserWarning, match="an ONNX export folds BatchNorm into the convolutions; if the network had "
                                         "BatchNorm and you hold it, its state_dict or a torch.export archive"):
        taps = BNInputs(t, "fast")
    taps.close()


def test_onnx_teacher_converts_to_a_model_file_that_needs_no_onnx2torch(onnx_files, tmp_path, monkeypatch):
    from dfkd.convert import convert

    model, d = onnx_files
    convert(str(d / "dfkd.onnx"), str(tmp_path / "t.pt"))
    monkeypatch.setitem(sys.modules, "onnx2torch", None)  # import onnx2torch now fails
    _same_outputs(load_teacher(tmp_path / "t.pt"), model)
    msg = _error(d / "dfkd.onnx")
    assert "onnx2torch, which is not installed" in msg and 'pip install -e ".[onnx]"' in msg


def test_an_onnx_teacher_torch_export_cannot_trace_is_sent_back_to_its_onnx_file(onnx_files, tmp_path,
                                                                                    monkeypatch):
    """onnx2torch's module of a ViT does not trace (its Slice calls .numpy()): `dfkd convert` said to save a
    pickle's state_dict; the ONNX file itself is the teacher to give, in one line."""
    from dfkd.convert import convert

    def refuse(*args, **kwargs):
        raise RuntimeError(".numpy() is not supported for tensor subclasses.\n\nWhile executing %patch_embed_slice")

    monkeypatch.setattr(torch.export, "export", refuse)
    with pytest.raises(DfkdError) as e:
        convert(str(onnx_files[1] / "dfkd.onnx"), str(tmp_path / "t.pt"))
    assert "give the .onnx file itself as --teacher" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "t.pt").exists()


class _TokenAtBatchOne(nn.Module):
    """A CNN that concatenates a learnt token at batch 1 (as a ViT's class token): exported so, it takes one image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.token, self.fc = nn.Conv2d(1, 4, 3, stride=2), nn.Parameter(torch.randn(1, 5)), \
            nn.Linear(4 * 15 * 15 + 5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.conv(x).flatten(1), self.token], 1))


def test_a_per_image_teacher_takes_a_bf16_batch_under_autocast():
    """A bf16 run (autocast on a CPU) hands the teacher bf16 images; under vmap they reached the first convolution
    uncast ("Input type (CPUBFloat16Type) and weight type (torch.FloatTensor)"): they go in the graph's dtype."""
    torch.manual_seed(0)
    net = _TokenAtBatchOne().eval()
    x = torch.randn(3, 1, 32, 32)
    per = PerImage(net, x)
    assert per.vectorised
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = per(x.bfloat16())
    assert out.shape == (3, 10)
    with torch.no_grad():
        assert torch.allclose(out.float(), torch.cat([net(x[i:i + 1]) for i in range(3)]), atol=0.1)


def test_a_fixed_batch_onnx_teacher_converts_and_still_runs_per_image(tmp_path):
    """`dfkd convert` exports the per-image teacher's own module at batch 1 (it tried a dynamic batch, and
    failed): the archive loads per image again, with the same logits."""
    pytest.importorskip("onnx2torch")
    from dfkd.convert import convert

    torch.manual_seed(0)
    model = _TokenAtBatchOne().eval()
    torch.onnx.export(model, (torch.randn(1, 1, 32, 32),), str(tmp_path / "t.onnx"), dynamo=False, verbose=False)
    with pytest.warns(UserWarning, match="one image at a time"):
        convert(str(tmp_path / "t.onnx"), str(tmp_path / "t.pt"), TeacherOptions(channels=1, size=32, mean=(0.5,),
                                                                                  std=(0.5,)))
        t = load_teacher(tmp_path / "t.pt")
    assert t.fmt == "export" and isinstance(t.module, PerImage)
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(t(x), torch.cat([model(x[i:i + 1]) for i in range(4)]), atol=1e-5)


def test_a_refused_conversion_prints_one_line_not_the_traced_graph(tmp_path, capfd):
    """torch.export prints the partial graph of a module it cannot trace to stderr, and logs a warning, before it
    raises; convert keeps both from the terminal (dozens of lines before the one that says what to do)."""
    pytest.importorskip("onnx2torch")
    from dfkd.convert import convert

    class Reshaped(nn.Module):  # onnx2torch's Reshape checks its target for zeros: a data-dependent guard
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(1, -1)[:, :10]

    torch.onnx.export(Reshaped(), (torch.randn(1, 1, 32, 32),), str(tmp_path / "t.onnx"), dynamo=True,
                      verbose=False)
    capfd.readouterr()
    with pytest.warns(UserWarning, match="one image at a time"), pytest.raises(DfkdError) as e:
        convert(str(tmp_path / "t.onnx"), str(tmp_path / "t.pt"), TeacherOptions(channels=1, size=32, mean=(0.5,),
                                                                                  std=(0.5,)))
    assert "give the .onnx file itself as --teacher" in str(e.value)
    err = capfd.readouterr().err
    assert "def forward" not in err and "Unable to find user code" not in err, err[:500]
    assert not (tmp_path / "t.pt").exists()


def test_an_onnx_file_whose_spec_entry_does_not_parse_asks_for_the_flags(onnx_files, tmp_path):
    import onnx

    graph = onnx.load(str(onnx_files[1] / "plain.onnx"))
    graph.metadata_props.add(key="dfkd_spec", value="{not json")
    onnx.save(graph, str(tmp_path / "odd.onnx"))
    assert "an ONNX file carries no input spec" in _error(tmp_path / "odd.onnx")


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize("arch", ["lenet5_bn", "timm_vit"])
def test_an_onnx_file_of_torchs_current_exporter_is_a_teacher(tmp_path, arch, dynamo):
    """torch.onnx.export's exporters write opset 18 or later by default, with Reshape, ReduceMean, Shape, Split and
    ConstantOfShape versions onnx2torch has no converter for (or onnx no down-adapter), a flattening Reshape with
    allowzero=1, (a ViT's) Gelu, an opset-20 operator, weights shared through Identity nodes and LayerNorms over
    symbolic dimensions; dfkd takes the graph down to the opset onnx2torch reads and loads it with the source's
    logits and gradients."""
    pytest.importorskip("onnx2torch")
    pytest.importorskip("onnxscript")
    import onnx

    if arch == "timm_vit":
        timm = pytest.importorskip("timm")
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32,
                                  patch_size=8, in_chans=1, embed_dim=32, depth=1, num_heads=2).eval()
    else:
        model = _zoo(arch)
    batch = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)} if dynamo else \
        {"input_names": ["x"], "dynamic_axes": {"x": {0: "n"}}}
    torch.onnx.export(model, (torch.randn(2, 1, 32, 32),), str(tmp_path / "t.onnx"), dynamo=dynamo, verbose=False,
                      **batch)
    graph = onnx.load(str(tmp_path / "t.onnx"))
    assert next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) > 17
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = load_teacher(tmp_path / "t.onnx", spec=SPEC)
        _same_outputs(t, model)
    assert not [w for w in caught if "onnx2torch" in w.filename], [str(w.message) for w in caught]
    x = torch.randn(2, 1, 32, 32, requires_grad=True)
    t(x).logsumexp(1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_an_onnx_file_exported_at_batch_one_runs_at_any_batch(tmp_path):
    """torch.onnx.export without dynamic_shapes fixes the batch to 1 and bakes it into Reshape targets ([1, 120]):
    a CNN so exported loads as it is, each image's logits its own; a ViT, whose class token is also concatenated at
    batch 1, is run one image at a time (vmapped), with the input's gradient, and says so (it was refused)."""
    pytest.importorskip("onnx2torch")
    pytest.importorskip("onnxscript")
    timm = pytest.importorskip("timm")

    model = _zoo()
    torch.onnx.export(model, (torch.randn(1, 1, 32, 32),), str(tmp_path / "cnn.onnx"), dynamo=True, verbose=False)
    cnn = load_teacher(tmp_path / "cnn.onnx", spec=SPEC)
    assert not isinstance(cnn.module, PerImage) and cnn.hookable
    _same_outputs(cnn, model, (5, 1, 32, 32))
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                            in_chans=1, embed_dim=32, depth=1, num_heads=2).eval()
    torch.onnx.export(vit, (torch.randn(1, 1, 32, 32),), str(tmp_path / "vit.onnx"), dynamo=True, verbose=False)
    with pytest.warns(UserWarning, match="it takes one image at a time .* re-export it with a dynamic batch"):
        t = load_teacher(tmp_path / "vit.onnx", spec=SPEC)
    assert isinstance(t.module, PerImage) and t.module.vectorised and not t.hookable and t.bn_paths() == []
    x = torch.randn(5, 1, 32, 32, requires_grad=True)
    out = t(x)
    with torch.no_grad():
        assert torch.allclose(out, vit(x), rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_per_image_falls_back_to_a_loop_where_vmap_cannot_run():
    """A model vmap has no rule for (here, one that reads a value out of its input) runs in a loop, same logits."""
    class Fixed(nn.Module):
        def forward(self, x):
            assert x.shape[0] == 1
            return x.flatten(1)[:, :3] * float(x.sum() > 0)  # float(): a value out of a mapped tensor

    x = torch.randn(4, 1, 2, 2)
    per = PerImage(Fixed(), x)
    assert not per.vectorised
    assert torch.equal(per(x), torch.cat([Fixed()(x[i:i + 1]) for i in range(4)]))


def test_an_onnx_file_whose_layers_share_a_weight_through_identity_loads(tmp_path):
    """torch's exporter stores equal weights once and hands them to the other layers through Identity nodes (as in
    an untrained ResNet's BatchNorm, folded into its convolutions); onnx2torch reads convolution weights only from
    initializers (it raised KeyError 'onnx::Conv_197' on torchvision's ResNet-18)."""
    pytest.importorskip("onnx2torch")
    import onnx

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1), nn.Linear(1, 3)
            self.b.load_state_dict(self.a.state_dict())

        def forward(self, x):
            return self.fc(self.b(self.a(x).relu()).mean((2, 3)))

    torch.manual_seed(0)
    net = Twice().eval()
    torch.onnx.export(net, (torch.randn(2, 1, 32, 32),), str(tmp_path / "t.onnx"), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "n"}})
    assert "Identity" in {n.op_type for n in onnx.load(str(tmp_path / "t.onnx")).graph.node}
    _same_outputs(load_teacher(tmp_path / "t.onnx", spec=SPEC), net)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_an_onnx_file_that_computes_its_convolution_weights_loads(tmp_path, dynamo):
    """Weight normalisation (as a standardised convolution in BiT or NFNets) leaves the convolution's weight a
    value the graph computes from its constants; onnx2torch reads conv weights only from initializers (KeyError).
    dfkd computes them once at load time."""
    pytest.importorskip("onnx2torch")
    if dynamo:
        pytest.importorskip("onnxscript")

    class Normed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(1, 4, 3))
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.conv(x).relu().mean((2, 3)))

    torch.manual_seed(0)
    net = Normed().eval()
    batch = {"dynamic_shapes": ({0: torch.export.Dim("n")},)} if dynamo else \
        {"input_names": ["x"], "dynamic_axes": {"x": {0: "n"}}}
    torch.onnx.export(net, (torch.randn(2, 1, 32, 32),), str(tmp_path / "t.onnx"), dynamo=dynamo, verbose=False,
                      **batch)
    _same_outputs(load_teacher(tmp_path / "t.onnx", spec=SPEC), net)


def test_folding_computed_weights_keeps_what_the_rest_of_the_graph_reads():
    """The weight chain wc = ((2 w) * 1) * 0.5 is computed ahead and stored; its intermediate (2 w) * 1, which the
    head also reads, keeps the two nodes that compute it, and the graph computes what onnxruntime computes."""
    onnx2torch = pytest.importorskip("onnx2torch")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    from dfkd.onnxgraph import for_onnx2torch

    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 1, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    nodes = [helper.make_node("Mul", ["w", "two"], ["t"]), helper.make_node("Mul", ["t", "one"], ["w2x"]),
             helper.make_node("Mul", ["w2x", "half"], ["wc"]),
             helper.make_node("Conv", ["x", "wc"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["c"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("ReduceSum", ["w2x"], ["s"], keepdims=0),  # the intermediate, read again
             helper.make_node("Add", ["m", "s"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(4, 1, 8, 8)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    fixed = for_onnx2torch(model)
    assert "wc" in {t.name for t in fixed.graph.initializer}
    assert [n.op_type for n in fixed.graph.node] == ["Mul", "Mul", "Conv", "ReduceMean", "ReduceSum", "Add"]
    with torch.no_grad():
        got = onnx2torch.convert(fixed)(torch.from_numpy(x))
    assert torch.allclose(got, torch.from_numpy(expected), atol=1e-5)


def test_a_keras_style_onnx_teacher_takes_channels_last_images_and_gives_probabilities(tmp_path):
    """A Keras model converted to ONNX takes (N, H, W, C) images and ends in a softmax: dfkd feeds it its images in
    that layout (read from the graph's declared input) and reads the log of its probabilities, each with a line."""
    pytest.importorskip("onnx2torch")

    class Keras(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 5)

        def forward(self, x):
            return self.fc(self.conv(x.permute(0, 3, 1, 2)).relu().mean((2, 3))).softmax(1)

    torch.manual_seed(0)
    keras, spec = Keras().eval(), InputSpec(3, 20, (0.5,) * 3, (0.25,) * 3, width=24)
    torch.onnx.export(keras, (torch.randn(2, 20, 24, 3),), str(tmp_path / "k.onnx"), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "n"}})
    with pytest.warns(UserWarning) as caught:
        t = load_teacher(tmp_path / "k.onnx", spec=spec)
    said = " | ".join(str(w.message) for w in caught)
    assert "takes channels-last images (N, 20, 24, 3)" in said and "outputs probabilities" in said
    x = torch.randn(4, 3, 20, 24)
    with torch.no_grad():
        assert t.num_classes == 5 and torch.allclose(t(x), keras(x.permute(0, 2, 3, 1)).log(), atol=1e-5)


def test_a_newer_onnx_graph_is_taken_down_to_what_onnx2torch_reads():
    """An opset-20 graph (a Pad, which onnx's converter cannot take down; Gelu, exact and tanh, and Mish, which
    have no earlier version; ReduceMean with its axes as an input; a Reshape with allowzero=1 to a constant shape)
    computes the same function after `for_onnx2torch`, and onnx2torch converts it; a Reshape whose shape holds a 0
    keeps allowzero=1 (there the attribute matters)."""
    onnx2torch = pytest.importorskip("onnx2torch")
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from dfkd.onnxgraph import ONNX2TORCH_OPSET, for_onnx2torch

    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(4, 1, 3, 3)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
             numpy_helper.from_array(np.array([-1, 4], np.int64), "flat"),
             numpy_helper.from_array(np.array([0, 3], np.int64), "keep")]
    nodes = [helper.make_node("Pad", ["x", "pads"], ["xp"]),  # opset 19's Pad: no adapter down to 17
             helper.make_node("Conv", ["xp", "w1"], ["c"]),
             helper.make_node("Gelu", ["c"], ["g"]),  # opset 20, no earlier version
             helper.make_node("Gelu", ["g"], ["gt"], approximate="tanh"),
             helper.make_node("Mish", ["gt"], ["r"]),  # opset 18, no earlier version
             helper.make_node("ReduceMean", ["r", "axes"], ["m"], keepdims=1),
             helper.make_node("Reshape", ["m", "flat"], ["f"], allowzero=1),
             helper.make_node("Gemm", ["f", "w2"], ["logits"], transB=1),
             helper.make_node("Reshape", ["logits", "keep"], ["same"], allowzero=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model)
    fixed = for_onnx2torch(model)
    assert next(o.version for o in fixed.opset_import if o.domain in ("", "ai.onnx")) == ONNX2TORCH_OPSET
    assert {n.domain for n in fixed.graph.node} == {""} and [o.domain for o in fixed.opset_import] == [""]
    allowzero = {n.input[1]: n.attribute[0].i for n in fixed.graph.node if n.op_type == "Reshape"}
    assert allowzero == {"flat": 0, "keep": 1}
    fixed.graph.node.pop()  # the unused Reshape that keeps allowzero=1, which onnx2torch refuses
    x = rng.normal(size=(5, 1, 8, 8)).astype(np.float32)
    conv = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w1), padding=1)
    conv = torch.nn.functional.mish(torch.nn.functional.gelu(torch.nn.functional.gelu(conv), approximate="tanh"))
    expected = conv.mean((2, 3)) @ torch.from_numpy(w2).T
    with torch.no_grad():
        got = onnx2torch.convert(fixed)(torch.from_numpy(x))
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_an_onnx_vision_transformer_teacher_runs_quietly_with_its_source_logits(tmp_path):
    """A timm ViT exported to ONNX: its class-token Slice comes back from onnx2torch with torch's list-indexing
    warning on every forward pass; dfkd loads it with the same logits and without that warning."""
    pytest.importorskip("onnx2torch")
    timm = pytest.importorskip("timm")
    import warnings

    from dfkd.export import export_model

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=16, patch_size=4,
                            in_chans=1, embed_dim=32, depth=1, num_heads=2).eval()
    spec = InputSpec(1, 16, (0.5,), (0.5,))
    export_model(vit, spec, 10, "onnx", tmp_path / "vit.onnx")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = load_teacher(tmp_path / "vit.onnx")
        _same_outputs(t, vit, (3, 1, 16, 16))
    assert t.spec == spec and t.num_classes == 10
    assert not [w for w in caught if "non-tuple sequence" in str(w.message)], [str(w.message) for w in caught]


def test_a_corrupt_onnx_file_says_so(tmp_path):
    pytest.importorskip("onnx2torch")
    (tmp_path / "bad.onnx").write_bytes(np.random.default_rng(0).bytes(2048))
    msg = _error(tmp_path / "bad.onnx", spec=SPEC)
    assert "bad.onnx" in msg and "could not be turned into a PyTorch module" in msg and "\n" not in msg
    assert "torch.save" not in msg and "a torch.export archive (torch.export.save) or TorchScript instead" in msg


@pytest.mark.parametrize("fmt", ["torchscript", "exported-program"])
def test_a_file_dfkd_export_wrote_brings_its_spec_to_every_command(tmp_path, fmt):
    from dfkd.export import export_model

    model, path = _zoo(), tmp_path / "m.pt"
    export_model(model, SPEC, 10, fmt, path)
    t = load_teacher(path)  # no spec flags
    assert t.spec == SPEC and t.num_classes == 10
    _same_outputs(t, model)


def test_traced_zoo_model_is_torchscript_not_export(tmp_path):
    # A traced zoo model's archive holds code/__torch__/dfkd/models/...: that is not a torch.export archive.
    model, path = _zoo(), tmp_path / "traced.pt"
    torch.jit.trace(model, torch.randn(2, 1, 32, 32), check_trace=False).save(str(path))
    t = load_teacher(path, spec=SPEC)
    assert t.fmt == "torchscript"
    _same_outputs(t, model)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """lenet5_bn exported with a dynamic and with a static batch dimension."""
    model, folder = _zoo(), tmp_path_factory.mktemp("export")
    x = torch.randn(2, 1, 32, 32)
    dyn = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}})
    torch.export.save(dyn, folder / "dynamic.pt2")
    torch.export.save(torch.export.export(model, (x[:1],)), folder / "static.pt2")
    return model, folder


def test_export_archive_with_dynamic_batch(exported):
    model, folder = exported
    t = load_teacher(folder / "dynamic.pt2", spec=SPEC)
    assert t.fmt == "export" and t.hookable and t.num_classes == 10
    assert t.bn_paths() == ["stage1.1", "stage2.1", "stage3.1"]
    _same_outputs(t, model)
    with t.tap(t.bn_paths()) as taps:
        t(torch.randn(2, 1, 32, 32))
    assert sorted(taps.paths) == sorted(t.bn_paths()) and taps.inputs == {}  # cleared on exit


def test_export_archive_with_static_batch_runs_one_image_at_a_time(exported):
    """An archive exported at batch 1 guards its batch size; it runs per image, without hooks (it was refused)."""
    model, folder = exported
    with pytest.warns(UserWarning, match="static.pt2: it takes one image at a time"):
        t = load_teacher(folder / "static.pt2", spec=SPEC)
    assert isinstance(t.module, PerImage) and not t.hookable and t.bn_paths() == []
    _same_outputs(t, model, (4, 1, 32, 32))
    with pytest.raises(DfkdError, match="fixed batch of 1 .* re-export it with a dynamic batch dimension"):
        t.tap(["stage1.1"])


@pytest.mark.parametrize("missing", ["weight_0", "models/model.json"])
def test_a_damaged_export_archive_is_one_line_not_torchs_traceback(exported, tmp_path, capfd, missing):
    """torch.export.load logs a traceback and raises "check the warnings above": dfkd says the cause in one line."""
    with zipfile.ZipFile(exported[1] / "dynamic.pt2") as whole, zipfile.ZipFile(tmp_path / "t.pt2", "w") as part:
        for name in whole.namelist():
            if not name.endswith(missing):
                part.writestr(name, whole.read(name))
    capfd.readouterr()
    msg = _error(tmp_path / "t.pt2", spec=SPEC)
    assert "torch.export archive could not be read" in msg and "torch.export.save" in msg
    assert "warnings above" not in msg and "\n" not in msg
    assert ("failed locating file" in msg) if missing == "weight_0" else ("not hold a complete exported program" in msg)
    assert "Traceback" not in capfd.readouterr().err


def test_export_archive_without_spec(exported):
    msg = _error(exported[1] / "dynamic.pt2")
    assert "carries no input spec" in msg and "--channels" in msg and "--input-size" in msg


def test_pickled_module_needs_trust(tmp_path):
    model, path = _zoo(), tmp_path / "whole.pt"
    torch.save(model, path)
    msg = _error(path, spec=SPEC)
    assert str(path) in msg and "--trust-pickle" in msg and "state_dict" in msg
    t = load_teacher(path, trust_pickle=True, spec=SPEC)
    assert t.fmt == "pickle" and t.bn_paths() == ["stage1.1", "stage2.1", "stage3.1"]
    _same_outputs(t, model)


# --------------------------------------------------------------------------------------------- the malicious pickle


def _touch_with_pathlib(marker: pathlib.Path) -> Evil:
    return Evil(pathlib.Path.touch, (marker,))  # pickled as GLOBAL getattr + GLOBAL pathlib.PosixPath


def _touch_with_shell(marker: pathlib.Path) -> Evil:
    return Evil(os.system, (f"touch '{marker}'",))  # pickled as GLOBAL posix.system


@pytest.mark.parametrize("evil", [_touch_with_pathlib, _touch_with_shell])
def test_malicious_pickle_does_not_run(tmp_path, evil):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"x": evil(marker)}, path)
    msg = _error(path, arch="lenet5", spec=SPEC)
    assert "--trust-pickle" in msg and str(path) in msg
    with pytest.raises(DfkdError, match="--trust-pickle"):
        dfkd.load_model(path)
    assert not marker.exists(), "unpickling ran code without --trust-pickle"
    # The flag is what gates it: with it the payload runs, and the result is still refused (not a module).
    msg = _error(path, trust_pickle=True, spec=SPEC)
    assert marker.exists()
    assert "neither an nn.Module nor a state_dict" in msg


# ---------------------------------------------------------------------------------------------------- bad inputs


def _valid_file(tmp_path) -> pathlib.Path:
    path = tmp_path / "good.pt"
    save_model(path, _zoo(), ModelFile("lenet5_bn", dict(KWARGS), SPEC, 10))
    return path


def test_missing_file(tmp_path):
    msg = _error(tmp_path / "nope.pt")
    assert "--teacher" in msg and "nope.pt" in msg and "no such file" in msg


def test_empty_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    msg = _error(tmp_path / "empty.pt")
    assert "empty.pt" in msg and "empty" in msg and "write it again" in msg


def test_truncated_file(tmp_path):
    data = _valid_file(tmp_path).read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    msg = _error(tmp_path / "half.pt")
    assert "half.pt" in msg and "truncated or corrupt" in msg
    assert "\n" not in msg


def test_random_bytes(tmp_path):
    (tmp_path / "noise.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    msg = _error(tmp_path / "noise.pt")
    assert "noise.pt" in msg and "corrupt" in msg and "--trust-pickle" not in msg


def test_directory(tmp_path):
    (tmp_path / "adir").mkdir()
    msg = _error(tmp_path / "adir")
    assert "adir" in msg and "is a directory" in msg


def test_a_run_folder_or_its_checkpoint_points_at_the_runs_student(tmp_path):
    # "is a directory" / "save the model's state_dict() alone": neither named the student.pt beside them
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"config": {}, "method": {}, "step": 3, "rng": {}, "version": 1}, run / "checkpoint.pt")
    assert _error(run / "checkpoint.pt").endswith("is a run's checkpoint (its training state), not a model; the run "
                                                  f"has not written its student.pt yet: finish it (dfkd distill "
                                                  f"--resume {run}), then give that")
    (run / "student.pt").write_bytes(b"a student")
    assert _error(run).endswith(f"is a directory, not a model file; give the student the run wrote, "
                                f"{run / 'student.pt'}")
    assert _error(run / "checkpoint.pt").endswith(f"is a run's checkpoint (its training state), not a model; give "
                                                  f"the student the run wrote, {run / 'student.pt'}")


def test_a_pytorch_file_given_as_data_is_named_as_such():
    from dfkd.data import load_images

    root = pathlib.Path(__file__).resolve().parents[1]
    with pytest.raises(DfkdError, match=r"mnist_lenet5\.pt: is a PyTorch file \(a model or checkpoint\?\), not an"):
        load_images(root / "examples" / "mnist_lenet5.pt", "--eval-data")


def test_a_file_the_user_cannot_read_is_named_so(tmp_path, monkeypatch):
    # "not a readable PyTorch file ([Errno 13] Permission denied: ...); is it truncated or corrupt?"
    import dfkd.loading

    path = tmp_path / "t.pt"
    torch.save(_zoo().state_dict(), path)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(dfkd.loading, "open", denied, raising=False)  # as a chmod 000 file is to a user, not root
    msg = _error(path, arch="lenet5_bn", spec=SPEC)
    assert msg == f"--teacher {path}: cannot read it (Permission denied); make it readable to you (chmod u+r) or " \
                  "give a copy you can read"


def test_state_dict_not_fitting_the_arch(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(_zoo("lenet5").state_dict(), path)
    msg = _error(path, arch="lenet5_bn", spec=SPEC)
    assert "sd.pt" in msg and "do not fit the architecture" in msg and "--teacher-arch" in msg
    assert "\n" not in msg


def test_state_dict_wrong_channels(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(_zoo("lenet5").state_dict(), path)
    msg = _error(path, arch="lenet5", spec=InputSpec(3, 32, (0.5,), (0.5,)))
    assert "size mismatch" in msg and "do not fit" in msg  # it blamed the architecture name and classes
    assert "the weights take 1-channel images and the model was built for 3: give --channels 1" in msg
    assert "check the architecture name" not in msg


def test_unknown_arch_name(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(_zoo().state_dict(), path)
    msg = _error(path, arch="lenet6", spec=SPEC)
    assert "--teacher-arch" in msg and "lenet6" in msg and "lenet5_bn" in msg and "resnet18" in msg


def test_state_dict_without_arch(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(_zoo().state_dict(), path)
    msg = _error(path, spec=SPEC)
    assert "sd.pt" in msg and "--teacher-arch NAME" in msg and "module:Class" in msg and "lenet5_bn" in msg


def test_unimportable_module_class(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(_zoo().state_dict(), path)
    msg = _error(path, arch="no_such_module_dfkd:Net", spec=SPEC)
    assert "--teacher-arch no_such_module_dfkd:Net" in msg and "cannot import" in msg and "PYTHONPATH" in msg


def test_module_without_that_class(tmp_path, user_module):
    _, path = _user_state(tmp_path, user_module)
    msg = _error(path, arch=f"{user_module}:Nett", spec=InputSpec(1, 16, (0.5,), (0.5,)))
    assert "Nett" in msg and "no nn.Module class" in msg


def test_model_refusing_the_declared_shape(tmp_path, user_module):
    _, path = _user_state(tmp_path, user_module)
    msg = _error(path, arch=f"{user_module}:Net", spec=InputSpec(1, 20, (0.5,), (0.5,)))
    assert "user.pt" in msg and "does not accept inputs of shape (2, 1, 20, 20)" in msg
    assert "--channels/--input-size" in msg


@pytest.mark.parametrize("arch", ["lenet5_bn", "module"])
def test_state_dict_without_input_spec(tmp_path, user_module, arch):
    if arch == "module":
        _, path = _user_state(tmp_path, user_module)
        arch = f"{user_module}:Net"
    else:
        path = tmp_path / "sd.pt"
        torch.save(_zoo().state_dict(), path)
    msg = _error(path, arch=arch)
    assert str(path) in msg and "--channels" in msg and "--input-size" in msg


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    msg = _error(path, arch="lenet5", spec=SPEC)
    assert "list.pt" in msg and "neither a dfkd model file nor a state_dict" in msg
    torch.save({"weights": _zoo().state_dict(), "epoch": 3}, path)  # the keys are named, to find the state_dict
    assert "holds a dict with keys ['epoch', 'weights'], neither" in _error(path, arch="lenet5_bn", spec=SPEC)


def test_more_training_checkpoint_layouts_load(tmp_path):
    # {"model_state": ...} and an AveragedModel's state_dict (its n_averaged count beside module.*) were refused
    model = _zoo()
    path = tmp_path / "c.pt"
    torch.save({"model_state": model.state_dict(), "epoch": 3}, path)
    _same_outputs(load_teacher(path, arch="lenet5_bn", spec=SPEC), model)
    torch.save(torch.optim.swa_utils.AveragedModel(model).state_dict(), path)
    _same_outputs(load_teacher(path, arch="lenet5_bn", spec=SPEC), model)


def test_a_model_pickled_by_a_script_gets_advice_that_works(tmp_path):
    # "the classes it names must be importable (... add it to PYTHONPATH)", which cannot work for __main__ classes
    script = tmp_path / "train.py"
    script.write_text("import torch\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                      "        self.fc = torch.nn.Linear(4, 3)\n    def forward(self, x):\n"
                      "        return self.fc(x.flatten(1)[:, :4])\n"
                      f"torch.save(Net(), {str(tmp_path / 'whole.pt')!r})\n")
    subprocess.run([sys.executable, str(script)], check=True, cwd=tmp_path)
    with pytest.raises(DfkdError, match=r"the pickle names classes of the script that saved it .*save "
                                        r"model\.state_dict\(\) instead"):
        load_teacher(tmp_path / "whole.pt", trust_pickle=True, spec=SPEC)
