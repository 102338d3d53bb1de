"""The frozen Teacher and its feature taps."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import dfkd
from dfkd import DfkdError, InputSpec, Teacher
from dfkd.hooks import FeatureTaps, batchnorm_paths

SPEC = InputSpec(1, 32, (0.1307,), (0.3081,))
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")


class Toy(nn.Module):
    """Not a zoo model: 16x16 grey images, 4 classes, BatchNorm and two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.hidden = nn.Linear(3, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(torch.relu(self.bn(self.conv(x))).mean((2, 3)))))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Two OpenMP threads on a busy two-core machine spin against each other (tens of times slower); one suffices.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _teacher(name: str = "lenet5_bn", classes: int = 10) -> Teacher:
    torch.manual_seed(0)
    return Teacher(dfkd.create_model(name, num_classes=classes, in_channels=1, input_size=32), SPEC)


def _all_eval(module: nn.Module) -> bool:
    return not any(m.training for m in module.modules())


def test_frozen_by_construction():
    model = dfkd.create_model("lenet5_bn", num_classes=10, in_channels=1, input_size=32)
    assert model.training  # the zoo builds in train mode: the wrapper must change that
    t = Teacher(model, SPEC)
    assert _all_eval(t)
    assert t.train() is t and _all_eval(t)
    t.train(True)
    assert _all_eval(t)
    assert not any(p.requires_grad for p in t.parameters())


def test_train_mode_request_keeps_running_statistics():
    t = _teacher()
    before = {k: v.clone() for k, v in t.state_dict().items()}
    t.train()
    with torch.no_grad():
        t(torch.randn(4, 1, 32, 32) * 5 + 3)
    for k, v in t.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed in a forward pass"


def test_gradient_reaches_the_input_not_the_weights():
    t = _teacher()
    x = torch.randn(2, 1, 32, 32, requires_grad=True)
    t(x).logsumexp(1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in t.parameters())


@pytest.mark.parametrize("classes", [3, 10, 17])
def test_num_classes_is_read_from_the_output(classes):
    assert _teacher("lenet5", classes).num_classes == classes


def test_num_classes_of_a_user_module():
    assert Teacher(Toy(), InputSpec(1, 16, (0.5,), (0.5,))).num_classes == 4


def test_the_batch_probe_runs_in_full_fp32_and_leaves_the_settings_as_they_were():
    """On a GPU, TF32 convolutions round differently at batch 2 and 3; the probe turns TF32 off, then back on."""
    seen = []

    class Spy(Toy):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return super().forward(x)

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        Teacher(Spy(), InputSpec(1, 16, (0.5,), (0.5,)))
        assert seen and all(flags == (False, False) for flags in seen)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


class Outputs:
    """A Hugging Face-style output object: the logits as an attribute, beside other tensors."""

    def __init__(self, logits: torch.Tensor, hidden: torch.Tensor) -> None:
        self.logits, self.hidden_states = logits, hidden


@pytest.mark.parametrize("wrap", ["tuple", "list", "features first", "feature map first", "dict", "dict, other names",
                                  "attribute"])
def test_a_module_that_returns_more_than_logits_is_read_through_them(wrap):
    class Rich(Toy):
        def forward(self, x):
            fmap = torch.relu(self.bn(self.conv(x)))
            features = torch.relu(self.hidden(fmap.mean((2, 3))))
            logits = self.head(features)
            return {"tuple": lambda: (logits, features), "list": lambda: [logits, features],
                    "features first": lambda: (features, logits), "feature map first": lambda: (fmap, logits),
                    "dict": lambda: {"features": features, "logits": logits},
                    "dict, other names": lambda: {"emb": features, "out": logits},  # the head's width picks "out"
                    "attribute": lambda: Outputs(logits, features)}[wrap]()

    torch.manual_seed(0)
    rich, spec = Rich().eval(), InputSpec(1, 16, (0.5,), (0.5,))
    plain = Toy().eval()
    plain.load_state_dict(rich.state_dict())
    with pytest.warns(UserWarning,
                      match=r"returns more than \(batch, classes\) logits; .*, shape \(2, 4\), is read as the logits"):
        t = Teacher(rich, spec)
    x = torch.randn(3, 1, 16, 16)
    assert t.num_classes == 4 and torch.equal(t(x), plain(x))
    logits, features = t.forward_with_features(x)
    assert torch.equal(logits, plain(x)) and features.shape == (3, 8)


def test_a_forward_that_fixes_the_batch_size_is_named_so():
    # "does not accept inputs of shape (2, 1, 16, 16) ...; check --channels/--input-size"
    class Eight(Toy):
        def forward(self, x):
            f = torch.relu(self.bn(self.conv(x))).mean((2, 3)).view(8, 3)
            return self.head(torch.relu(self.hidden(f)))

    with pytest.raises(DfkdError, match=r"runs on batches of exactly 8 .*x\.view\(x\.size\(0\), -1\)"):
        Teacher(Eight().eval(), InputSpec(1, 16, (0.5,), (0.5,)))


def test_a_head_that_ends_in_a_1x1_convolution_is_flattened():
    # (batch, classes, 1, 1) from a fully convolutional head: "expected (batch, classes) logits"
    class ConvHead(Toy):
        def forward(self, x):
            return super().forward(x)[:, :, None, None]

    torch.manual_seed(0)
    conv, plain = ConvHead().eval(), Toy().eval()
    plain.load_state_dict(conv.state_dict())
    with pytest.warns(UserWarning, match=r"its \(batch, classes, 1, 1\) output, flattened, shape \(2, 4\), is read as"):
        t = Teacher(conv, InputSpec(1, 16, (0.5,), (0.5,)))
    x = torch.randn(3, 1, 16, 16)
    assert t.num_classes == 4 and torch.equal(t(x), plain(x))


def test_a_dict_without_logits_to_take_is_refused_with_its_keys():
    class TwoHeads(Toy):
        def forward(self, x):
            logits = super().forward(x)
            return {"coarse": logits, "fine": logits * 2}  # two (batch, 4) tensors: which is meant is unknown

    with pytest.raises(DfkdError, match=r"returns a dict \('coarse': \(2, 4\), 'fine': \(2, 4\)\) without a 'logits' "
                                        r"entry.*wrap the module"):
        Teacher(TwoHeads().eval(), InputSpec(1, 16, (0.5,), (0.5,)))


@pytest.mark.parametrize("wrap", [False, True])
def test_a_teacher_that_outputs_probabilities_is_read_through_their_log(wrap):
    """A classifier ending in a softmax (common in Keras conversions and hand-written nets) gave its probabilities
    as logits: at T = 20 their softmax is flat, and the KD signal was all but gone. Their log is read instead,
    which has the logits' softmax at every temperature, also when the probabilities sit in a tuple; a log_softmax
    head is logits already and is left alone, quietly."""

    class Probs(Toy):
        def forward(self, x):
            p = super().forward(x).softmax(1)
            return (p, x.mean((2, 3))) if wrap else p

    class LogProbs(Toy):
        def forward(self, x):
            return super().forward(x).log_softmax(1)

    torch.manual_seed(0)
    plain, spec, x = Toy().eval(), InputSpec(1, 16, (0.5,), (0.5,)), torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        z = plain(x) * 30  # confident logits: some probabilities underflow towards 0
    probs, logprobs = Probs().eval(), LogProbs().eval()
    for m in (probs, logprobs):
        m.load_state_dict(plain.state_dict())
        m.head.weight.data *= 30
        m.head.bias.data *= 30
    with pytest.warns(UserWarning, match="outputs probabilities .* dfkd reads their log as the logits"):
        t = Teacher(probs, spec)
    with torch.no_grad():
        got = t(x)
    assert t.num_classes == 4 and torch.allclose(got, z.log_softmax(1), atol=1e-4)
    for temperature in (1.0, 20.0):
        assert torch.allclose((got / temperature).softmax(1), (z / temperature).softmax(1), atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = Teacher(logprobs, spec)
    with torch.no_grad():
        assert torch.allclose(quiet(x), z.log_softmax(1), atol=1e-4)


def test_a_teacher_that_gives_an_image_other_logits_alone_than_in_a_batch_is_refused():
    class Lonely(Toy):
        def forward(self, x):
            return super().forward(x) * (2 if len(x) == 1 else 1)

    class Squeezer(Toy):  # a common forward: at batch 1 it gives (K,), and it runs on batches of two or more
        def forward(self, x):
            return super().forward(x).squeeze()

    with pytest.raises(DfkdError, match="gives an image other logits in a batch of 2 than alone"):
        Teacher(Lonely().eval(), InputSpec(1, 16, (0.5,), (0.5,)))
    assert Teacher(Squeezer().eval(), InputSpec(1, 16, (0.5,), (0.5,))).num_classes == 4


def test_bad_output_shapes_are_refused():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x.mean((1, 2, 3))  # no (batch, classes) tensor in it

    class Flat(nn.Module):
        def forward(self, x):
            return x.mean((1, 2, 3))

    with pytest.raises(DfkdError, match=r"returns a tuple without a \(batch, classes\) tensor in it"):
        Teacher(Pair(), SPEC)
    with pytest.raises(DfkdError, match=r"returns shape \(2,\), expected \(batch, classes\)"):
        Teacher(Flat(), SPEC)


def test_a_teacher_that_takes_flattened_vectors_is_told_how_to_wrap_it():
    # an MLP whose training code flattened its batches: Linear(784, ...) first, no flatten in its forward
    class FlatMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(784, 16), nn.Linear(16, 10)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    class Flat(FlatMLP):
        def forward(self, x):
            return super().forward(x.flatten(1))

    spec = InputSpec(1, 28, (0.5,), (0.5,))
    with pytest.raises(DfkdError, match=r"its first layer is a Linear of 784 inputs: it takes flattened vectors, "
                                        r"and dfkd gives images \(1 x 28 x 28\); .*class Flat\(FlatMLP\)"):
        Teacher(FlatMLP().eval(), spec)
    assert Teacher(Flat().eval(), spec).num_classes == 10  # the wrap the message gives works
    with pytest.raises(DfkdError, match="check --channels/--input-size .* or the architecture"):
        Teacher(FlatMLP().eval(), InputSpec(1, 32, (0.5,), (0.5,)))  # 1024 inputs: not this model's 784


def test_bn_paths():
    assert _teacher("lenet5_bn").bn_paths() == ["stage1.1", "stage2.1", "stage3.1"]
    assert _teacher("lenet5").bn_paths() == []
    assert batchnorm_paths(Toy()) == ["bn"]


def test_paths_for_zoo_and_user_models():
    t = _teacher()
    assert t.penultimate_path() == "classifier"
    assert t.stage_paths() == ["stage1", "stage2", "stage3"]
    assert isinstance(t.module_at("stage2.1"), nn.BatchNorm2d)
    toy = Teacher(Toy(), InputSpec(1, 16, (0.5,), (0.5,)))
    assert toy.penultimate_path() == "head" and toy.stage_paths() == []


def test_penultimate_tap_reads_the_features():
    t = _teacher()
    x = torch.randn(3, 1, 32, 32)
    with t.tap([t.penultimate_path()]) as taps:
        with torch.no_grad():
            t(x)
        feats = taps.inputs["classifier"]
    m = t.module
    with torch.no_grad():
        assert torch.allclose(feats, m.fc(m.forward_features(x)), atol=1e-6)
    assert feats.shape == (3, 84)


def _hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in module.modules())


def test_feature_taps_record_by_path_and_remove_their_hooks():
    t = _teacher()
    paths = t.bn_paths()
    x = torch.randn(2, 1, 32, 32)
    with t.tap([*paths, "stage1", "stage2.0"], inputs=True, outputs=True) as taps:
        assert _hook_count(t) == len(paths) + 2
        with torch.no_grad():
            t(x)
            conv1 = t.module.stage1[0](x)
        assert set(taps.inputs) == set(taps.outputs) == {*paths, "stage1", "stage2.0"}
        for p in paths:
            assert taps.inputs[p].shape[1] == t.module_at(p).num_features
        assert torch.allclose(taps.inputs["stage1.1"], conv1)  # a BatchNorm's input is its convolution's output
        assert torch.equal(taps.outputs["stage1"], taps.inputs["stage2.0"])  # one block's output feeds the next
    assert _hook_count(t) == 0
    assert taps.inputs == {} and taps.outputs == {}


def test_feature_taps_outputs_only_and_inactive():
    model = Toy().eval()
    with FeatureTaps(model, ["conv", "hidden"], inputs=False, outputs=True) as taps:
        model(torch.randn(2, 1, 16, 16))
        assert taps.inputs == {} and taps.outputs["hidden"].shape == (2, 8)
        taps.clear()
        taps.active = False
        model(torch.randn(2, 1, 16, 16))
        assert taps.outputs == {}
    assert _hook_count(model) == 0


def test_feature_taps_removed_when_the_block_raises():
    model = Toy()
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureTaps(model, ["bn"]):
            raise RuntimeError("boom")
    assert _hook_count(model) == 0


def test_feature_taps_unknown_path():
    with pytest.raises(KeyError, match="nope"):
        FeatureTaps(Toy(), ["bn", "nope"])


@pytest.fixture
def scripted(tmp_path):
    path = tmp_path / "toy_ts.pt"
    torch.jit.script(Toy().eval()).save(str(path))
    return dfkd.load_teacher(path, spec=InputSpec(1, 16, (0.5,), (0.5,)))


def test_torchscript_teacher_has_no_hooks(scripted):
    assert scripted.fmt == "torchscript" and not scripted.hookable
    assert scripted.num_classes == 4
    assert scripted.bn_paths() == [] and scripted.penultimate_path() is None and scripted.stage_paths() == []
    with pytest.raises(DfkdError, match="no module hooks") as e:
        scripted.tap(["bn"])
    assert "toy_ts.pt" in str(e.value) and "state_dict" in str(e.value)


def test_torchscript_teacher_is_frozen_and_passes_gradients(scripted):
    scripted.train()
    assert _all_eval(scripted)
    assert not any(p.requires_grad for p in scripted.parameters())
    x = torch.randn(2, 1, 16, 16, requires_grad=True)
    scripted(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in scripted.parameters())


def test_a_user_teachers_plain_pools_get_the_fast_forward_with_the_same_outputs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 14 * 14, 10))
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        want = net(x)
    teacher = Teacher(net, SPEC, fmt="state_dict")
    assert type(teacher.module[2]).__name__ == "MaxPool2"
    with torch.no_grad():
        assert torch.equal(teacher(x), want)
    xg = x.clone().requires_grad_()
    teacher(xg).sum().backward()  # the input gradient still flows (the library kernel under autograd)
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_a_teacher_of_huge_inputs_is_said_to_cost_before_its_first_forward() -> None:
    # --input-size 4000 on a ResNet-18: minutes and 7 GB in the probe forwards, with nothing said
    pooled = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))
    for side, said in ((1100, True), (1024, False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Teacher(pooled, InputSpec(3, side, (0.5,), (0.25,)), source="big.pt")
        notes = [str(w.message) for w in caught if "times the pixels of a 224-px image" in str(w.message)]
        assert notes == ([f"--teacher big.pt: it takes 3x{side}x{side} inputs, 24 times the pixels of a 224-px "
                          "image; its first forwards (batches of 2 and 3, to read its classes) and every step cost "
                          "about that much more compute and memory"] if said else [])
