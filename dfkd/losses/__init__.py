"""Loss building blocks for data-free KD, as small pure functions, each registered under a short name.

`get_loss("bn_di")` returns the function; `list_losses()` lists the names. Every function cites its
paper in its docstring, with the formula it computes.
"""

from __future__ import annotations

from dfkd.losses._registry import LOSSES, LossFn
from dfkd.losses.adversarial import adv_js, adv_kl, adv_l1, adv_masked_kl
from dfkd.losses.bn import (
    batch_stats,
    bn_deepinversion,
    bn_dfq,
    bn_momentum,
    bn_zeroq,
    input_prior_zeroq,
    update_bn_ema,
)
from dfkd.losses.feature import attention_map, attention_transfer, matching_stages
from dfkd.losses.image import l2_prior, tv_l1, tv_l2
from dfkd.losses.kd import js_divergence, kl_div, l1_logits, soft_cross_entropy
from dfkd.losses.priors import activation, information_entropy, instance_entropy, one_hot


def get_loss(name: str) -> LossFn:
    """Return the loss function registered under `name`; raises DfkdError listing the known names."""
    return LOSSES.get(name)


def list_losses() -> list[str]:
    """Sorted names of all registered losses."""
    return LOSSES.names()


__all__ = [
    "LOSSES",
    "LossFn",
    "activation",
    "attention_map",
    "attention_transfer",
    "matching_stages",
    "adv_js",
    "adv_kl",
    "adv_l1",
    "adv_masked_kl",
    "batch_stats",
    "bn_deepinversion",
    "bn_dfq",
    "bn_momentum",
    "bn_zeroq",
    "get_loss",
    "information_entropy",
    "input_prior_zeroq",
    "instance_entropy",
    "js_divergence",
    "kl_div",
    "l1_logits",
    "l2_prior",
    "list_losses",
    "one_hot",
    "soft_cross_entropy",
    "tv_l1",
    "tv_l2",
    "update_bn_ema",
]
from dfkd.losses.discriminator import discriminator_loss, generator_loss  # noqa: E402
from dfkd.losses.relation import (  # noqa: E402
    hint_loss,
    pairwise_distances,
    rkd_angle,
    rkd_distance,
    similarity_matrix,
    similarity_preserving,
)

__all__ += ["discriminator_loss", "generator_loss", "hint_loss", "pairwise_distances", "rkd_angle", "rkd_distance",
            "similarity_matrix", "similarity_preserving"]
