"""`-p recipe=paper` gives each method's paper settings; the CPU recipe is chosen by documented teacher properties.

The values below are the papers' and reference code's, as each method's docstring cites them: DAFL huawei-noah
`DAFL-train.py` + README (MNIST / CIFAR-10), DFAD VainF `DFAD_mnist.py` / `DFAD_cifar.py`, ZSKT polo5 `main.py` /
`solver.py`, DFQ zju-vipa `scripts/dfq_cifar.sh`, DeepInversion NVlabs `cifar10/deepinversion_cifar10.py` ("paper
parameters") + maintainers' KD protocol (#6, #9) + zju-vipa student side, ZeroQ amirgholami `distill_data.py`,
ZSKD vcl-iisc `cifar_10_impressions_alexnet_Dirch.py` / `train.py`, CMI zju-vipa `cmi_cifar10.sh`, Fast-DFKD
zju-vipa `scripts/fast_cifar.sh` (Fast-5, WRN pairs), KD mdistiller, AFD (online) on DFAD's.
"""

from __future__ import annotations

import pytest
from torch import nn

from dfkd.cost import multiply_adds
from dfkd.methods import get_method, list_methods
from dfkd.methods._recipes import CPU_TEACHER_MACS, cpu_teacher, why_recipe
from dfkd.spec import CIFAR10_SPEC, MNIST_SPEC, InputSpec
from dfkd.teacher import Teacher, teacher_size

DI_PAPER = {"batch_size": 256, "synth_batch_size": 256, "iterations": 2000, "lr_inv": 0.05,
            "betas_inv": [0.9, 0.999], "inv_schedule": "constant", "warmup": 0.0, "clip": False, "bn": 10.0,
            "first_bn": 1.0, "oh": 1.0, "tv_l1": 0.0, "tv_l2": 2.5e-5, "l2": 0.0, "jitter": 2, "flip_p": 0.0,
            "lowres": 0.0, "T": 3.0, "s_steps": 50, "pool_size": 256_000, "s_optimizer": "sgd", "lr_s": 0.1,
            "weight_decay": 1e-4, "schedule": "cosine", "kd_augment": "crop_flip"}
DFAD_MNIST = {"batch_size": 512, "s_optimizer": "sgd", "lr_s": 0.01, "momentum": 0.9, "weight_decay": 1e-4,
              "lr_g": 1e-3, "nz": 100, "ngf": 64, "head": "tanh_bn", "s_steps": 5, "g_steps": 1,
              "schedule": "constant"}
DFAD_CIFAR = {"batch_size": 256, "lr_s": 0.1, "weight_decay": 5e-4, "lr_g": 1e-3, "nz": 256, "ngf": 64,
              "schedule": "multistep", "milestones": [0.2, 0.4], "gamma": 0.1, "s_steps": 5}

#: method -> (paper settings for an MNIST-kind teacher, for a CIFAR-kind teacher).
PAPER: dict[str, tuple[dict, dict]] = {
    "dafl": ({"batch_size": 512, "lr_g": 0.2, "s_optimizer": "adam", "lr_s": 2e-3, "weight_decay": 0.0, "nz": 100,
              "ngf": 64, "bn_eps": 0.8, "oh": 1.0, "ie": 5.0, "a": 0.1, "ie_log_base": 10.0, "T": 1.0,
              "schedule": "constant"},
             {"batch_size": 1024, "nz": 1000, "ngf": 64, "lr_g": 0.02, "s_optimizer": "sgd", "lr_s": 0.1,
              "weight_decay": 5e-4, "schedule": "multistep", "milestones": [0.4, 0.8], "oh": 0.05, "ie": 5.0,
              "a": 0.01}),
    "dfad": (DFAD_MNIST, DFAD_CIFAR),
    "online": ({**DFAD_MNIST, "mutual": 1.0, "adv": 1.0}, {**DFAD_CIFAR, "adv": 1.0}),
    "zskt": ({"batch_size": 128, "s_optimizer": "adam", "lr_s": 2e-3, "weight_decay": 0.0, "lr_g": 1e-3,
              "nz": 100, "ngf": 64, "head": "bn", "schedule": "cosine", "grad_clip": 5.0, "g_steps": 1,
              "s_steps": 10, "at_beta": 250.0},) * 2,
    "dfq": ({"batch_size": 256, "s_optimizer": "sgd", "lr_s": 0.1, "weight_decay": 1e-4, "schedule": "cosine",
             "lr_g": 1e-3, "betas_g": [0.5, 0.999], "nz": 256, "ngf": 64, "head": "sigmoid", "g_steps": 1,
             "s_steps": 10, "adv": 1.0, "bn": 1.0, "oh": 1.0, "balance": 20.0, "bn_form": "di"},) * 2,
    "deepinversion": (DI_PAPER, DI_PAPER),
    "adi": ({**DI_PAPER, "adi": 0.2, "adi_T": 3.0},) * 2,
    "zeroq": ({"synth_batch_size": 64, "iterations": 500, "lr_inv": 0.5, "betas_inv": [0.9, 0.999],
               "inv_schedule": "plateau", "plateau_patience": 100, "plateau_min_lr": 1e-4, "init": "zeroq",
               "jitter": 0, "clip": False, "warmup": 0.0, "bn": 1.0, "input": 1.0, "oh": 0.0, "lr_s": 0.1,
               "weight_decay": 1e-4, "kd_augment": "crop_flip"},) * 2,
    "zskd": ({"di_batch": 100, "di_iters": 1500, "lr_di": 1e-3, "di_T": 20.0, "betas": [1.0, 0.1], "T": 20.0,
              "s_optimizer": "adam", "lr_s": 1e-3, "weight_decay": 0.0, "batch_size": 64, "pool_size": 24_000},
             {"di_batch": 100, "di_iters": 1500, "lr_di": 1e-3, "T": 20.0, "pool_size": 40_000, "flip_p": 0.5}),
    "cmi": ({"batch_size": 256, "synth_batch_size": 256, "g_steps": 200, "lr_g": 1e-3, "betas_g": [0.5, 0.999],
             "adv": 0.5, "bn": 1.0, "oh": 1.0, "cr": 0.8, "cr_T": 0.2, "s_steps": 400, "lr_s": 0.1,
             "weight_decay": 1e-4, "schedule": "cosine", "nz": 256, "ngf": 64, "bank_size": 40960,
             "n_neg": 4096, "T": 20.0},) * 2,
    "fast": ({"batch_size": 256, "synth_batch_size": 256, "lr_s": 0.2, "weight_decay": 1e-4, "schedule": "cosine",
              "g_steps": 5, "s_steps": 400, "lr_g": 3e-3, "lr_z": 0.01, "lr_meta": 3e-3 * 5, "adv": 1.1,
              "oh": 0.4, "bn": 10.0, "bn_mmt": 0.9, "is_maml": 1, "nz": 256, "ngf": 64, "T": 20.0,
              "warmup": 20 / 220},) * 2,
    "kd": ({"T": 4.0, "kd": 0.9, "ce": 0.1, "batch_size": 64, "lr_s": 0.05, "weight_decay": 5e-4,
            "schedule": "multistep", "milestones": [0.625, 0.75, 0.875]},) * 2,
    "transfer": ({"batch_size": 64, "s_optimizer": "adam", "lr_s": 1e-3, "schedule": "cosine", "T": 4.0},) * 2,
    # Gupta et al. regress features; dfkd's logit KD on the pairs trains like `kd` (mdistiller's recipe).
    "crossmodal": ({"T": 4.0, "kd": 1.0, "batch_size": 64, "lr_s": 0.05, "weight_decay": 5e-4,
                    "schedule": "multistep", "milestones": [0.625, 0.75, 0.875]},) * 2,
}


def linear_teacher(spec: InputSpec, params: int) -> Teacher:
    """A classifier of about `params` parameters on `spec` inputs (recipes read the spec and the size only)."""
    n = spec.channels * spec.size * spec.size
    width = max(1, params // n)
    return Teacher(nn.Sequential(nn.Flatten(), nn.Linear(n, width), nn.Linear(width, 10)), spec)


LENET = linear_teacher(MNIST_SPEC, 60_000)  # like LeNet-5 (62K): the CPU recipe's home
WRN16_1 = linear_teacher(CIFAR10_SPEC, 175_000)  # like the shipped CIFAR WRN-16-1 (175K)
BIG_MNIST = linear_teacher(MNIST_SPEC, 8_000_000)  # 8M multiply-adds: past every teacher the CPU recipe knows


def resolved(name: str, teacher: Teacher | None, recipe: str | None = None) -> dict:
    cls = get_method(name)
    return cls.finalize(cls.default_params(teacher, recipe))


@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipe_paper_gives_the_papers_settings(name: str) -> None:
    mnist, cifar = PAPER[name]
    for teacher, want in ((LENET, mnist), (None, mnist), (WRN16_1, cifar)):
        p = resolved(name, teacher, "paper")
        assert p["recipe"] == "paper"
        assert {k: p[k] for k in want} == want, (name, teacher)


def test_every_method_has_its_paper_settings_pinned() -> None:
    missing = sorted(set(list_methods()) - set(PAPER) - {"nayer"})  # nayer pins its own (tests/methods)
    assert not missing, f"add the paper settings of {missing} to PAPER"


def test_the_cpu_recipe_is_chosen_by_input_kind_and_cost_not_size_alone() -> None:
    assert multiply_adds(WRN16_1) < CPU_TEACHER_MACS  # as cheap as a LeNet, but CIFAR inputs
    assert multiply_adds(LENET) < CPU_TEACHER_MACS < multiply_adds(BIG_MNIST)
    assert cpu_teacher(LENET) and not cpu_teacher(WRN16_1) and not cpu_teacher(BIG_MNIST)
    for name in PAPER:
        cls = get_method(name)
        assert cls.default_params(WRN16_1)["recipe"] == "paper", name
        assert cls.default_params(LENET)["recipe"] == ("cpu" if cls.cpu_params(LENET) else "paper"), name
        assert resolved(name, WRN16_1) == resolved(name, WRN16_1, "paper"), name


def test_a_cpu_recipe_that_only_changes_a_steps_cost_stays_on_a_heavy_mnist_kind_teacher() -> None:
    # Fashion-MNIST WRN-16-2 (101M multiply-adds), 5 CPU-minutes: dfq 14.1 -> 79.8 % of the teacher with its CPU
    # recipe, fast 68.1 -> 80.3; DeepInversion's LeNet priors fell 23.4 -> 14.3, ZeroQ's 30.5 -> 11.1
    heavy = {n for n in list_methods() if get_method(n).default_params(BIG_MNIST)["recipe"] == "cpu"}
    assert heavy == {"cmi", "dafl", "dfad", "dfq", "fast", "nayer", "zskd", "zskt"}
    assert all(get_method(n).cpu_any_cost for n in heavy)
    for name in ("deepinversion", "adi", "zeroq", "online"):
        assert get_method(name).default_params(BIG_MNIST)["recipe"] == "paper", name
        assert get_method(name).default_params(LENET)["recipe"] == "cpu", name
    assert get_method("dfq").default_params(WRN16_1)["recipe"] == "paper"  # CIFAR kind: the paper's, any method
    dfq, di = get_method("dfq"), get_method("deepinversion")
    assert "changes only what a step costs" in why_recipe(dfq, BIG_MNIST, None)
    assert "settings fitted to MNIST-kind teachers of <= 5M" in why_recipe(di, BIG_MNIST, None)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipe_cpu_is_the_paper_plus_the_cpu_settings(name: str) -> None:
    cls = get_method(name)
    paper, cpu = cls.default_params(LENET, "paper"), cls.default_params(LENET, "cpu")
    assert cpu == {**paper, **cls.cpu_params(LENET), "recipe": "cpu"}
    if cls.cpu_params(LENET):
        assert cls.cpu_reason, f"{name}: say why the CPU recipe departs from the paper"


@pytest.mark.parametrize("name", sorted(PAPER))
def test_resolved_settings_hold_no_value_chosen_later(name: str) -> None:
    for teacher in (LENET, WRN16_1, None):
        p = resolved(name, teacher)
        for key in ("ngf", "synth_batch_size", "lr_meta"):
            assert p.get(key, 0) is not None, (name, key)


def test_a_wrong_recipe_name_is_refused() -> None:
    from dfkd.errors import DfkdError

    with pytest.raises(DfkdError, match="recipe=fast: use paper or cpu"):
        get_method("dfad").default_params(LENET, "fast")


def test_objective_weights_are_resolved_to_each_papers_weight() -> None:
    dfad = get_method("dfad")
    p = dfad.finalize({**dfad.default_params(LENET), "feature_loss": ["at", "rkd"]})
    assert p["feature_weight"] == {"at": 500.0, "rkd": 25.0}  # Zagoruyko & Komodakis' 1000/2, Park et al.'s 25
    assert dfad.finalize({**dfad.default_params(LENET), "feature_loss": "sp", "feature_weight": 7.0})[
        "feature_weight"] == 7.0
    assert dfad.finalize(dfad.default_params(LENET))["feature_weight"] is None  # no objective: nothing to weigh


def test_the_cpu_line_counts_a_forward_pass_not_parameters() -> None:
    # A Fashion-MNIST CNN whose parameters sit in its linear head (~200K, 1.2M multiply-adds) is cheap: CPU recipe.
    # A narrow conv net at full resolution has few parameters and many multiply-adds: the paper's recipe.
    head_heavy = Teacher(nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.MaxPool2d(4), nn.Flatten(),
                                       nn.Linear(16 * 8 * 8, 256), nn.Linear(256, 10)), MNIST_SPEC)
    wide_convs = Teacher(nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1),
                                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)), MNIST_SPEC)
    assert teacher_size(head_heavy) > 200_000 and cpu_teacher(head_heavy)
    assert teacher_size(wide_convs) < 50_000 and not cpu_teacher(wide_convs)
    assert get_method("deepinversion").default_params(head_heavy)["recipe"] == "cpu"
    assert get_method("deepinversion").default_params(wide_convs)["recipe"] == "paper"
    assert multiply_adds(wide_convs) == 32 * 32 * (64 * 9 + 64 * 64 * 9) + 64 * 10
