from __future__ import annotations

import warnings

import pytest
import torch

from dfkd.augment import AUGMENT_KINDS, JitterFlip, RandomCropFlip, make_augment
from dfkd.models import create
from dfkd.spec import InputSpec

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", AUGMENT_KINDS)
def test_augment_keeps_shape_and_gradient(kind, channels, device):
    x = torch.randn(4, channels, 16, 16, device=device, requires_grad=True)
    y = make_augment(kind, 16)(x)
    assert y.shape == x.shape and y.device == x.device
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", AUGMENT_KINDS)
def test_augment_non_square_size(kind):
    x = torch.randn(2, 3, 12, 20)
    assert make_augment(kind, (12, 20))(x).shape == (2, 3, 12, 20)


@pytest.mark.parametrize("kind", AUGMENT_KINDS)
def test_augment_same_seed_same_output(kind):
    aug, x = make_augment(kind, 16), torch.randn(3, 3, 16, 16)
    torch.manual_seed(0)
    a = aug(x)
    torch.manual_seed(0)
    assert torch.equal(a, aug(x))


def test_none_is_identity():
    x = torch.randn(2, 3, 8, 8)
    assert make_augment("none", 8)(x) is x


def test_jitter_flip_is_a_pixel_permutation():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8).requires_grad_()
    torch.manual_seed(3)
    moved = False
    for _ in range(5):
        y = make_augment("jitter_flip", 8, jitter=2)(x)
        assert torch.equal(y.flatten().sort().values, x.flatten().sort().values)
        moved |= not torch.equal(y, x)
    assert moved
    x.grad = None
    make_augment("jitter_flip", 8, jitter=2)(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_jitter_flip_bounds_and_default_jitter():
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(JitterFlip(0, flip_p=0.0)(x), x)
    assert torch.equal(JitterFlip(0, flip_p=1.0)(x), x.flip(3))
    assert make_augment("jitter_flip", 32).jitter == 4
    with pytest.raises(ValueError, match="jitter"):
        JitterFlip(-1)


def test_jitter_flip_roll_is_within_range():
    # a single hot pixel can move at most `jitter` pixels (cyclically) in each direction
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 8, 8] = 1.0
    aug = JitterFlip(2, flip_p=0.0)
    for _ in range(20):
        r, c = (aug(x)[0, 0] == 1).nonzero()[0].tolist()
        assert abs(r - 8) <= 2 and abs(c - 8) <= 2


def test_unknown_kind_lists_choices():
    with pytest.raises(ValueError, match="crop_flip"):
        make_augment("mixup", 32)


def test_crop_flip_outputs_are_crops_of_the_padded_input_some_flipped():
    torch.manual_seed(0)
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8) + 1  # every pixel distinct, none 0
    aug = make_augment("crop_flip", 8, flip_p=0.5)  # padding 8 // 8 = 1
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    seen = set()
    for _ in range(40):
        y = aug(x)
        for i in range(2):
            found = [(dy, dx, f) for dy in range(3) for dx in range(3) for f in (False, True)
                     if torch.equal(y[i], (lambda c: c.flip(-1) if f else c)(padded[i, :, dy:dy + 8, dx:dx + 8]))]
            assert found, "every output is one crop of the zero-padded input, maybe flipped"
            seen.update(found)
    assert len(seen) == 18, "all 9 offsets and both flips occur"


def test_crop_flip_gradient_counts_each_kept_pixel_once():
    x = torch.randn(5, 3, 16, 16, requires_grad=True)
    torch.manual_seed(1)
    y = make_augment("crop_flip", 16)(x)
    y.sum().backward()
    kept = x.grad.sum(dim=(1, 2, 3))
    assert set(x.grad.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(kept, (y.detach() != 0).sum(dim=(1, 2, 3)).float())


def test_crop_flip_from_a_larger_input():
    y = make_augment("crop_flip", 8)(torch.randn(2, 1, 12, 12))
    assert y.shape == (2, 1, 8, 8)


def test_crop_flip_pads_with_black_in_the_normalised_space():
    spec = InputSpec(3, 8, (0.5, 0.4, 0.3), (0.25, 0.2, 0.1))
    x = spec.normalize(torch.rand(4, 3, 8, 8) * 0.5 + 0.5)  # no pixel is black
    aug = make_augment("crop_flip", 8, flip_p=0.0, fill=spec.black)
    torch.manual_seed(0)
    pixels = spec.denormalize(torch.cat([aug(x) for _ in range(20)]))
    border = pixels < 0.25
    assert border.any(), "some crops reach into the padding"
    assert torch.allclose(pixels[border], torch.zeros(()), atol=1e-6), "the padding is black, per channel"


@pytest.mark.parametrize("method", ["fast", "cmi", "nayer", "zskd", "deepinversion"])
def test_methods_pad_their_crops_black(method):
    from dfkd.methods import get_method
    from dfkd.teacher import Teacher

    spec = InputSpec(1, 32, (0.286,), (0.353,))
    torch.manual_seed(0)
    teacher = Teacher(create("lenet5", 10, 1, 32), spec)
    cls = get_method(method)
    params = {**cls.default_params(teacher), **cls.quick, "kd_augment": "crop_flip", "augment": "crop_flip"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = cls(teacher, create("lenet5_half", 10, 1, 32), params, torch.device("cpu"))
    crops = [mod for mod in vars(m).values() if isinstance(mod, RandomCropFlip)]
    assert crops and all(c.fill == spec.black for c in crops)
