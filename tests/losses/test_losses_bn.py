from __future__ import annotations

import math

import pytest
import torch

from dfkd.losses import (
    batch_stats,
    bn_deepinversion,
    bn_dfq,
    bn_momentum,
    bn_zeroq,
    input_prior_zeroq,
    update_bn_ema,
)


def _x4() -> torch.Tensor:
    # (B=2, C=2, H=1, W=2). Channel 0 holds 1, 3, 5, 7 (mean 4, biased var 5); channel 1 holds 0, 0, 2, 2 (mean 1,
    # var 1). Per sample: s0c0 [1, 3], s0c1 [0, 0], s1c0 [5, 7], s1c1 [2, 2].
    return torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]], [[[5.0, 7.0]], [[2.0, 2.0]]]])


def _x2() -> torch.Tensor:
    # (B=2, C=2): channel 0 [1, 3] (mean 2, var 1), channel 1 [4, 4] (mean 4, var 0)
    return torch.tensor([[1.0, 4.0], [3.0, 4.0]])


def test_batch_stats_hand_values_4d_and_2d():
    mean, var = batch_stats(_x4())
    assert mean.tolist() == [4.0, 1.0] and var.tolist() == [5.0, 1.0]
    mean, var = batch_stats(_x2())
    assert mean.tolist() == [2.0, 4.0] and var.tolist() == [1.0, 0.0]


def test_bn_deepinversion_hand_value_with_first_multiplier():
    layer0 = (_x4(), torch.tensor([3.0, 1.0]), torch.tensor([4.0, 2.0]))  # var diff (1, -1), mean diff (1, 0)
    layer1 = (_x2(), torch.tensor([2.0, 1.0]), torch.tensor([1.0, 4.0]))  # var diff (0, -4), mean diff (0, 3)
    term0, term1 = math.sqrt(2) + 1, 4 + 3
    assert bn_deepinversion([layer0, layer1]).item() == pytest.approx(term0 + term1, rel=1e-6)
    assert bn_deepinversion([layer0, layer1], first_multiplier=10.0).item() == pytest.approx(10 * term0 + term1)


def test_bn_deepinversion_zero_when_batch_matches_running_stats():
    x = torch.randn(8, 3, 4, 4)
    mean, var = batch_stats(x)
    assert bn_deepinversion([(x, mean, var)]).item() == pytest.approx(0.0, abs=1e-5)


def test_bn_losses_do_not_touch_running_stats_and_reach_input():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    rm, rv = torch.zeros(3, requires_grad=True), torch.ones(3, requires_grad=True)
    for fn in (bn_deepinversion, bn_dfq, bn_zeroq, lambda ls: bn_momentum(ls, None)):
        x.grad = None
        fn([(x, rm, rv)]).backward()
        assert rm.grad is None and rv.grad is None
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_bn_losses_reject_empty_layer_list():
    for fn in (bn_deepinversion, bn_dfq, bn_zeroq):
        with pytest.raises(ValueError, match="no hooked BatchNorm"):
            fn([])


def test_bn_dfq_hand_value():
    # channel 0: mu 4, var 5 vs N(3, 4); channel 1: mu 1, var 1 vs N(1, 1) -> 0
    expected = (1 + 5) / (2 * 4) - 0.5 * math.log(5 / 4) - 0.5
    out = bn_dfq([(_x4(), torch.tensor([3.0, 1.0]), torch.tensor([4.0, 1.0]))], eps=0.0)
    assert out.item() == pytest.approx(expected, rel=1e-5)


def test_bn_dfq_zero_at_equality_and_sums_over_layers():
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    mean, var = batch_stats(x)
    assert bn_dfq([(x, mean, var)]).item() == pytest.approx(0.0, abs=1e-10)
    layer = (_x4().double(), torch.tensor([3.0, 1.0]).double(), torch.tensor([4.0, 1.0]).double())
    assert bn_dfq([layer, layer]).item() == pytest.approx(2 * bn_dfq([layer]).item())


def test_bn_gradcheck():
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.tensor([0.5, -0.5], dtype=torch.float64), torch.tensor([2.0, 0.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: bn_deepinversion([(a, rm, rv)], first_multiplier=3.0), (x,))
    assert torch.autograd.gradcheck(lambda a: bn_dfq([(a, rm, rv)]), (x,))
    assert torch.autograd.gradcheck(lambda a: bn_zeroq([(a, rm, rv)]), (x,))


def test_bn_zeroq_hand_value():
    # per-sample, unbiased over W=2: s0c0 mean 2 var 2; s0c1 0, 0; s1c0 6, 2; s1c1 2, 0
    rm, rv = [3.0, 1.0], [4.0, 1.0]
    means, stds = [[2.0, 0.0], [6.0, 2.0]], [[math.sqrt(2), 0.0], [math.sqrt(2), 0.0]]
    expected = (
        sum((rm[c] - means[i][c]) ** 2 + (math.sqrt(rv[c]) - stds[i][c]) ** 2 for i in range(2) for c in range(2)) / 2
    )
    out = bn_zeroq([(_x4(), torch.tensor(rm), torch.tensor(rv))], eps=0.0)
    assert out.item() == pytest.approx(expected, rel=1e-6)


def test_bn_zeroq_2d_input_is_finite():
    eps = 1e-6
    out = bn_zeroq([(_x2(), torch.tensor([2.0, 4.0]), torch.tensor([1.0, 1.0]))], eps=eps)
    # each (i, c) is its own single-point sample: mean = x, std = sqrt(eps)
    expected = ((2 - 1) ** 2 + (2 - 3) ** 2 + 4 * (math.sqrt(1 + eps) - math.sqrt(eps)) ** 2) / 2
    assert out.item() == pytest.approx(expected, rel=1e-5)


def test_input_prior_zeroq_hand_value_and_minimum():
    x = torch.tensor([[[[-1.0, 1.0]]]])  # mean 0, unbiased var 2
    assert input_prior_zeroq(x, eps=0.0).item() == pytest.approx((1 - math.sqrt(2)) ** 2, rel=1e-6)
    # mean 0, unbiased var 1 exactly
    y = torch.tensor([[[[-math.sqrt(0.5), math.sqrt(0.5)]]]])
    assert input_prior_zeroq(y, eps=0.0).item() == pytest.approx(0.0, abs=1e-6)


def test_bn_momentum_without_ema_equals_deepinversion():
    layers = [(torch.randn(4, 3, 2, 2), torch.randn(3), torch.rand(3) + 0.5) for _ in range(2)]
    expected = bn_deepinversion(layers).item()
    assert bn_momentum(layers, None).item() == pytest.approx(expected, rel=1e-6)
    assert bn_momentum(layers, [None, None]).item() == pytest.approx(expected, rel=1e-6)


def test_bn_momentum_hand_value():
    # batch mu (4, 1), var (5, 1); ema mu (0, 0), var (1, 1); m = 0.5 -> blend mu (2, 0.5), var (3, 1)
    ema = [(torch.zeros(2), torch.ones(2))]
    layer = (_x4(), torch.tensor([3.0, 0.5]), torch.tensor([3.0, 2.0]))  # mean diff (1, 0), var diff (0, 1)
    assert bn_momentum([layer], ema, m=0.5).item() == pytest.approx(2.0, rel=1e-6)


def test_bn_momentum_rejects_mismatched_ema():
    layer = (_x4(), torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="2 EMA entries for 1"):
        bn_momentum([layer], [None, None])


def test_update_bn_ema_first_round_then_blend():
    x = _x4().requires_grad_()
    layer = (x, torch.zeros(2), torch.ones(2))
    ema = update_bn_ema([layer], None, m=0.9)
    assert ema[0][0].tolist() == [4.0, 1.0] and ema[0][1].tolist() == [5.0, 1.0]
    assert not ema[0][0].requires_grad and not ema[0][1].requires_grad
    ema2 = update_bn_ema([(_x2(), torch.zeros(2), torch.ones(2))], ema, m=0.9)
    # 0.9 * old + 0.1 * new with new mean (2, 4), var (1, 0)
    assert torch.allclose(ema2[0][0], torch.tensor([3.8, 1.3]))
    assert torch.allclose(ema2[0][1], torch.tensor([4.6, 0.9]))
