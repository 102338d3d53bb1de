"""Loss-threshold membership inference (Yeom et al., "Privacy Risk in Machine Learning", CSF 2018).

The attacker guesses "member" when a model's loss on a labelled image is low. Its power over every threshold is
the ROC AUC of -loss between training images (members) and held-out images (non-members): 0.5 means the losses
do not tell them apart, 1.0 that every member has a lower loss than every held-out image.
"""

from __future__ import annotations

import numpy as np
import torch

from dfkd.data import ImageData, iterate_batches
from dfkd.teacher import Teacher


@torch.no_grad()
def losses(model: Teacher, data: ImageData, batch: int = 512) -> np.ndarray:
    """Per-image cross-entropy of `model` on labelled `data`."""
    out = [torch.nn.functional.cross_entropy(model(x).float(), y, reduction="none")
           for x, y in iterate_batches(data, model.spec, batch, "cpu")]
    return torch.cat(out).numpy()


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """ROC AUC: the probability that a positive scores above a negative (ties count one half)."""
    from scipy.stats import rankdata  # scipy comes with pytorch-fid

    ranks = rankdata(np.concatenate([positive, negative]))  # ties get their average rank
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def loss_threshold_auc(model: Teacher, train: ImageData, test: ImageData, seed: int = 0) -> float:
    """AUC of the loss-threshold attack on as many random training images as there are held-out images."""
    n = min(len(train), len(test))
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    members = ImageData(train.x[pick], train.y[pick])
    held = ImageData(test.x[:n], test.y[:n])
    return auc(-losses(model, members), -losses(model, held))
