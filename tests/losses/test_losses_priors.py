from __future__ import annotations

import math

import pytest
import torch

from dfkd.losses import activation, information_entropy, instance_entropy, one_hot

LOGITS = [[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]]


def _softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_one_hot_uses_argmax_pseudo_labels():
    expected = -(math.log(_softmax(LOGITS[0])[0]) + math.log(_softmax(LOGITS[1])[2])) / 2
    assert one_hot(torch.tensor(LOGITS)).item() == pytest.approx(expected, rel=1e-5)


def test_one_hot_with_sampled_targets():
    expected = -(math.log(_softmax(LOGITS[0])[1]) + math.log(_softmax(LOGITS[1])[0])) / 2
    assert one_hot(torch.tensor(LOGITS), torch.tensor([1, 0])).item() == pytest.approx(expected, rel=1e-5)


def test_one_hot_grad_reaches_logits():
    t = torch.tensor(LOGITS, requires_grad=True)
    one_hot(t).backward()
    assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_information_entropy_hand_value_log10_and_natural():
    p0, p1 = _softmax(LOGITS[0]), _softmax(LOGITS[1])
    pbar = [(a + b) / 2 for a, b in zip(p0, p1)]
    nats = sum(p * math.log(p) for p in pbar)
    t = torch.tensor(LOGITS)
    assert information_entropy(t).item() == pytest.approx(nats / math.log(10), rel=1e-5)
    assert information_entropy(t, log_base=math.e).item() == pytest.approx(nats, rel=1e-5)


def test_information_entropy_minimum_on_balanced_batch():
    confident_balanced = 50.0 * torch.eye(4)  # each sample certain, classes perfectly balanced
    assert information_entropy(confident_balanced).item() == pytest.approx(-math.log10(4), rel=1e-5)
    assert information_entropy(torch.zeros(3, 4), log_base=math.e).item() == pytest.approx(-math.log(4), rel=1e-5)
    assert information_entropy(torch.randn(16, 4)).item() >= -math.log10(4) - 1e-6


def test_information_entropy_finite_when_a_class_underflows():
    t = torch.tensor([[0.0, 0.0, -1e4], [0.0, 0.0, -1e4]], requires_grad=True)
    out = information_entropy(t)
    out.backward()
    assert out.item() == pytest.approx(-math.log10(2), rel=1e-5)
    assert torch.isfinite(t.grad).all()


def test_information_entropy_gradcheck():
    t = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(information_entropy, (t,))


def test_activation_hand_value_and_grad():
    f = torch.tensor([[1.0, -2.0], [3.0, -4.0]], requires_grad=True)
    out = activation(f)
    assert out.item() == pytest.approx(-2.5)
    out.backward()
    assert torch.equal(f.grad, -torch.sign(f.detach()) / 4)


def test_instance_entropy_hand_value_and_extremes():
    h = [-sum(p * math.log(p) for p in _softmax(row)) for row in LOGITS]
    assert instance_entropy(torch.tensor(LOGITS)).item() == pytest.approx(sum(h) / 2, rel=1e-5)
    assert instance_entropy(torch.zeros(2, 5)).item() == pytest.approx(math.log(5), rel=1e-5)
    assert instance_entropy(torch.tensor([[1e4, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_instance_entropy_gradcheck():
    t = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(instance_entropy, (t,))
