"""The DCGAN-lite generator: heads, shapes, conditional variant, and the fast x2 upsampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dfkd.generators import Generator
from dfkd.generators.dcgan import Upsample2x
from dfkd.spec import CIFAR10_SPEC, MNIST_SPEC


def test_upsample2x_equals_nearest_interpolation_with_gradients() -> None:
    x = torch.randn(3, 4, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.equal(Upsample2x()(x), F.interpolate(x, scale_factor=2, mode="nearest"))
    torch.autograd.gradcheck(Upsample2x(), (x,))


@pytest.mark.parametrize("head", ["tanh_bn", "bn", "sigmoid"])
@pytest.mark.parametrize("spec", [MNIST_SPEC, CIFAR10_SPEC])
def test_heads_give_images_in_the_teachers_space(head: str, spec) -> None:
    g = Generator(spec, nz=16, ngf=8, head=head)
    x = g(torch.randn(6, 16))
    assert x.shape == (6, spec.channels, spec.size, spec.size)
    if head == "sigmoid":  # pixels in [0, 1], then the teacher's normalisation
        px = spec.denormalize(x)
        assert px.min() >= 0 and px.max() <= 1
    if head == "tanh_bn":  # re-standardised per channel
        assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(spec.channels), atol=1e-5)


def test_conditional_generator_needs_and_uses_labels() -> None:
    g = Generator(MNIST_SPEC, nz=16, ngf=8, num_classes=10).eval()
    z = torch.randn(4, 16)
    with pytest.raises(ValueError):
        g(z)
    a, b = g(z, torch.zeros(4, dtype=torch.long)), g(z, torch.ones(4, dtype=torch.long))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize(("size", "start", "ups"), [(28, 7, 2), (32, 8, 2), (64, 8, 3), (96, 6, 4), (224, 7, 5)])
def test_size_follows_the_input_with_a_small_first_layer(size: int, start: int, ups: int) -> None:
    from dfkd.spec import InputSpec

    spec = InputSpec(3, size, (0.5,) * 3, (0.25,) * 3)
    g = Generator(spec, nz=256, ngf=64)
    assert g.init_size == (start, start) and sum(isinstance(m, Upsample2x) for m in g.blocks) == ups
    assert g.l1.weight.numel() <= 256 * 128 * 8 * 8, "the first Linear does not grow with the image"
    assert sum(p.numel() for p in g.parameters()) < 3_000_000
    assert g(torch.randn(2, 256)).shape == (2, 3, size, size)


@pytest.mark.parametrize(("hw", "start", "ups"), [((28, 56), (4, 7), 3), ((30, 17), (8, 5), 2),
                                                  ((64, 256), (2, 8), 5), ((224, 160), (7, 5), 5)])
def test_a_non_square_image_keeps_its_aspect_from_the_first_layer(hw: tuple[int, int], start: tuple[int, int],
                                                                  ups: int) -> None:
    from dfkd.spec import InputSpec

    spec = InputSpec(1, hw[0], (0.5,), (0.25,), width=hw[1])
    g = Generator(spec, nz=32, ngf=16)
    assert g.init_size == start and sum(isinstance(m, Upsample2x) for m in g.blocks) == ups
    assert g(torch.randn(2, 32)).shape == (2, 1, *hw)


def test_the_32px_generator_is_the_references() -> None:
    g = Generator(CIFAR10_SPEC, nz=256, ngf=64)
    convs = [(m.in_channels, m.out_channels) for m in g.blocks if isinstance(m, torch.nn.Conv2d)]
    assert g.l1.out_features == 128 * 8 * 8 and convs == [(128, 128), (128, 64), (64, 3)]
