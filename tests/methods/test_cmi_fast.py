"""CMI and Fast-DFKD: contrastive loss by hand, meta-updates by hand, bank bounds, rounds, resume, learning."""

from __future__ import annotations

import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dfkd.generators import Generator
from dfkd.generators.contrastive import ContrastiveCritic, MemoryBank, info_nce, instance_means
from dfkd.generators.latent import reinit_
from dfkd.generators.meta import MetaSynthesizer, reptile_grads_
from dfkd.generators.pool import ImagePool
from dfkd.methods import get_method
from dfkd.spec import MNIST_SPEC
from dfkd.students import build_student
from dfkd.teacher import Teacher
from tests.conftest import KWARGS, assert_learns_on_pool_images, make_teacher_module, synthesis_losses


def build(name: str, seed: int = 0, sharp: bool = False, **over):
    torch.manual_seed(seed)
    module = make_teacher_module()
    if sharp:  # a random teacher is nearly uniform; larger logits give the student something to learn
        with torch.no_grad():
            module.classifier.weight.mul_(30)
    teacher = Teacher(module, MNIST_SPEC, arch="lenet5_bn", arch_kwargs=KWARGS)
    cls = get_method(name)
    params = {**cls.default_params(teacher), **cls.quick, **over}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(teacher, build_student("lenet5_half", KWARGS), params, torch.device("cpu"))


# --- contrastive pieces -----------------------------------------------------------------------------------------
def test_info_nce_hand_computed() -> None:
    local = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    glob = np.array([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    tau, n_current = 0.5, 2
    logits = local @ glob.T / tau
    ce = np.log(np.exp(logits).sum(1)) - np.diag(logits)
    expected = ce[:n_current].mean() + ce[n_current:].mean()
    got = info_nce(torch.tensor(local), torch.tensor(glob), n_current, tau)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    only_current = info_nce(torch.tensor(local[:2]), torch.tensor(glob[:2]), 2, tau)
    sub = local[:2] @ glob[:2].T / tau
    assert only_current.item() == pytest.approx((np.log(np.exp(sub).sum(1)) - np.diag(sub)).mean(), rel=1e-9)


def test_info_nce_global_side_detached_and_head_learns() -> None:
    torch.manual_seed(0)
    critic = ContrastiveCritic(feat_dim=4, lr=1e-2, proj_dim=3, tau=0.2, n_neg=5, capacity=8)
    critic.bank.add(torch.randn(6, 8))
    feats = torch.randn(3, 8, requires_grad=True)
    before = copy.deepcopy(critic.head.state_dict())
    critic.loss(feats).backward()
    assert feats.grad[:, :4].abs().sum() > 0 and torch.all(feats.grad[:, 4:] == 0)
    critic.step()
    assert any(not torch.equal(v, critic.head.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in critic.head.parameters())


def test_instance_means() -> None:
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 5)
    out = instance_means([a, b])
    assert out.shape == (2, 8)
    assert torch.allclose(out[:, :3], a.mean(dim=(2, 3))) and torch.equal(out[:, 3:], b)


def test_memory_bank_bounded_ring_and_state() -> None:
    bank = MemoryBank(capacity=5, dim=2)
    rows = torch.arange(16.0).view(8, 2)
    bank.add(rows[:3])
    bank.add(rows[3:7])  # 7 rows into 5 slots: rows 0 and 1 are overwritten
    assert len(bank) == 5
    assert {tuple(r) for r in bank.data.tolist()} == {tuple(r) for r in rows[2:7].tolist()}
    drawn = bank.sample(4)
    assert len({tuple(r) for r in drawn.tolist()}) == 4 and len(bank.sample(50)) == 5
    buf = io.BytesIO()
    torch.save(bank.state_dict(), buf)
    buf.seek(0)
    other = MemoryBank(capacity=5, dim=2)
    other.load_state_dict(torch.load(buf, weights_only=True))
    bank.add(rows[7:])
    other.add(rows[7:])
    assert torch.equal(bank.data, other.data) and bank.ptr == other.ptr
    assert {tuple(r) for r in bank.data.tolist()} == {tuple(r) for r in rows[3:8].tolist()}


def test_reinit_matches_cmi_reset() -> None:
    g = reinit_(Generator(MNIST_SPEC, nz=64, ngf=32, head="sigmoid"))
    assert g.blocks[1].weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert g.bn0.weight.mean().item() == pytest.approx(1.0, abs=0.01) and torch.all(g.bn0.bias == 0)
    assert torch.all(g.l1.bias == 0)


# --- meta updates by hand ---------------------------------------------------------------------------------------
class ToyGen(nn.Module):
    nz = 3

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(3, 4)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.l1(z).view(-1, 1, 2, 2)


def toy_objective(x: torch.Tensor, y: torch.Tensor):
    return {"loss": ((x - 1.0) ** 2).mean()}, None


def inner_by_hand(meta: nn.Module, seed: int, steps: int = 3) -> tuple[dict, dict]:
    """The inner loop written out: returns the summed inner gradients and the final fast parameters."""
    fast = copy.deepcopy(meta)
    torch.manual_seed(seed)
    z = torch.randn(4, 3).requires_grad_()
    opt = torch.optim.Adam([{"params": fast.parameters()}, {"params": [z], "lr": 0.05}], lr=0.1, betas=(0.5, 0.999))
    total = {n: torch.zeros_like(p) for n, p in fast.named_parameters()}
    for _ in range(steps):
        opt.zero_grad()
        toy_objective(fast(z), None)[0]["loss"].backward()
        for n, p in fast.named_parameters():
            total[n] += p.grad
        opt.step()
    return total, {n: p.detach().clone() for n, p in fast.named_parameters()}


@pytest.mark.parametrize("maml", [True, False])
def test_meta_update_by_hand(maml: bool) -> None:
    torch.manual_seed(0)
    meta = ToyGen()
    synth = MetaSynthesizer(meta, toy_objective, ImagePool(100), batch_size=4, steps=3, num_classes=2, lr_g=0.1,
                            lr_z=0.05, maml=maml, alpha=67.0)
    before = {n: p.detach().clone() for n, p in meta.named_parameters()}
    grads, fast = inner_by_hand(meta, seed=1)
    torch.manual_seed(1)
    synth.synthesize()
    for n, p in meta.named_parameters():
        want = grads[n] if maml else 67.0 * (before[n] - fast[n])
        assert torch.allclose(p.grad, want, atol=1e-6), n
        # First Adam step, lr = lr_g * steps: m_hat = g, v_hat = g^2.
        assert torch.allclose(p.detach(), before[n] - 0.3 * want / (want.abs() + 1e-8), atol=1e-6), n
    assert len(synth.pool) == 4


def test_reptile_grads_formula() -> None:
    a, b = ToyGen(), ToyGen()
    reptile_grads_(a, b, alpha=2.5)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p.grad, 2.5 * (p.detach() - q.detach()))


# --- method rounds ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cmi", "fast"])
def test_round_finite_teacher_untouched(name: str) -> None:
    m = build(name)
    t_before = copy.deepcopy(m.teacher.state_dict())
    logs = m.round()
    assert all(math.isfinite(v) for v in logs.values()) and logs["gen/bn"] > 0
    assert all(p.grad is None for p in m.teacher.parameters())
    assert all(torch.equal(v, m.teacher.state_dict()[k]) for k, v in t_before.items())
    assert len(m.pool) == m.p["synth_batch_size"] and m.student.training
    if name == "cmi":
        assert "gen/cr" in logs and len(m.synth.critic.bank) == m.p["synth_batch_size"]
        assert m.synth.critic.bank.dim == 2 * (6 + 16 + 120)
    else:
        assert m.ema is not None and len(m.ema) == 3 and logs["gen/adv"] == 0.0  # adv waits for the warmup
        m.set_progress(0.5)
        assert m.round()["gen/adv"] <= 0.0
    m.close()


@pytest.mark.parametrize("name", ["cmi", "fast"])
def test_state_round_trip_through_weights_only_file(name: str, tmp_path) -> None:
    a = build(name, seed=1)
    a.set_progress(0.7)  # Fast: past warmup and reset_at, so the adversarial term and the reset are live
    a.round()
    torch.save(a.state_dict(), tmp_path / "s.pt")
    b = build(name, seed=2)
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    b.set_progress(0.7)
    torch.manual_seed(5)
    la = a.round()
    torch.manual_seed(5)
    lb = b.round()
    assert la == lb
    assert len(a.pool) == len(b.pool) and torch.equal(a.pool.newest(len(a.pool)), b.pool.newest(len(b.pool)))
    for k, v in a.student.state_dict().items():
        assert torch.equal(v, b.student.state_dict()[k]), k
    for k, v in a.synth.generator.state_dict().items():
        assert torch.equal(v, b.synth.generator.state_dict()[k]), k
    a.close(), b.close()


def test_cmi_synthesis_loss_goes_down_within_a_round() -> None:
    m = build("cmi", g_steps=8)
    seen = synthesis_losses(m)
    assert len(seen) == 8 and min(seen[4:]) < seen[0]


def test_fast_meta_generator_improves_across_rounds() -> None:
    m = build("fast", g_steps=2, s_steps=1)
    best = [m.synthesize()["gen/total"] for _ in range(5)]
    assert best[-1] < best[0]


@pytest.mark.parametrize("name", ["cmi", "fast"])
def test_student_learns_the_teacher_on_pool_images(name: str) -> None:
    m = build(name, sharp=True, synth_batch_size=16, batch_size=16, s_steps=8, lr_s=0.05)
    assert_learns_on_pool_images(m)
