from __future__ import annotations

import math

import pytest
import torch

from dfkd.losses import l2_prior, tv_l1, tv_l2

# [[1, 2], [4, 8]]: horizontal (1-2, 4-8), vertical (1-4, 2-8), diagonals 4-2 and 1-8
X = torch.tensor([[[[1.0, 2.0], [4.0, 8.0]]]])


def test_tv_l1_hand_value():
    assert tv_l1(X).item() == pytest.approx(2.5 + 4.5 + 2 + 7)


def test_tv_l2_hand_value():
    assert tv_l2(X).item() == pytest.approx(math.sqrt(17) + math.sqrt(45) + 2 + 7, rel=1e-6)


def test_tv_zero_on_constant_image():
    c = torch.full((2, 3, 5, 4), 0.7)
    assert tv_l1(c).item() == 0.0
    assert tv_l2(c).item() == 0.0


def test_tv_gradcheck():
    x = torch.randn(2, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(tv_l1, (x,))
    assert torch.autograd.gradcheck(tv_l2, (x,))


def test_l2_prior_hand_values():
    x = torch.tensor([[[[3.0, 4.0]]], [[[0.0, 1.0]]]])
    assert l2_prior(x).item() == pytest.approx((5 + 1) / 2)
    assert l2_prior(x, per_sample=False).item() == pytest.approx(math.sqrt(26))


def test_l2_prior_gradcheck():
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(l2_prior, (x,))
    assert torch.autograd.gradcheck(lambda a: l2_prior(a, per_sample=False), (x,))
