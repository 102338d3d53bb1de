from __future__ import annotations

import numpy as np
import pytest
import torch

from dfkd.losses import (
    discriminator_loss,
    generator_loss,
    get_loss,
    hint_loss,
    pairwise_distances,
    rkd_angle,
    rkd_distance,
    similarity_preserving,
)

S = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # a 3-4-5 triangle
T = np.array([[1.0, 1.0, 0.0], [1.0, 2.0, 0.0], [3.0, 1.0, 1.0]])


def _huber(d: np.ndarray) -> float:
    a = np.abs(d)
    return float(np.where(a < 1, 0.5 * d**2, a - 0.5).mean())


def _dist(e: np.ndarray) -> np.ndarray:
    d = np.sqrt(((e[:, None] - e[None]) ** 2).sum(-1))
    return d / d[d > 0].mean()


def _angles(e: np.ndarray) -> np.ndarray:
    n = len(e)
    out = np.zeros((n, n, n))
    for i in range(n):
        for j in range(n):
            for k in range(n):
                u, v = e[j] - e[i], e[k] - e[i]
                nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                if nu > 0 and nv > 0:
                    out[i, j, k] = u @ v / (nu * nv)
    return out


def _t(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def test_pairwise_distances_hand_value():
    d = pairwise_distances(_t(S))
    assert np.allclose(d.numpy(), [[0, 3, 4], [3, 0, 5], [4, 5, 0]], atol=1e-6)


def test_rkd_distance_hand_value():
    # 3-4-5: mean distance 4, so normalised distances 0.75, 1, 1.25.
    expected = _huber(_dist(S) - _dist(T))
    assert rkd_distance(_t(S), _t(T)).item() == pytest.approx(expected, rel=1e-6)
    assert rkd_distance(_t(S), _t(2 * S + 1)).item() == pytest.approx(0.0, abs=1e-6)  # scale/shift invariant


def test_rkd_angle_hand_value():
    expected = _huber(_angles(S) - _angles(T))
    assert rkd_angle(_t(S), _t(T)).item() == pytest.approx(expected, rel=1e-6)
    # The right angle at point 0 of the 3-4-5 triangle has cosine 0; the angle at 1 has cosine 3/5.
    a = _angles(S)
    assert a[0, 1, 2] == pytest.approx(0.0) and a[1, 0, 2] == pytest.approx(0.6)


def test_rkd_gradients_reach_student_only():
    s, t = _t(S, grad=True), _t(T, grad=True)
    (rkd_distance(s, t) + rkd_angle(s, t)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_rkd_gradcheck():
    t = _t(T)
    s = _t(S + 0.1 * np.arange(6).reshape(3, 2), grad=True)
    assert torch.autograd.gradcheck(lambda a: rkd_distance(a, t) + rkd_angle(a, t), (s,))


def test_similarity_preserving_hand_value():
    rng = np.random.default_rng(0)
    fs, ft = rng.normal(size=(4, 2, 3, 3)), rng.normal(size=(4, 5, 2, 2))

    def gram(f: np.ndarray) -> np.ndarray:
        f = f.reshape(len(f), -1)
        g = f @ f.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    expected = ((gram(fs) - gram(ft)) ** 2).sum() / 16
    out = similarity_preserving([_t(fs)], [_t(ft)])
    assert out.item() == pytest.approx(expected, rel=1e-6)
    two = similarity_preserving([_t(fs), _t(fs)], [_t(ft), _t(fs)])
    assert two.item() == pytest.approx(expected, rel=1e-6)  # an identical pair adds 0


def test_similarity_preserving_gradient_student_only():
    s, t = _t(np.ones((3, 4)) + np.eye(3, 4), grad=True), _t(np.arange(12.0).reshape(3, 4), grad=True)
    similarity_preserving([s], [t]).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_hint_loss_hand_value():
    r, h = _t(np.array([[1.0, 2.0], [3.0, 4.0]]), grad=True), _t(np.array([[1.0, 0.0], [0.0, 4.0]]))
    out = hint_loss(r, h)
    assert out.item() == pytest.approx((0 + 4 + 9 + 0) / 4)
    out.backward()
    assert np.allclose(r.grad.numpy(), np.array([[0, 4], [6, 0]]) / 4)


def test_gan_losses_hand_values():
    real, fake = np.array([2.0, -1.0]), np.array([0.5, -3.0])
    sp = lambda v: np.log1p(np.exp(v))  # noqa: E731
    d = discriminator_loss(_t(real), _t(fake)).item()
    assert d == pytest.approx(sp(-real).mean() + sp(fake).mean(), rel=1e-9)
    assert generator_loss(_t(fake)).item() == pytest.approx(sp(-fake).mean(), rel=1e-9)
    # Non-saturating: a confident discriminator (fake -> -inf) still gives the student a strong gradient.
    f = _t(np.array([-20.0]), grad=True)
    generator_loss(f).backward()
    assert f.grad.item() == pytest.approx(-1.0, rel=1e-6)


def test_registered_names():
    assert get_loss("rkd_distance") is rkd_distance and get_loss("rkd_angle") is rkd_angle
    assert get_loss("sp") is similarity_preserving and get_loss("fitnet") is hint_loss
    assert get_loss("gan_d") is discriminator_loss and get_loss("gan_g") is generator_loss
