"""NAYER: noisy-layer generator and losses by hand, the round schedule, recipes, label embeddings, learning."""

from __future__ import annotations

import copy
import json
import math
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from dfkd.cli.main import main
from dfkd.errors import DfkdError
from dfkd.generators.noisy import NoisyLayerGenerator, fixed_class_embeddings, nayer_targets, text_class_embeddings
from dfkd.methods import get_method
from dfkd.spec import CIFAR10_SPEC, MNIST_SPEC, InputSpec
from dfkd.students import build_student
from dfkd.teacher import Teacher
from tests.conftest import KWARGS, assert_learns_on_pool_images, make_teacher_module, synthesis_losses

NAYER = get_method("nayer")
TINY = InputSpec(1, 4, (0.5,), (0.5,))


def build(seed: int = 0, sharp: bool = False, teacher: Teacher | None = None, student: nn.Module | None = None,
          **over):
    torch.manual_seed(seed)
    if teacher is None:
        module = make_teacher_module()
        if sharp:  # a random teacher is nearly uniform; larger logits give the student something to learn
            with torch.no_grad():
                module.classifier.weight.mul_(30)
        teacher = Teacher(module, MNIST_SPEC, arch="lenet5_bn", arch_kwargs=KWARGS)
    params = {**NAYER.default_params(teacher), **NAYER.quick, **over}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return NAYER(teacher, student or build_student("lenet5_half", KWARGS), params, torch.device("cpu"))


# --- generator pieces ---------------------------------------------------------------------------------------------
def test_targets_are_chunks_of_every_class_then_random() -> None:
    torch.manual_seed(0)
    y = nayer_targets(23, 10)
    assert y.tolist()[:20] == list(range(10)) * 2 and len(y) == 23 and all(0 <= v < 10 for v in y[20:].tolist())
    assert nayer_targets(20, 10).tolist() == list(range(10)) * 2


def test_noisy_layer_generator_by_hand() -> None:
    """BatchNorm1d over the batch's label embeddings, then chunk i of K samples through noisy layer i (K-to-1)."""
    torch.manual_seed(0)
    emb = torch.randn(3, 5, dtype=torch.float64).float()
    g = NoisyLayerGenerator(TINY, emb, le_emb_size=4, ngf=2, batch_size=7)
    assert len(g.noisy) == 3  # ceil(7 / 3): one layer for each chunk of K = 3 samples
    seen = {}
    g.body.register_forward_pre_hook(lambda m, args: seen.setdefault("v", args[0].detach().clone()))
    y = torch.tensor([0, 1, 2, 0, 1, 2, 1])
    out = g(y)
    e = emb[y].double().numpy()
    e = (e - e.mean(0)) / np.sqrt(e.var(0) + 1e-5)  # BatchNorm1d in training mode: biased variance
    want = np.concatenate([e[i * 3:(i + 1) * 3] @ g.noisy[i].weight.double().detach().numpy().T
                           + g.noisy[i].bias.double().detach().numpy() for i in range(3)])
    assert np.allclose(seen["v"].double().numpy(), want, atol=1e-5)
    assert out.shape == (7, 1, 4, 4)
    with pytest.raises(ValueError, match="noisy layers"):
        g(torch.zeros(10, dtype=torch.long))


def test_noisy_layers_redrawn_standard_normal_and_reset_all_is_fresh() -> None:
    torch.manual_seed(0)
    g = NoisyLayerGenerator(MNIST_SPEC, fixed_class_embeddings(10, 64), 128, 8, 64)
    g.reset_noisy()
    w0 = g.noisy[0].weight.detach().clone()
    assert w0.std().item() == pytest.approx(1.0, abs=0.05) and torch.all(g.noisy[0].bias == 0)
    g.reset_noisy()
    assert not torch.equal(w0, g.noisy[0].weight)
    with torch.no_grad():
        g.body.l1.weight.fill_(3.0)
        g.body.bn0.running_mean.fill_(2.0)
    g.reset_all()
    assert g.body.l1.weight.abs().max() < 1 and torch.all(g.body.bn0.running_mean == 0)
    assert torch.equal(g.label_emb, fixed_class_embeddings(10, 64))  # the embeddings are not learned or reset


# --- the synthesis objective by hand ------------------------------------------------------------------------------
def tiny_teacher() -> Teacher:
    torch.manual_seed(1)
    bn = nn.BatchNorm1d(16)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return Teacher(nn.Sequential(nn.Flatten(), bn, nn.Linear(16, 3)), TINY)


def objective_by_hand(x: np.ndarray, y: np.ndarray, teacher: Teacher, student: nn.Module, w: dict, adv_on: bool):
    f = x.reshape(len(x), -1)
    bn = teacher.module[1]
    rm, rv = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    mu, var = f.mean(0), f.var(0)
    r_bn = np.linalg.norm(var - rv) + np.linalg.norm(mu - rm)
    with torch.no_grad():
        t = teacher(torch.tensor(x).float()).double().numpy()
        s = student(torch.tensor(x).float()).double().numpy()

    def log_softmax(a):
        return a - a.max(1, keepdims=True) - np.log(np.exp(a - a.max(1, keepdims=True)).sum(1, keepdims=True))

    ce = -log_softmax(t)[np.arange(len(y)), y].mean()
    pt, lt, ls = np.exp(log_softmax(t)), log_softmax(t), log_softmax(s)
    kl = (pt * (lt - ls)).sum(1)
    agree = (t.argmax(1) == s.argmax(1)).astype(float)
    adv = -(kl * agree).mean() if adv_on else 0.0
    return w["bn"] * r_bn + w["oh"] * ce + w["adv"] * adv, r_bn, ce, adv


@pytest.mark.parametrize("warm", [True, False])
def test_synthesis_objective_hand_computed(warm: bool) -> None:
    teacher = tiny_teacher()
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    m = build(teacher=teacher, student=student, warmup_rounds=1 if warm else 0, adv=1.33, bn=10.0, oh=0.5,
              synth_batch_size=6, le_size=8, le_emb_size=8, ngf=4)
    m.augment = nn.Identity()  # views as they are, so the hand computation sees the same inputs
    torch.manual_seed(3)
    x = torch.randn(6, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    m.bn.set_active(True)
    losses, _ = m.objective(x, y)
    m.bn.set_active(False)
    want, r_bn, ce, adv = objective_by_hand(x.double().numpy(), y.numpy(), teacher, student,
                                            {"bn": 10.0, "oh": 0.5, "adv": 1.33}, adv_on=not warm)
    assert losses["loss/bn"].item() == pytest.approx(r_bn, rel=1e-5)
    assert losses["loss/oh"].item() == pytest.approx(ce, rel=1e-5)
    assert losses["loss/adv"].item() == pytest.approx(adv, rel=1e-5, abs=1e-7)
    assert losses["loss"].item() == pytest.approx(want, rel=1e-5)
    if not warm:
        assert adv < 0  # a random student agrees with the teacher on some samples: the term is live
    m.close()


def test_bn_ema_follows_each_batch() -> None:
    m = build(g_loops=2, g_steps=2)
    assert m.ema is None
    m.synthesize()
    assert m.ema is not None and len(m.ema) == 3 and all(torch.isfinite(a).all() for pair in m.ema for a in pair)
    m.close()


# --- the round schedule -------------------------------------------------------------------------------------------
def test_warmup_rounds_no_student_steps_then_kd_and_generator_life() -> None:
    m = build(warmup_rounds=2, gwp_loops=3, g_loops=1, g_life=3, s_steps=2, synth_batch_size=10)
    resets, noisy = [], []
    reset_all, reset_noisy = m.generator.reset_all, m.generator.reset_noisy
    m.generator.reset_all = lambda: (resets.append(m.rounds), reset_all())[1]
    m.generator.reset_noisy = lambda: (noisy.append(m.rounds), reset_noisy())[1]
    student0 = copy.deepcopy(m.student.state_dict())
    for r in range(2):
        assert m.student_steps_per_round == 0
        assert m.waiting() is not None and m.waiting().startswith(f"warm-up round {r + 1}/2")  # the bar says it
        logs = m.round()
        assert len(m.pool) == 10 * 3 * (r + 1) and logs["gen/adv"] == 0.0 and "student/total" not in logs
        assert len(m.last_images) == 30  # all of the round's batches
    assert all(torch.equal(v, m.student.state_dict()[k]) for k, v in student0.items())
    for _ in range(5):
        assert m.student_steps_per_round == 2 and m.waiting() is None
        logs = m.round()
        assert "student/total" in logs and math.isfinite(logs["gen/adv"])
    assert len(m.pool) == 60 + 5 * 10
    assert noisy == [0, 0, 0, 1, 1, 1, 2, 3, 4, 5, 6]  # re-drawn before every batch
    assert resets == [0, 2, 3, 5, 6]  # (round - warmup) % g_life == 0 or round % g_life == 0
    m.close()


def test_state_round_trip_mid_warmup_through_weights_only_file(tmp_path: Path) -> None:
    a = build(seed=1, warmup_rounds=2, gwp_loops=2)
    a.round()
    torch.save(a.state_dict(), tmp_path / "s.pt")
    b = build(seed=2, warmup_rounds=2, gwp_loops=2)
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert b.rounds == 1 and torch.equal(a.generator.label_emb, b.generator.label_emb)
    for _ in range(2):
        torch.manual_seed(5)
        la = a.round()
        torch.manual_seed(5)
        assert b.round() == la
    for k, v in a.student.state_dict().items():
        assert torch.equal(v, b.student.state_dict()[k]), k
    a.close(), b.close()


# --- recipes ------------------------------------------------------------------------------------------------------
#: The reference's CIFAR-10 values (tmtuan1307/NAYER `scripts/nayer_100.sh`, `datafree_kd.py`).
PAPER_CIFAR10 = {"batch_size": 512, "synth_batch_size": 400, "lr_s": 0.2, "weight_decay": 1e-4, "momentum": 0.9,
                 "schedule": "cosine", "T": 20.0, "s_steps": 400, "g_steps": 30, "lr_g": 4e-3, "adv": 1.33,
                 "bn": 10.0, "oh": 0.5, "bn_mmt": 0.9, "warmup_rounds": 20, "g_loops": 2, "gwp_loops": 10,
                 "g_life": 10, "le_emb_size": 1000, "le_size": 512, "ngf": 64, "betas_g": [0.5, 0.999],
                 "pool_size": 160_000}


def test_recipe_paper_pins_the_reference_values(tiny_teacher: Teacher) -> None:
    cpu = NAYER.default_params(tiny_teacher)  # a LeNet on MNIST: the CPU recipe by default
    assert (cpu["recipe"], cpu["synth_batch_size"], cpu["g_steps"], cpu["ngf"]) == ("cpu", 64, 10, 16)
    assert cpu == {**NAYER.default_params(tiny_teacher, "paper"), **NAYER.cpu, "recipe": "cpu"}
    for teacher in (tiny_teacher, None):
        p = NAYER.finalize(NAYER.default_params(teacher, "paper"))
        assert p["recipe"] == "paper" and {k: p[k] for k in PAPER_CIFAR10} == PAPER_CIFAR10
    with pytest.raises(DfkdError, match="recipe=auto: use paper or cpu"):
        NAYER.default_params(tiny_teacher, "auto")


def test_paper_settings_by_input_kind_and_classes() -> None:
    def linear(spec: InputSpec, classes: int) -> Teacher:
        d = spec.channels * spec.size * spec.size
        return Teacher(nn.Sequential(nn.Flatten(), nn.Linear(d, 300_000 // d + 1), nn.Linear(300_000 // d + 1,
                                                                                              classes)), spec)

    assert NAYER.default_params(linear(CIFAR10_SPEC, 10))["g_steps"] == 30  # not LeNet-scale: the paper's
    assert NAYER.default_params(linear(CIFAR10_SPEC, 100))["g_steps"] == 40  # CIFAR-100
    tiny_in = NAYER.paper_params(linear(InputSpec(3, 64, (0.5,) * 3, (0.5,) * 3), 200))
    assert (tiny_in["batch_size"], tiny_in["synth_batch_size"], tiny_in["g_steps"], tiny_in["g_loops"],
            tiny_in["gwp_loops"], tiny_in["s_steps"], tiny_in["lr_s"]) == (256, 200, 60, 4, 20, 1000, 0.1)
    big = NAYER.paper_params(linear(InputSpec(3, 224, (0.5,) * 3, (0.5,) * 3), 1000))
    assert big["batch_size"] == big["synth_batch_size"] == 64


def test_cli_recipe_paper_resolved_in_config_json_and_startup_line(teacher_file: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    quick = ["warmup_rounds=0", "g_steps=1", "synth_batch_size=10", "batch_size=8", "s_steps=1", "le_emb_size=8",
             "ngf=4", "select_every=0"]
    args = ["distill", "--teacher", teacher_file, "--method", "nayer", "--steps", "1", "--out", str(out),
            "-p", "recipe=paper", *[a for kv in quick for a in ("-p", kv)]]
    with pytest.warns(UserWarning, match="nayer: label embeddings are fixed random class vectors"):
        res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "recipe: paper (set by recipe=paper)" in res.output  # the start-up lines
    assert "kept deviation: label embeddings are fixed random class vectors" in res.output
    params = json.loads((out / "config.json").read_text())["params"]
    assert (params["lr_s"], params["adv"], params["bn"], params["oh"], params["lr_g"], params["gwp_loops"]) == \
        (0.2, 1.33, 10.0, 0.5, 4e-3, 10)
    assert (params["g_steps"], params["synth_batch_size"], params["ngf"]) == (1, 10, 4)  # the user's, kept
    assert None not in (params["ngf"], params["synth_batch_size"])
    shown = CliRunner().invoke(main, ["methods", "--params", "nayer"]).output
    assert "fixed random" in shown and "text_encoder   'none'" in shown and "recipe         'paper'" in shown


# --- label embeddings ---------------------------------------------------------------------------------------------
def test_fixed_embeddings_are_fixed_and_distinct() -> None:
    a, b = fixed_class_embeddings(10), fixed_class_embeddings(10)
    assert a.shape == (10, 512) and torch.equal(a, b)
    cos = torch.nn.functional.cosine_similarity(a[:, None], a[None], dim=2)
    assert (cos - torch.eye(10)).abs().max() < 0.3


def test_local_sentence_encoder_is_used_offline(monkeypatch: pytest.MonkeyPatch, tiny_teacher: Teacher) -> None:
    seen = {}

    class FakeEncoder:
        def __init__(self, name: str, device: str) -> None:
            import os

            seen["name"], seen["offline"] = name, os.environ.get("HF_HUB_OFFLINE")

        def encode(self, prompts: list[str], convert_to_numpy: bool) -> np.ndarray:
            seen["prompts"] = prompts
            return np.arange(len(prompts) * 6, dtype=np.float32).reshape(len(prompts), 6)

    monkeypatch.setitem(sys.modules, "sentence_transformers", types.SimpleNamespace(SentenceTransformer=FakeEncoder))
    names = [f"digit_{i}" for i in range(10)]
    m = build(text_encoder="sentence-transformers:/models/mini", class_names=names)
    assert seen == {"name": "/models/mini", "offline": "1", "prompts": [f"a image of digit {i}" for i in range(10)]}
    assert m.p["le_size"] == 6 and m.generator.label_emb.shape == (10, 6)
    assert math.isfinite(m.round()["gen/total"])
    m.close()


def test_local_open_clip_weights_file_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    weights = tmp_path / "vit_b_32.bin"
    weights.write_bytes(b"0")
    seen = {}

    class FakeClip:
        def eval(self):  # noqa: ANN202
            return self

        def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
            return tokens.double() * 2

    def create_model(name: str, pretrained: str) -> FakeClip:
        seen["model"] = (name, pretrained)
        return FakeClip()

    def get_tokenizer(name: str):  # noqa: ANN202
        return lambda prompts: (seen.setdefault("prompts", prompts), torch.ones(len(prompts), 3))[1]

    monkeypatch.setitem(sys.modules, "open_clip", types.SimpleNamespace(create_model=create_model,
                                                                        get_tokenizer=get_tokenizer))
    emb = text_class_embeddings(f"open_clip:ViT-B-32:{weights}", ["sea-lion", "cat"])
    assert seen == {"model": ("ViT-B-32", str(weights)), "prompts": ["a image of sea lion", "a image of cat"]}
    assert emb.dtype == torch.float32 and torch.equal(emb, torch.full((2, 3), 2.0))


def test_text_encoder_mistakes_are_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import fails as if not installed
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"0")
    with pytest.raises(DfkdError, match=r"open_clip_torch is not installed; pip install 'dfkd\[text\]'"):
        text_class_embeddings(f"open_clip:ViT-B-32:{weights}", ["a", "b"])
    with pytest.raises(DfkdError, match="give the weights file"):  # a tag would download
        text_class_embeddings("open_clip:ViT-B-32:openai", ["a", "b"])
    with pytest.raises(DfkdError, match="use none, open_clip"):
        text_class_embeddings("clip", ["a"])
    with pytest.raises(DfkdError, match="needs 10 class names"):
        build(text_encoder="open_clip:ViT-B-32:openai")


# --- learning -----------------------------------------------------------------------------------------------------
def test_student_learns_the_teacher_on_pool_images() -> None:
    m = build(sharp=True, synth_batch_size=20, batch_size=16, s_steps=8, lr_s=0.05)
    assert_learns_on_pool_images(m)


def test_synthesis_loss_goes_down_within_a_batch() -> None:
    m = build(g_steps=8)
    seen = synthesis_losses(m)
    assert len(seen) == 8 and min(seen[4:]) < seen[0]
    m.close()
