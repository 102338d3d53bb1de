"""The model zoo: every registered model's contract, and pinned parameter counts so no architecture drifts."""

from __future__ import annotations

import re

import pytest
import torch

from dfkd import DfkdError
from dfkd.hooks import FeatureTaps
from dfkd.models import MODELS as ZOO
from dfkd.models import ZooModel, create, list_models
from dfkd.models._base import MaxPool2, use_fast_pools

# (1 input channel, 3 input channels), 10 classes. Published anchors: lenet5 1-ch 61,706 (DAFL); resnet18 3-ch
# 11,173,962, resnet34 3-ch 21,282,122 (CIFAR ResNets of DAFL/DFAD); wrn_40_2 3-ch 2,243,546 (ZSKT). The others
# were computed once from the zoo and written in; a change here must be deliberate.
PARAMS = {
    "lenet5": (61_706, 62_006),
    "lenet5_bn": (61_990, 62_290),
    "lenet5_half": (15_738, 15_888),
    "lenet5_half_bn": (15_880, 16_030),
    "lenet5_3q": (35_105, 35_355),
    "lenet5_scaled": (61_706, 62_006),  # default widths: LeNet-5; `dfkd search` scales them
    "mobilenet_v2_tiny": (112_986, 113_274),
    "resnet18": (11_172_810, 11_173_962),
    "resnet34": (21_280_970, 21_282_122),
    "vgg11_bn": (9_229_962, 9_231_114),
    "wrn_16_1": (174_778, 175_066),
    "wrn_16_2": (691_386, 691_674),
    "wrn_40_1": (563_642, 563_930),
    "wrn_40_2": (2_243_258, 2_243_546),
}
MODELS = list_models()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Two OpenMP threads on a busy two-core machine spin against each other (tens of times slower); one suffices.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_model_is_pinned():
    assert sorted(PARAMS) == MODELS, "a zoo model was added or removed: pin its parameter counts in PARAMS"


@pytest.mark.parametrize("name", MODELS)
def test_the_size_dfkd_models_prints_is_the_pinned_one(name):
    """`dfkd models` prints each model's first docstring line; a "~62K" or "~11.2M parameters" there must hold."""
    first = (ZOO.get(name).__doc__ or "").strip().splitlines()[0]
    claim = re.search(r"~([\d.]+)([KM]) parameters", first)
    if name != "lenet5_scaled":  # any widths: no one size
        assert claim, f"{name}: say its size in `dfkd models` ({first!r})"
    if claim:
        said = float(claim[1]) * {"K": 1e3, "M": 1e6}[claim[2]]
        assert any(abs(said - n) <= 0.1 * n for n in PARAMS[name]), (name, said, PARAMS[name])


def test_pinned_counts_keep_the_published_anchors():
    assert PARAMS["lenet5"][0] == 61_706
    assert PARAMS["resnet18"][1] == 11_173_962
    assert PARAMS["resnet34"][1] == 21_282_122
    assert PARAMS["wrn_40_2"][1] == 2_243_546


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("name", MODELS)
def test_forward_contract_and_parameter_count(name, size, channels):
    torch.manual_seed(0)
    model = create(name, num_classes=10, in_channels=channels, input_size=size).eval()
    assert isinstance(model, ZooModel)
    # Pinned at 10 classes; the input size must not change the count (LeNet pads, the rest pool adaptively).
    assert _count(model) == PARAMS[name][channels == 3]
    assert isinstance(model.classifier, torch.nn.Linear) and model.classifier.out_features == 10
    assert model.stages, f"{name} declares no stages"
    x = torch.randn(2, channels, size, size)
    with torch.no_grad(), FeatureTaps(model, model.stages, inputs=False, outputs=True) as taps:  # KeyError if absent
        out = model(x)
        stage_outputs = dict(taps.outputs)
        feats = model.forward_features(x)
        again = model.forward_head(feats)
    assert [stage_outputs[s].shape[0] for s in model.stages] == [2] * len(model.stages)
    assert all(stage_outputs[s].dim() == 4 for s in model.stages), "stages are block outputs: feature maps"
    assert out.shape == (2, 10)
    assert feats.dim() == 2 and feats.shape[0] == 2 and feats.shape[1] > 0
    assert torch.isfinite(out).all()
    assert torch.allclose(again, out, rtol=1e-5, atol=1e-6), (again - out).abs().max()


def test_input_size_changes_lenet_but_keeps_its_features():
    # LeNet pads its first convolution at 28x28 so the third still sees 5x5 maps: same width of features.
    a = create("lenet5", num_classes=10, in_channels=1, input_size=28).eval()
    b = create("lenet5", num_classes=10, in_channels=1, input_size=32).eval()
    assert a.stage1[0].padding == (2, 2) and b.stage1[0].padding == (0, 0)
    with torch.no_grad():
        assert a.forward_features(torch.zeros(1, 1, 28, 28)).shape == (1, 120)
        assert b.forward_features(torch.zeros(1, 1, 32, 32)).shape == (1, 120)


def test_none_kwargs_mean_model_default():
    model = create("lenet5", num_classes=10, in_channels=1, input_size=32, widths=None)
    assert _count(model) == PARAMS["lenet5"][0]


def test_unknown_model_lists_known_names():
    with pytest.raises(DfkdError) as e:
        create("resnet9000")
    msg = str(e.value)
    assert "resnet9000" in msg
    for name in MODELS:
        assert name in msg


def test_too_small_input_refused():
    with pytest.raises(DfkdError, match="at least 16x16"):
        create("lenet5", input_size=8)


@pytest.mark.parametrize("size", [(8, 8), (9, 7), (28, 28)])
def test_fast_pool_matches_the_library_pool_with_and_without_autograd(size):
    x = torch.relu(torch.randn(3, 4, *size, generator=torch.Generator().manual_seed(0)))
    pool, ref = MaxPool2(), torch.nn.MaxPool2d(2)
    with torch.no_grad():
        assert torch.equal(pool(x), ref(x))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(ref(x).shape)
    pool(xa).backward(g)
    ref(xb).backward(g)
    assert torch.equal(xa.grad, xb.grad)


def test_fast_pool_takes_the_corner_path_only_without_autograd(monkeypatch):
    import dfkd.models._base as base

    calls = []
    monkeypatch.setattr(base, "_corner_max", lambda x: calls.append(1) or torch.nn.functional.max_pool2d(x, 2))
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        MaxPool2()(x)
    assert calls == [1]
    MaxPool2()(x.requires_grad_())
    assert calls == [1]


def test_exports_of_a_lenet_keep_the_library_pool():
    net = create("lenet5", 10, 1, 32).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        want = net(x)
        scripted = torch.jit.script(net)
        traced = torch.jit.trace(net, x)
        for m in (scripted, traced):
            assert "max_pool2d" in str(m.inlined_graph)
            assert torch.allclose(m(x), want)
    assert "max_pool2d" in str(torch.export.export(net, (x,)).graph)


def test_use_fast_pools_swaps_plain_2x2_pools_only():
    hooked = torch.nn.MaxPool2d(2)
    hooked.register_forward_hook(lambda *a: None)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.MaxPool2d(2), torch.nn.MaxPool2d((2, 2), 2),
                              torch.nn.MaxPool2d(3, 2, 1), torch.nn.MaxPool2d(2, ceil_mode=True), hooked)
    x = torch.randn(2, 1, 40, 40)
    with torch.no_grad():
        want = net(x)
        assert use_fast_pools(net) == 2
        assert [type(m).__name__ for m in net] == ["Conv2d", "MaxPool2", "MaxPool2", "MaxPool2d", "MaxPool2d",
                                                  "MaxPool2d"]
        assert torch.equal(net(x), want)
