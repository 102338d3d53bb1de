"""BNInputs: a BN teacher's layers, and a BN-free teacher's input matched to its normalisation's statistics."""

import json
import warnings
from pathlib import Path

import pytest
import torch

from dfkd.bnstats import BNInputs, normalisation_is_statistic
from dfkd.config import DistillConfig
from dfkd.engine import distill
from dfkd.losses import bn_deepinversion
from dfkd.spec import MNIST_SPEC, InputSpec
from dfkd.teacher import Teacher
from tests.conftest import KWARGS, make_teacher_module


def bnfree(spec: InputSpec = MNIST_SPEC) -> Teacher:
    return Teacher(make_teacher_module("lenet5"), spec, arch="lenet5", arch_kwargs=KWARGS)


def bn_of(teacher: Teacher, x: torch.Tensor, **kw) -> tuple[BNInputs, list]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        bn = BNInputs(teacher, "cmi", **kw)
    bn.set_active(True)
    teacher(x)
    bn.warnings = [str(w.message) for w in record]
    return bn, bn.layers()


def test_bn_free_teacher_matches_its_input_to_mean_0_and_variance_1() -> None:
    teacher = bnfree()
    x = torch.randn(64, 1, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_()
    bn, layers = bn_of(teacher, x)
    assert len(layers) == 1 and layers[0][0] is x, "the teacher's input is the one matched layer"
    assert torch.equal(layers[0][1], torch.zeros(1)) and torch.equal(layers[0][2], torch.ones(1))
    assert "matches the teacher's input instead" in bn.warnings[0] and "input_stats=false" in bn.warnings[0]
    near = bn_deepinversion(layers)
    near.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0, "the term reaches the synthetic images"
    _, far = bn_of(teacher, (x.detach() * 3 + 2))
    assert bn_deepinversion(far) > 10 * near, "a batch off the data's statistics costs more"
    bn.set_active(False)
    teacher(x)
    assert bn.layers() == [], "nothing is recorded while inactive (student steps)"
    assert bn.modules == [] and bn.paths == [], "no real BatchNorm layer is named (cmi's features)"


def test_input_stats_false_and_non_statistical_normalisations_drop_the_term() -> None:
    x = torch.randn(8, 1, 32, 32)
    bn, layers = bn_of(bnfree(), x, input_stats=False)
    assert layers == [] and not bn.available and "is dropped" in bn.warnings[0]
    for mean, std in ((0.0, 1.0), (0.5, 0.5)):
        spec = InputSpec(1, 32, (mean,), (std,))
        assert not normalisation_is_statistic(spec)
        bn, layers = bn_of(bnfree(spec), x)
        assert layers == [] and "not a data statistic" in bn.warnings[0]
    assert normalisation_is_statistic(InputSpec(3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))


def test_bn_teacher_keeps_its_batchnorm_layers(tiny_teacher: Teacher) -> None:
    x = torch.randn(8, 1, 32, 32)
    bn, layers = bn_of(tiny_teacher, x)
    assert bn.warnings == [] and len(layers) == len(tiny_teacher.bn_paths()) > 1
    assert all(a is not x for a, _, _ in layers)


@pytest.mark.parametrize("method", ["cmi", "fast", "deepinversion", "dfq"])
def test_bn_methods_on_a_bn_free_teacher_match_the_input_unless_told_not_to(bnfree_teacher_file: str,
                                                                            tmp_path: Path, method: str) -> None:
    quick = {"cmi": {"synth_batch_size": 8, "g_steps": 2, "s_steps": 2, "n_neg": 16},
             "fast": {"synth_batch_size": 8, "g_steps": 2, "s_steps": 2},
             "deepinversion": {"iterations": 4, "s_steps": 2},
             "dfq": {"s_steps": 2}}[method]

    def bn_losses(input_stats: bool) -> list[float]:
        out = tmp_path / f"{method}-{input_stats}"
        cfg = DistillConfig(teachers=(bnfree_teacher_file,), method=method, steps=4, out=str(out), log_every=1,
                            image_every=4, eval_every=4, ckpt_every=4, fid_every=0,
                            params={"batch_size": 8, **quick, "input_stats": input_stats})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = distill(cfg).run_dir
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [v for r in records for k, v in r.items() if k.endswith(("gen/bn", "synth/bn"))]

    on, off = bn_losses(True), bn_losses(False)
    assert on and off, f"{method} logs its BN term"
    assert min(on) > 0 and max(off) == 0


def test_a_torchscript_teacher_gets_the_input_term_too() -> None:
    scripted = torch.jit.script(make_teacher_module("lenet5_bn").eval())
    teacher = Teacher(scripted, MNIST_SPEC, fmt="torchscript")
    assert teacher.bn_paths() == [], "no module hooks into TorchScript: its BN layers cannot be read"
    x = torch.randn(8, 1, 32, 32)
    bn, layers = bn_of(teacher, x)
    assert len(layers) == 1 and layers[0][0] is x and "TorchScript" in bn.warnings[0]
