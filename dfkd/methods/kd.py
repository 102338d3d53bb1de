"""KD on real images: Hinton et al.'s knowledge distillation, the real-data mode of every dfkd objective."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.data import load_for
from dfkd.errors import DfkdError
from dfkd.evaluate import size_note
from dfkd.generators import LossDict, RealData
from dfkd.losses import kl_div
from dfkd.methods._registry import register_method
from dfkd.methods.base import Method, step_logs
from dfkd.teacher import Teacher


@register_method("kd")
class KD(Method):
    """KD: the student matches the teacher's temperature-softened outputs on real images, plus the labels' CE.

    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", arXiv 1503.02531 (2015). Loss
    kd * T^2 KL(softmax(t/T) || softmax(s/T)) + ce * CE(s, y) on `--data TRAIN` (.npz or ImageFolder), augmented as
    `dfkd train-teacher` does. Defaults are mdistiller's KD recipe (T 4, kd 0.9, ce 0.1; SGD 0.05, momentum 0.9,
    wd 5e-4, batch 64, x0.1 at 150/180/210 of 240 epochs, here as fractions of the run); `-p ce=0` ignores the
    labels. Every objective (`--feature-loss`, `--discriminator`) works here as with the data-free methods.
    CPU recipe (`-p recipe=cpu`; the default for small MNIST-kind teachers, `_recipes.cpu_teacher`): the student's
    gradient clipped to norm 1 (`clip_s`). That recipe is for BN ResNets; a BN-free LeNet-5-half at lr 0.05
    unclipped ended three seeds of 300 steps on the MNIST demo teacher (5,000 training digits) at 53.8, 90.1 and
    10.1 % (a constant output); clipped, at 96.4, 96.3 and 97.2 % (lr 0.01 unclipped: 96.8, 95.9, 97.4). On
    Fashion-MNIST (300 steps on the training set, seeds 0-2, LeNet-5-half): a BN-free LeNet-5 teacher 9.85 / 9.85 /
    54.85 % unclipped against 76.30 / 72.40 / 72.75 clipped; a BN CNN at 28 px 63.90 / 9.85 / 9.85 against 77.30 /
    76.40 / 74.15.
    """

    paper: ClassVar[str] = "Hinton et al. 2015, Distilling the Knowledge in a Neural Network, arXiv:1503.02531"
    summary: ClassVar[str] = "vanilla KD at T=4 on real training images (--data), no synthesis"
    ignores: ClassVar[dict[str, str]] = {"g_steps": "it has no generator: it trains on the --data images"}
    quick: ClassVar[dict[str, Any]] = {"batch_size": 8}
    reads: ClassVar[str | None] = "--data"
    cpu: ClassVar[dict[str, Any]] = {"clip_s": 1.0}
    cpu_reason: ClassVar[str] = ("the student's gradient clipped to norm 1: at lr 0.05, unclipped, a BN-free "
                                 "LeNet-5-half ended one of three MNIST runs at a constant output")
    defaults: ClassVar[dict[str, Any]] = {
        "data": None, "T": 4.0, "kd": 0.9, "ce": 0.1, "augment": True, "batch_size": 64, "lr_s": 0.05,
        "weight_decay": 5e-4, "schedule": "multistep", "milestones": [0.625, 0.75, 0.875],
    }

    def __init__(self, teacher: Teacher, student: nn.Module, params: dict[str, Any], device: torch.device) -> None:
        super().__init__(teacher, student, params, device)
        path = params.get("data")
        if not path:
            raise DfkdError("method kd distills on real images: give --data TRAIN (an .npz with x, y or an "
                            "ImageFolder directory); without data, use a data-free method (see `dfkd methods`)")
        data = load_for(path, "--data", teacher.num_classes, teacher.spec, teacher.class_names)
        if how := size_note(data, teacher.spec):  # 28x56 images stretched to 32x32 trained at half the top-1, unsaid
            self.notice(f"--data {path}: its images are {how} for the teacher (--eval-data is read the same way)")
        if len(data) < int(params["batch_size"]):  # every step saw the same few images, unsaid
            batch = params["batch_size"]
            self.notice(f"--data {path}: {len(data)} images, fewer than a batch (-p batch_size={batch}): every step "
                        "trains on all of them, and the student can learn them by heart")
        self.synth: RealData = RealData(data, teacher.spec, params["batch_size"], device, bool(params["augment"]))
        self._labels: torch.Tensor | None = None

    def student_loss(self, s_logits: torch.Tensor, t_logits: torch.Tensor) -> LossDict:
        kd = kl_div(s_logits, t_logits, T=self.p["T"])
        ce = F.cross_entropy(s_logits, self._labels) if self.p["ce"] else s_logits.new_zeros(())
        return {"loss": self.p["kd"] * kd + self.p["ce"] * ce, "loss/kd": kd, "loss/ce": ce}

    def round(self) -> dict[str, float]:
        logs: dict[str, float] = {}
        for _ in self.student_steps(self.student_steps_per_round):
            x, self._labels = self.synth.batch(self.p["batch_size"])
            self.last_images = x
            logs.update(step_logs("student", self.student_step(x)))
        return logs
