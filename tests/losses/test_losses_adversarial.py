from __future__ import annotations

import math

import pytest
import torch

from dfkd.losses import adv_js, adv_kl, adv_l1, adv_masked_kl

S = [[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]
T_ = [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]  # row 0 agrees with S on the class, row 1 does not


def _softmax(row: list[float], temp: float = 1.0) -> list[float]:
    e = [math.exp(v / temp) for v in row]
    return [v / sum(e) for v in e]


def _kl_ts(s: list[float], t: list[float], temp: float = 1.0) -> float:
    p, q = _softmax(t, temp), _softmax(s, temp)
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_adv_l1_hand_value_and_grad():
    s = torch.tensor(S, requires_grad=True)
    out = adv_l1(s, torch.tensor(T_))
    assert out.item() == pytest.approx(-(1 + 0 + 0 + 0 + 2 + 1) / 6)
    out.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_adv_kl_hand_value():
    expected = -(_kl_ts(S[0], T_[0]) + _kl_ts(S[1], T_[1])) / 2
    assert adv_kl(torch.tensor(S), torch.tensor(T_)).item() == pytest.approx(expected, rel=1e-5)
    expected_t2 = -4 * (_kl_ts(S[0], T_[0], 2.0) + _kl_ts(S[1], T_[1], 2.0)) / 2
    assert adv_kl(torch.tensor(S), torch.tensor(T_), T=2.0).item() == pytest.approx(expected_t2, rel=1e-5)


def test_adv_masked_kl_keeps_only_agreeing_samples_mean_over_all():
    expected = -_kl_ts(S[0], T_[0]) / 2  # row 1 masked, but still counted in the mean
    assert adv_masked_kl(torch.tensor(S), torch.tensor(T_)).item() == pytest.approx(expected, rel=1e-5)


def test_adv_masked_kl_zero_when_all_disagree_and_kl_when_all_agree():
    s = torch.tensor([[2.0, 0.0], [0.0, 2.0]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    out = adv_masked_kl(s, t)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    agree = torch.tensor([[0.0, 3.0], [1.0, 0.0]])
    assert adv_masked_kl(agree, t).item() == pytest.approx(adv_kl(agree, t).item(), rel=1e-5)


def test_adv_masked_kl_gradcheck():
    t = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
    s = torch.tensor([[0.5, 0.1, 0.0], [0.2, 0.9, -0.3]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: adv_masked_kl(a, t), (s,))


def test_adv_js_identical_is_one_and_hand_value():
    x = torch.randn(3, 4)
    assert adv_js(x, x.clone()).item() == pytest.approx(1.0, abs=1e-6)
    s, t = [0.0, 3.0, 0.0], [3.0, 0.0, 0.0]  # no probability reaches a clamp bound at T=3
    p, q = _softmax(s, 3.0), _softmax(t, 3.0)
    m = [(a + b) / 2 for a, b in zip(p, q)]
    js = 0.5 * sum(c * math.log(c / a) for a, c in zip(p, m)) + 0.5 * sum(c * math.log(c / b) for b, c in zip(q, m))
    assert adv_js(torch.tensor([s]), torch.tensor([t])).item() == pytest.approx(1 - js, rel=1e-5)


def test_adv_js_grad_reaches_student():
    s = torch.randn(4, 5, requires_grad=True)
    adv_js(s, torch.randn(4, 5)).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
