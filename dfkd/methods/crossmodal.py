"""Cross-modal distillation: the teacher sees modality A, the student learns modality B from paired samples."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from dfkd.data import ImageData, to_model_input
from dfkd.errors import DfkdError
from dfkd.generators import LossDict, RealData
from dfkd.losses import kl_div
from dfkd.methods._registry import register_method
from dfkd.methods.base import Method, step_logs
from dfkd.paired import load_paired
from dfkd.precision import backward, step
from dfkd.teacher import Teacher


class PairedData(RealData):
    """Shuffled epochs of (A, B) pairs (no augmentation, to keep pairs aligned).

    `data` holds modality B with each image's pair index as its "label", so a rank that keeps a slice of `data`
    (`dfkd.sources`) still finds each image's partner in `a`.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, spec: Any, batch_size: int, device: torch.device) -> None:
        super().__init__(ImageData(b, torch.arange(len(b))), spec, batch_size, device, False)
        self.a = a

    def pair(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` pairs, each side brought to the model input (channels repeated or averaged, resized, normalised)."""
        idx = self.indices(n)
        return (to_model_input(self.a[self.data.y[idx]], self.spec).to(self.device),
                to_model_input(self.data.x[idx], self.spec).to(self.device))


@register_method("crossmodal")
class CrossModal(Method):
    """Supervision transfer: the student on modality B imitates the teacher's responses on the paired modality A.

    Gupta, Hoffman & Malik, "Cross Modal Distillation for Supervision Transfer", CVPR 2016. With paired, unlabelled
    images (A_i, B_i) in `--data` (`x_teacher`, `x_student`; `dfkd.paired`), the loss is kd * T^2
    KL(softmax(t(A)/T) || softmax(s(B)/T)) plus every `--feature-loss` between the teacher's features on A and
    the student's on B (`--feature-loss fitnet` is the paper's mid-level feature regression). Gupta et al. regress
    features and fine-tune; a KD term on the logits (T 4, as Hinton et al.) is dfkd's default because it trains the
    classifier end to end; the student's input is B brought to the teacher's input shape (grey repeated to three
    channels or colour averaged to one, resized), so `dfkd evaluate --model student.pt --data B_test.npz` reads B
    directly. Optimiser as `kd` (SGD 0.05, momentum 0.9, wd 5e-4, batch 64, x0.1 at 62.5/75/87.5 % of the run).
    """

    paper: ClassVar[str] = "Gupta et al. 2016, Cross Modal Distillation for Supervision Transfer, CVPR"
    summary: ClassVar[str] = "student on modality B imitates the teacher on paired modality A (--data paired.npz)"
    ignores: ClassVar[dict[str, str]] = {"g_steps": "it has no generator: it trains on the --data pairs"}
    quick: ClassVar[dict[str, Any]] = {"batch_size": 8}
    reads: ClassVar[str | None] = "--data"
    eval_other_modality: ClassVar[bool] = True  # --eval-data is modality B, which the teacher is not made for
    defaults: ClassVar[dict[str, Any]] = {
        "data": None, "T": 4.0, "kd": 1.0, "batch_size": 64, "lr_s": 0.05, "weight_decay": 5e-4,
        "schedule": "multistep", "milestones": [0.625, 0.75, 0.875],
    }

    def __init__(self, teacher: Teacher, student: nn.Module, params: dict[str, Any], device: torch.device) -> None:
        super().__init__(teacher, student, params, device)
        if not params.get("data"):
            raise DfkdError("method crossmodal learns from paired images: give --data PAIRED.npz (arrays x_teacher "
                            "and x_student; make one with bench/make_paired.py)")
        a, b = load_paired(params["data"])
        for side, x in (("x_teacher", a), ("x_student", b)):
            if x.shape[1] not in (1, 3) and x.shape[1] != teacher.spec.channels:
                raise DfkdError(f"--data {params['data']}: {side} has {x.shape[1]} channels, the models take "
                                f"{teacher.spec.channels}")
        self.synth: PairedData = PairedData(a, b, teacher.spec, params["batch_size"], device)

    def round(self) -> dict[str, float]:
        logs: dict[str, float] = {}
        for _ in self.student_steps(self.student_steps_per_round):
            xa, xb = self.synth.pair(self.p["batch_size"])
            self.last_images = xb
            logs.update(step_logs("student", self.paired_step(xa, xb)))
        return logs

    def paired_step(self, xa: torch.Tensor, xb: torch.Tensor) -> LossDict:
        """One student update: teacher (and its features) on A, student on B."""
        with torch.no_grad(), self.objectives.capture_teacher(xa):
            t_logits = self.teacher(xa)
        s_logits = self.student_forward(xb)
        kd = kl_div(s_logits, t_logits, T=self.p["T"])
        losses = self.with_objectives({"loss": self.p["kd"] * kd, "loss/kd": kd}, xa, s_logits, t_logits)
        self.opt_s.zero_grad(set_to_none=True)
        backward(losses["loss"])
        self.clip_student(losses)
        step(self.opt_s)
        losses.update(self.objectives.extra_step(xa, s_logits, t_logits))
        return losses
