"""Contrastive model inversion (CMI): projection head, feature memory bank, InfoNCE, and the CMI synthesizer.

Fang et al., "Contrastive Model Inversion for Data-Free Knowledge Distillation", IJCAI 2021 (zju-vipa/CMI,
`datafree/synthesis/contrastive.py`). A sample's feature is the concatenation of its per-channel means at every
teacher BatchNorm input; two views of the same image are positives, every other image (current or remembered) a
negative, so the generator is pushed to make batches unlike each other and unlike the past.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfkd.generators.base import LossDict
from dfkd.generators.latent import LatentObjective, LatentSynthesizer, optimise_latent, reinit_
from dfkd.generators.store import DEFAULT_RAM_BUDGET_MIB, RecordStore, to_device
from dfkd.precision import step


def instance_means(bn_inputs: Sequence[Tensor]) -> Tensor:
    """Per-sample channel means of each BatchNorm input, concatenated (CMI's `InstanceMeanHook`).

    Shape:
        - bn_inputs: each (B, C_l, H, W) or (B, C_l)
        - output: (B, sum_l C_l)
    """
    return torch.cat([x.flatten(2).mean(dim=2) if x.dim() > 2 else x for x in bn_inputs], dim=1)


class ProjectionHead(nn.Module):
    """Linear(d, d) - ReLU - Linear(d, out) - L2 normalisation (CMI's `MLPHead`).

    Shape:
        - Input: (N, d)
        - Output: (N, out), unit rows
    """

    def __init__(self, dim_in: int, dim_out: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim_in, dim_in), nn.ReLU(inplace=True), nn.Linear(dim_in, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.net(x), p=2, dim=1)


class MemoryBank:
    """A bounded ring of feature rows; `sample(k)` draws k distinct stored rows (torch RNG, so seeded).

    A `RecordStore` (float32 rows): it grows as it fills, is served from disk past `ram_budget_mib`, and in a run
    its rows are appended to files in the run folder (`attach`), so a checkpoint holds only the count of rows.

    Args:
        capacity: rows kept (the reference: 40,960); the oldest drop out first.
        dim: row width.
        ram_budget_mib: rows are served from memory while they take at most this many MiB, else from disk.
    """

    def __init__(self, capacity: int, dim: int, ram_budget_mib: float = DEFAULT_RAM_BUDGET_MIB) -> None:
        self.dim = int(dim)
        self.store = RecordStore(capacity, "bank", ram_budget_mib)

    def __len__(self) -> int:
        return len(self.store)

    @property
    def capacity(self) -> int:
        return self.store.capacity

    @property
    def data(self) -> Tensor:
        """Every stored row, oldest first (a copy)."""
        return self.store.gather(torch.arange(len(self)))[0] if len(self) else torch.zeros(0, self.dim)

    @property
    def ptr(self) -> int:
        """The ring slot the next row goes to."""
        return self.store.added % self.store.capacity

    def attach(self, folder: str | os.PathLike) -> None:
        """Keep the bank's rows in files in `folder` (the run folder) from now on."""
        self.store.attach(folder)

    def add(self, rows: Tensor) -> None:
        """Store `rows` (N, dim), detached, on the CPU."""
        self.store.append(rows.detach().to("cpu", torch.float32))

    def sample(self, k: int) -> Tensor:
        """Up to `k` distinct rows, uniformly at random (fewer when fewer are stored)."""
        idx = torch.randperm(len(self))[: min(k, len(self))]
        return self.store.gather(idx)[0] if len(idx) else torch.zeros(0, self.dim)

    def close(self) -> None:
        self.store.close()

    def state_dict(self) -> dict[str, Any]:
        return {"dim": self.dim, "store": self.store.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "store" not in state:  # a checkpoint of dfkd before the record store: the rows themselves
            data, cap, ptr = state["data"], int(state["capacity"]), int(state["ptr"])
            order = torch.arange(len(data)) if len(data) < cap else (ptr + torch.arange(cap)) % cap
            state = {"dim": data.shape[1], "store": {"capacity": cap, "added": len(data), "records": [data[order]],
                                                     "fields": [[[data.shape[1]], "float32"]]}}
        if int(state["dim"]) != self.dim:
            raise ValueError(f"memory bank rows of width {state['dim']}, expected {self.dim}")
        self.store.load_state_dict(state["store"])


def info_nce(local: Tensor, global_: Tensor, n_current: int, tau: float) -> Tensor:
    """CMI's split InfoNCE: row i of `local` must pick row i of `global_` (detached) among all rows.

    logits = local @ global_.detach().T / tau; per-row cross-entropy with the diagonal as the label; the result is
    mean over the first `n_current` rows (this batch) + mean over the remaining rows (the bank), so the current
    batch's gradient is not diluted by thousands of remembered rows.

    Shape:
        - local, global_: (N, D), N >= n_current
        - output: ()
    """
    logits = local @ global_.detach().T / tau
    ce = F.cross_entropy(logits, torch.arange(local.shape[0], device=local.device), reduction="none")
    loss = ce[:n_current].mean()
    return loss + ce[n_current:].mean() if ce.shape[0] > n_current else loss


class ContrastiveCritic:
    """Projection head (own Adam) + memory bank: the contrastive term of one synthesis step.

    Args:
        feat_dim: width of one view's feature (sum of the teacher's BatchNorm channels).
        lr: head learning rate (the reference uses lr_g).
        proj_dim: projection width (256).
        tau: temperature (cr_T).
        n_neg: remembered rows sampled per step (4096).
        capacity: bank rows (40,960).
        device: where the head runs.
        ram_budget_mib: the bank's memory budget (see `MemoryBank`).
    """

    def __init__(self, feat_dim: int, lr: float, proj_dim: int = 256, tau: float = 0.2, n_neg: int = 4096,
                 capacity: int = 40960, device: torch.device | str = "cpu",
                 ram_budget_mib: float = DEFAULT_RAM_BUDGET_MIB) -> None:
        self.head = ProjectionHead(feat_dim, proj_dim).to(device)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=lr)
        self.bank = MemoryBank(capacity, 2 * feat_dim, ram_budget_mib)
        self.tau, self.n_neg, self.device = tau, n_neg, torch.device(device)

    def loss(self, feats: Tensor) -> Tensor:
        """InfoNCE of this batch's (B, 2d) [local | global] features against itself and sampled bank rows."""
        cached = to_device(self.bank.sample(self.n_neg), self.device)
        local, global_ = feats.chunk(2, dim=1)
        cached_local, cached_global = cached.chunk(2, dim=1)
        proj = self.head(torch.cat([local, cached_local, global_, cached_global]))
        p_local, p_global = proj.chunk(2)
        return info_nce(p_local, p_global, feats.shape[0], self.tau)

    def step(self) -> None:
        """Apply and clear the head's gradient (after each synthesis backward)."""
        step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.bank.load_state_dict(state["bank"])


class ContrastiveSynthesizer(LatentSynthesizer):
    """CMI synthesis: re-initialise G, learn {G, z} for `steps` iterations on L_inv + cr * L_cr, pool the best.

    The method's objective returns its inversion losses and the batch's [local | global] features (see
    `instance_means`); this class adds the contrastive term and, after the round, banks the best batch's features.

    Args:
        generator, objective, pool, batch_size, steps, num_classes, device, sample_augment: see LatentSynthesizer.
        critic: the contrastive head and bank.
        cr: weight of the contrastive term (0 skips it: Fast-Datafree's "tuned fast CMI").
        lr: Adam learning rate of {G, z}.
        betas: Adam betas ((0.5, 0.999)).
    """

    def __init__(self, generator: nn.Module, objective: LatentObjective, pool: Any, batch_size: int, steps: int,
                 num_classes: int, critic: ContrastiveCritic, cr: float, lr: float,
                 betas: tuple[float, float] = (0.5, 0.999), device: torch.device | str = "cpu",
                 sample_augment: nn.Module | None = None) -> None:
        super().__init__(generator, objective, pool, batch_size, steps, num_classes, device, sample_augment)
        self.critic, self.cr, self.lr, self.betas = critic, cr, lr, betas

    def _with_contrast(self, x: Tensor, y: Tensor) -> tuple[LossDict, Tensor | None]:
        losses, feats = self.objective(x, y)
        if not self.cr or feats is None:
            return losses, feats
        cr = self.critic.loss(feats)
        return {**losses, "loss": losses["loss"] + self.cr * cr, "loss/cr": cr}, feats

    def synthesize(self) -> tuple[Tensor, LossDict]:
        reinit_(self.generator)
        z, y = self.latents()
        opt = torch.optim.Adam([{"params": self.generator.parameters()}, {"params": [z]}], lr=self.lr,
                               betas=self.betas)
        self.critic.optimizer.zero_grad(set_to_none=True)
        best = optimise_latent(self.generator, z, y, opt, self._with_contrast, self.steps,
                               after_backward=lambda _: self.critic.step(), stop=self.stopper())
        self.pool.add(best.x)
        if best.memo is not None:
            self.critic.bank.add(best.memo)
        return best.x, best.losses

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "critic": self.critic.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.critic.load_state_dict(state["critic"])
