from __future__ import annotations

import pytest

import dfkd.losses as L
from dfkd.errors import DfkdError

NAMES = (
    "kl l1 js soft_ce bn_di bn_dfq bn_zeroq input_zeroq bn_momentum oh ie act inst_entropy "
    "adv_l1 adv_kl adv_masked_kl adv_js tv_l1 tv_l2 l2 at rkd_distance rkd_angle sp fitnet gan_d gan_g"
).split()


def test_every_loss_is_registered():
    assert sorted(NAMES) == L.list_losses()


@pytest.mark.parametrize("name", NAMES)
def test_get_loss_returns_exported_function(name):
    fn = L.get_loss(name)
    assert getattr(L, fn.__name__) is fn
    assert fn.__doc__ and "Returns:" in fn.__doc__ and "Shape:" in fn.__doc__


def test_unknown_loss_lists_known_names():
    with pytest.raises(DfkdError, match="bn_di"):
        L.get_loss("nope")
