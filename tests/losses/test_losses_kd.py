from __future__ import annotations

import math

import pytest
import torch

from dfkd.losses import js_divergence, kl_div, l1_logits, soft_cross_entropy

S = [[1.0, 2.0, 3.0], [0.0, 0.5, -1.0]]
T_ = [[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]]


def _softmax(row: list[float], temp: float = 1.0) -> list[float]:
    e = [math.exp(v / temp) for v in row]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_kl_div_hand_value_with_temperature():
    temp = 2.0
    expected = temp**2 * sum(_kl(_softmax(t, temp), _softmax(s, temp)) for s, t in zip(S, T_)) / 2
    out = kl_div(torch.tensor(S), torch.tensor(T_), T=temp)
    assert out.item() == pytest.approx(expected, rel=1e-5)
    unscaled = kl_div(torch.tensor(S), torch.tensor(T_), T=temp, scale_T2=False)
    assert unscaled.item() == pytest.approx(expected / 4, rel=1e-5)


def test_kl_div_reductions():
    s, t = torch.tensor(S), torch.tensor(T_)
    total = sum(_kl(_softmax(b), _softmax(a)) for a, b in zip(S, T_))
    assert kl_div(s, t, reduction="sum").item() == pytest.approx(total, rel=1e-5)
    assert kl_div(s, t, reduction="mean").item() == pytest.approx(total / 6, rel=1e-5)
    per = kl_div(s, t, reduction="none")
    assert per.shape == (2, 3)
    assert per.sum(1)[1].item() == pytest.approx(_kl(_softmax(T_[1]), _softmax(S[1])), rel=1e-5)


def test_kl_div_zero_at_equality_and_stable_for_huge_logits():
    x = torch.tensor([[1000.0, 0.0, -1000.0]])
    assert kl_div(x, x.clone(), T=20.0).item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(kl_div(x, -x))


def test_kl_div_gradcheck():
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: kl_div(a, t, T=3.0), (s,))


def test_l1_logits_hand_value_and_grad():
    s = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    t = torch.tensor([[0.0, 2.5, 5.0], [4.0, 4.0, 6.5]])
    out = l1_logits(s, t)
    assert out.item() == pytest.approx((1 + 0.5 + 2 + 0 + 1 + 0.5) / 6)
    out.backward()
    assert torch.allclose(s.grad, torch.sign(s - t).detach() / 6)


def _js_reference(s: list[float], t: list[float], temp: float) -> float:
    p, q = _softmax(s, temp), _softmax(t, temp)
    m = [min(max((a + b) / 2, 0.01), 0.99) for a, b in zip(p, q)]
    p = [min(max(a, 0.01), 0.99) for a in p]
    q = [min(max(a, 0.01), 0.99) for a in q]
    # KL(M || P) as in NVlabs' KLDivLoss(log P, M)
    return 0.5 * sum(c * math.log(c / a) for a, c in zip(p, m)) + 0.5 * sum(c * math.log(c / b) for b, c in zip(q, m))


def test_js_hand_value_with_clamping():
    s = [[30.0, 0.0, 0.0], [0.0, 1.0, 2.0]]  # row 0 saturates: P is clamped to [0.99, 0.01, 0.01]
    t = [[0.0, 0.0, 30.0], [2.0, 1.0, 0.0]]
    expected = (_js_reference(s[0], t[0], 3.0) + _js_reference(s[1], t[1], 3.0)) / 2
    out = js_divergence(torch.tensor(s), torch.tensor(t))
    assert out.item() == pytest.approx(expected, rel=1e-5)


def test_js_zero_at_equality_and_gradcheck():
    x = torch.randn(4, 5)
    assert js_divergence(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    s = (0.3 * torch.randn(3, 4, dtype=torch.float64)).requires_grad_()
    t = 0.3 * torch.randn(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: js_divergence(a, t), (s,))


def test_soft_cross_entropy_hand_value():
    target = [0.2, 0.3, 0.5]
    log_p = [math.log(v) for v in _softmax([1.0, 2.0, 3.0], 2.0)]
    expected = 4.0 * -sum(a * b for a, b in zip(target, log_p))
    out = soft_cross_entropy(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([target]), T=2.0)
    assert out.item() == pytest.approx(expected, rel=1e-5)


def test_soft_cross_entropy_is_kl_plus_target_entropy():
    s, t = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    p_t = torch.softmax(t, 1)
    entropy = -(p_t * p_t.log()).sum(1).mean()
    assert torch.allclose(soft_cross_entropy(s, p_t), kl_div(s, t) + entropy)


def test_soft_cross_entropy_grad_reaches_student():
    s = torch.randn(2, 3, requires_grad=True)
    soft_cross_entropy(s, torch.full((2, 3), 1 / 3), T=4.0).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
