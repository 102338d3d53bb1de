"""NAYER: noisy-layer data generation from label embeddings (Tran et al., CVPR 2024; tmtuan1307/NAYER)."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch

from dfkd.augment import make_augment
from dfkd.bnstats import BN_DEFAULTS, BNInputs
from dfkd.errors import DfkdError
from dfkd.generators import LossDict
from dfkd.generators.noisy import (
    NoisyLayerGenerator,
    NoisyLayerSynthesizer,
    fixed_class_embeddings,
    text_class_embeddings,
)
from dfkd.generators.pool import ImagePool
from dfkd.generators.store import DEFAULT_RAM_BUDGET_MIB
from dfkd.losses import update_bn_ema
from dfkd.methods._budget import WARMUP_SHARE, IterationPlanner
from dfkd.methods._recipes import cap_batches, teacher_kind
from dfkd.methods._registry import register_method
from dfkd.methods.base import Method, Needs, frozen, step_logs
from dfkd.methods.fast import momentum_objective
from dfkd.teacher import Teacher

#: The reference's CIFAR-10 setting (`scripts/nayer_100.sh`, `run/nayer_200.sh`; `datafree_kd.py` defaults).
PAPER: dict[str, Any] = {
    "batch_size": 512, "synth_batch_size": 400, "lr_s": 0.2, "momentum": 0.9, "weight_decay": 1e-4,
    "schedule": "cosine", "T": 20.0, "s_steps": 400, "g_steps": 30, "lr_g": 4e-3, "betas_g": [0.5, 0.999],
    "adv": 1.33, "bn": 10.0, "oh": 0.5, "bn_mmt": 0.9, "warmup_rounds": 20, "g_loops": 2, "gwp_loops": 10,
    "g_life": 10, "le_emb_size": 1000, "le_size": 512, "ngf": 64,
    "pool_size": 160_000,  # all of a 120-round run: 20 x 10 + 100 x 2 batches of 400 (the reference keeps all)
}
#: CIFAR-100-size label sets (>= 100 classes): 40 generator steps a batch (`scripts/nayer_100.sh`).
PAPER_100_CLASSES: dict[str, Any] = {"g_steps": 40}
#: Inputs of 64 px or more: the Tiny-ImageNet setting (`scripts/nayer_100.sh` tir34r18).
PAPER_IMAGENET: dict[str, Any] = {"batch_size": 256, "synth_batch_size": 200, "lr_s": 0.1, "g_steps": 60,
                                  "g_loops": 4, "gwp_loops": 20, "s_steps": 1000}


@register_method("nayer")
class NAYER(Method):
    """NAYER: a generator fed constant label embeddings through a noisy layer re-drawn before every batch.

    Tran et al., "NAYER: Noisy Layer Data Generation for Efficient and Effective Data-free Knowledge
    Distillation", CVPR 2024 (tmtuan1307/NAYER, `datafree/synthesis/nayer.py`, `datafree/models/generator.py`,
    `datafree_kd.py`). A round is the reference's epoch: before it, the whole generator is re-initialised when
    `(round - warmup_rounds) % g_life == 0 or round % g_life == 0`; then `g_loops` batches (`gwp_loops` in the
    first `warmup_rounds` rounds), each with its noisy layers re-drawn N(0, 1), balanced targets (0..K-1 repeated,
    the remainder random), a fresh Adam (lr_g, betas 0.5/0.999) on all generator weights and g_steps iterations of
    bn*R_BN-momentum + oh*CE(t(aug x), y) + adv*masked-KL(s, t) (adv only after the warm-up); the lowest-loss
    iterate goes to the pool and the BN EMA (m = bn_mmt) is updated. After the warm-up each round ends with
    s_steps student steps on pool samples (crop + flip), KL at T = 20, SGD with a cosine schedule; warm-up
    rounds make no student step. K-to-1 noisy layers: one Linear(le_size, le_emb_size) per chunk of K samples.

    Paper recipe (`-p recipe=paper`; the default for every teacher but small MNIST-kind ones):
    CIFAR-10 (`scripts/nayer_100.sh`): student batch 512, synthesis batch 400, lr 0.2, wd 1e-4, T 20, 400 KD
    steps, g_steps 30, lr_g 4e-3, adv 1.33, bn 10, oh 0.5, bn_mmt 0.9, warm-up 20 rounds of 10 batches, then 2
    batches a round, g_life 10, noisy-layer width 1000, ngf 64, a pool of 160,000 images (all of a 120-round run);
    100 classes or more: g_steps 40; inputs of 64 px or more: the Tiny-ImageNet setting (batch 256 / 200, lr 0.1,
    g_steps 60, 4 batches, 20 in warm-up, 1000 KD steps), batches capped at 64 above 64 px (no script there). The
    paper has no MNIST setting: MNIST-size teachers get the CIFAR one.
    CPU recipe (`-p recipe=cpu`; the default for MNIST-kind teachers of any cost; chosen, the lr measured):
    synthesis batch 64, student batch 128, s_steps 50, student lr 0.05 (as Fast-DFKD's CPU recipe; CMI's stays at
    0.01; 5 CPU-minutes, LeNet-5-half: 0.01 75.8 %, 0.05 80.0 top-1 on a Fashion-MNIST BN CNN, 97.98 / 98.47 on
    the MNIST LeNet-5-BN), g_steps 10, warm-up 2 rounds of 5 batches, generator width 16, a pool of 60,000 images.

    Label embeddings: the paper encodes "a image of <class>" with CLIP ViT-B/32 (512-d). This machine cannot
    download it, so by default (`text_encoder=none`) each class gets a fixed random N(0, I) 512-d vector (seeded,
    the same in every run): the inputs are distinct per class but carry no inter-class similarity. With
    open_clip or sentence-transformers installed (`pip install 'dfkd[text]'`) and weights cached or on disk,
    `-p text_encoder=open_clip:ViT-B-32:WEIGHTS_FILE` (the paper's) or `sentence-transformers:PATH` embeds the
    teacher's class names (or `-p class_names=[...]`); nothing is downloaded.
    Under a time budget (`--budget-minutes`) the recipe is fitted to it, with a note: a generator loop's g_steps
    are cut to about 5 % of the budget, the warm-up ends early once it has used 20 % (the paper's 200 batches of
    400 take hours on a CPU at CIFAR size), and a round's student steps take at most 10 % and end inside the time
    left; under `--steps` the recipe runs as given.
    Deviations: the best batch of each generator loop is chosen within that loop (the reference keeps one best
    cost across a round's loops, so a later loop can keep its first, unoptimised iterate); the cosine schedule
    has no eta_min (2e-4) and, under a time budget, runs over the warm-up too; the pool is an ImagePool (float16;
    on disk past `ram_budget_mib`); synthesis views are crop + flip at every size (the reference does not flip
    at 64 px); 1-channel teachers get no flips.
    """

    paper: ClassVar[str] = ("Tran et al. 2024, NAYER: Noisy Layer Data Generation for Efficient and Effective "
                            "Data-free Knowledge Distillation, CVPR")
    summary: ClassVar[str] = "label embeddings through a noisy layer re-drawn every batch; few generator steps"
    uses_bn: ClassVar[bool] = True
    quick: ClassVar[dict[str, Any]] = {"batch_size": 8, "synth_batch_size": 12, "g_steps": 2, "s_steps": 2,
                                       "warmup_rounds": 0, "g_loops": 1, "le_emb_size": 16, "le_size": 16}
    needs: ClassVar[Needs] = {
        "bn_mmt": (lambda p: bool(p["bn"]), "-p bn=0: no BN-statistics term")}
    cpu: ClassVar[dict[str, Any]] = {"synth_batch_size": 64, "batch_size": 128, "s_steps": 50, "lr_s": 0.05,
                                     "g_steps": 10, "warmup_rounds": 2, "gwp_loops": 5, "ngf": 16, "pool_size": 60_000,
                                     "clip_s": 1.0}
    cpu_reason: ClassVar[str] = (
        "chosen for a CPU: Fast-DFKD's CPU batches 64/128, 50 KD steps a round and student lr 0.05 "
        "(0.01 trails it on two BN teachers; at T=20, 0.2 kills a BN-free LeNet-5-half), generator width 16, "
        "g_steps 10 and a 2-round warm-up of 5 batches (the paper's 20 x 10 batches of 400 at 30 steps would "
        "fill a short CPU run); the student's gradient clipped to norm 1 (unclipped, lr 0.05 left a BN-free "
        "LeNet-5-half dead at chance on a Fashion-MNIST LeNet-5)")
    cpu_any_cost: ClassVar[bool] = True  # batches, widths, steps a round: a step's cost
    deviations: ClassVar[tuple[str, ...]] = (
        "label embeddings are fixed random class vectors unless -p text_encoder names a local encoder (the paper: "
        "CLIP ViT-B/32 text embeddings of 'a image of <class>')",
        "the best iterate is chosen within each generator loop (the reference keeps one best cost across a round's "
        "loops)",
        "the cosine schedule has no eta_min (2e-4 in the reference) and, under a time budget, runs over the warm-up",
        "the pool is an ImagePool (float16, up to pool_size images, on disk past ram_budget_mib), not PNG files",
        "synthesis views are crop + flip at every size (the reference does not flip at 64 px); 1-channel teachers "
        "get no flips")
    defaults: ClassVar[dict[str, Any]] = {
        **PAPER, "text_encoder": "none", "class_names": None, "flip_p": 0.5,
        "pool_dtype": "float16", "pool_dir": None, "ram_budget_mib": DEFAULT_RAM_BUDGET_MIB, **BN_DEFAULTS,
    }

    # --- recipe -------------------------------------------------------------------------------------------
    @classmethod
    def paper_params(cls, teacher: Teacher | None = None) -> dict[str, Any]:
        """The reference's setting for this teacher's input kind and class count."""
        p = super().paper_params(teacher)
        if teacher is not None and teacher.num_classes >= 100:
            p.update(PAPER_100_CLASSES)
        if teacher_kind(teacher) == "imagenet":
            p.update(PAPER_IMAGENET)
            if teacher.spec.side > 64:
                cap_batches(p)
        if teacher is not None and teacher.spec.channels == 1:
            p["flip_p"] = 0.0  # digits and other grey-scale documents are not mirror-symmetric
        return p

    # --- construction -------------------------------------------------------------------------------------
    def __init__(self, teacher: Teacher, student: torch.nn.Module, params: dict[str, Any],
                 device: torch.device) -> None:
        super().__init__(teacher, student, params, device)
        p, spec = self.p, teacher.spec
        self.generator = NoisyLayerGenerator(spec, self.label_embeddings(), p["le_emb_size"], p["ngf"],
                                             p["synth_batch_size"]).to(device)
        self.pool = ImagePool(p["pool_size"], getattr(torch, p["pool_dtype"]), p["pool_dir"], p["ram_budget_mib"])
        self.augment = make_augment("crop_flip", spec.hw, flip_p=p["flip_p"], fill=spec.black)
        self.bn = BNInputs(teacher, self.name, p["input_stats"])
        self.synth = NoisyLayerSynthesizer(self.generator, self.objective, self.pool, p["synth_batch_size"],
                                           p["g_steps"], teacher.num_classes, p["lr_g"], tuple(p["betas_g"]), device,
                                           self.augment)
        self.ema: list | None = None
        self._last_layers: list = []
        self.rounds = 0
        self.planner = IterationPlanner(self.name, p["g_steps"], None, self.notice)
        self.warmup_seconds = 0.0  # budget seconds spent in warm-up rounds
        self.warmup_end = int(p["warmup_rounds"])  # cut short when the warm-up would not fit a time budget

    def label_embeddings(self) -> torch.Tensor:
        """The classes' text embeddings from a local encoder, or fixed random ones (`text_encoder=none`)."""
        p, k = self.p, self.teacher.num_classes
        if p["text_encoder"] == "none":
            warnings.warn(f"nayer: label embeddings are fixed random class vectors ({p['le_size']}-d), not the "
                          "paper's CLIP text embeddings; with open_clip or sentence-transformers installed and "
                          "weights on disk, set -p text_encoder=... (see `dfkd methods --params nayer`)",
                          stacklevel=3)
            return fixed_class_embeddings(k, p["le_size"])
        names = p["class_names"] or self.teacher.class_names
        if not names or len(names) != k:
            raise DfkdError(f"-p text_encoder={p['text_encoder']}: needs {k} class names; the teacher file has "
                            f"{len(names or [])}: give -p class_names='[\"name0\", ...]' or -p text_encoder=none")
        emb = text_class_embeddings(p["text_encoder"], [str(n) for n in names])
        p["le_size"] = int(emb.shape[1])
        return emb

    # --- rounds -------------------------------------------------------------------------------------------
    @property
    def warming_up(self) -> bool:
        return self.rounds < self.warmup_end

    @property
    def student_steps_per_round(self) -> int:
        return 0 if self.warming_up else super().student_steps_per_round

    def synthesis_reserve(self) -> float:
        return int(self.p["g_loops"]) * self.planner.batch_seconds

    def waiting(self) -> str | None:
        if not self.warming_up:
            return None
        return (f"warm-up round {self.rounds + 1}/{self.warmup_end}: {self.p['gwp_loops']} synthesized batches, "
                "no student step until the warm-up ends")

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> tuple[LossDict, None]:
        self.planner.calls += 1
        return momentum_objective(self, x, y, bool(self.p["adv"]) and not self.warming_up), None

    def _generator_batch(self) -> tuple[torch.Tensor, LossDict]:
        """One generator loop, its g_steps planned to fit a time budget (the recipe's under a step budget).

        The first loop under a time budget, its speed unknown, ends at the planner's cap on the budget's clock.
        """
        self.planner.fit(self.synth, self.time_budget, self.clock)
        start = self.clock()
        with self.planner.timing(self.clock):
            out = self.synth.synthesize()
        if self.warming_up:
            self.warmup_seconds += self.clock() - start
        return out

    def _warmup_spent(self) -> bool:
        """Whether the warm-up has used its share of a time budget; if so, it ends with this round."""
        if self.time_budget is None or self.warmup_seconds < WARMUP_SHARE * self.time_budget:
            return False
        self.notice(f"{self.name}: the warm-up ({self.warmup_end} rounds of {self.p['gwp_loops']} batches) would "
                    f"take more than {WARMUP_SHARE:.0%} of the {self.time_budget / 60:g}-minute budget here; it "
                    f"ends after {self.rounds + 1} round(s) (a larger --budget-minutes, --steps or a faster device "
                    "keeps the recipe's)")
        self.warmup_end = self.rounds + 1
        return True

    def synthesize(self) -> dict[str, float]:
        """The round's generator loops (the student frozen and in eval mode, as the reference)."""
        p, r, warm = self.p, self.rounds, self.warmup_end
        if (r - warm) % p["g_life"] == 0 or r % p["g_life"] == 0:
            self.generator.reset_all()
        logs: dict[str, float] = {}
        batches = []
        self.bn.set_active(True)
        self.student.eval()
        try:
            with frozen(self.student):
                for _ in range(int(p["gwp_loops"] if self.warming_up else p["g_loops"])):
                    self._last_layers = []
                    x, losses = self._generator_batch()
                    if self._last_layers and p["bn_mmt"]:
                        self.ema = update_bn_ema(self._last_layers, self.ema, p["bn_mmt"])
                    batches.append(x)
                    logs = step_logs("gen", losses)
                    if self.warming_up and self.warmup_end > r + 1 and self._warmup_spent():
                        break
        finally:
            self.student.train()
            self.bn.set_active(False)
        self.last_images = torch.cat(batches) if batches else self.last_images
        return logs

    def round(self) -> dict[str, float]:
        n = self.student_steps_per_round
        logs = self.synthesize()
        self.rounds += 1
        for _ in self.student_steps(n):
            logs.update(step_logs("student", self.student_step(self.synth.sample(self.p["batch_size"]))))
        return logs

    # --- state --------------------------------------------------------------------------------------------
    def close(self) -> None:
        self.bn.close()
        super().close()

    def extra_state(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "warmup_end": self.warmup_end, "warmup_seconds": self.warmup_seconds,
                "bn_ema": None if self.ema is None else [[m.clone(), v.clone()] for m, v in self.ema]}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.rounds = int(state.get("rounds", 0))
        self.warmup_end = int(state.get("warmup_end", self.warmup_end))
        self.warmup_seconds = float(state.get("warmup_seconds", 0.0))
        ema = state.get("bn_ema")
        self.ema = None if ema is None else [(m.to(self.device), v.to(self.device)) for m, v in ema]
