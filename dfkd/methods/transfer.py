"""Distillation from a transfer file (`dfkd synthesize`): the student side of the privacy split."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dfkd.augment import make_augment
from dfkd.errors import DfkdError
from dfkd.io import sha256_file
from dfkd.methods._registry import register_method
from dfkd.methods.base import Method, step_logs
from dfkd.teacher import Teacher
from dfkd.transfer import TransferData, check_teacher_fits, load_transfer

#: `distill --transfer-data` without --steps or --budget-minutes: this many shuffled passes over the file...
EPOCHS = 25
#: ...at the run's minibatch, but at least MIN_STEPS and at most MAX_STEPS student steps.
MIN_STEPS, MAX_STEPS = 500, 100_000


def steps_for_file(images: int, batch_size: int) -> int:
    """Student steps of a run from a transfer file of `images` images when neither --steps nor a budget is given.

    `EPOCHS` passes over the file at `batch_size`, within [`MIN_STEPS`, `MAX_STEPS`]: a larger file trains
    longer, a tiny one is not over-fitted for hours, and a huge one does not run for days. Measured on the MNIST
    teachers: 5000 images at batch 128 give 977 steps, about what the in-place runs the README compares with take.
    """
    return min(max(-(-EPOCHS * images // batch_size), MIN_STEPS), MAX_STEPS)


class NoTeacher(Teacher):
    """Stands in for the teacher when a run has only a transfer file: its spec, classes and provenance, no forward.

    The engine reads spec, class count and provenance from it; the "transfer" method uses the stored
    probabilities, so nothing calls the network that is not there.
    """

    def __init__(self, data: TransferData) -> None:
        nn.Module.__init__(self)  # no module to wrap and nothing to probe
        self.module = nn.Identity()
        self.spec, self.fmt, self.source, self.sha256 = data.spec, "transfer", data.path, data.teacher_sha256
        self.arch: str | None = None
        self.arch_kwargs: dict | None = None
        self.class_names: list[str] | None = data.class_names
        self.num_classes = data.num_classes
        self.recipe = dict(data.recipe)

    def forward(self, x: Tensor) -> Tensor:
        raise DfkdError(f"this run has no teacher, only --transfer-data {self.source}; give --teacher FILE too for "
                        "what needs the teacher's network")


@register_method("transfer")
class Transfer(Method):
    """Hinton KD on stored synthetic transfer data: no synthesis, and no teacher file needed.

    Hinton et al., "Distilling the Knowledge in a Neural Network", 2015. Objective: T^2 * KL(softmax(t/T) ||
    softmax(s/T)) over minibatches of the file's images, where t are the logits of the stored teacher
    probabilities (log p) or, when the run has a teacher, the teacher's logits recomputed on the images. The engine
    sets `transfer_data` from `--transfer-data`. Epochs are shuffled passes over the file; a run given neither
    --steps nor --budget-minutes trains `steps_for_file` steps (`EPOCHS` epochs, bounded).

    A file from `dfkd synthesize` carries its method's student recipe (optimizer, learning rate, minibatch, T,
    schedule, and the augmentation that method shows its student in place). A run from the file alone takes it as
    its defaults (`-p` still overrides each), so the receiver trains as the method would in place. Without a recipe
    (version-1 files, or a run that also has --teacher) the usual KD settings apply (there is no paper recipe for
    this step): T = 4, Adam 1e-3 with cosine decay, batch 64, no augmentation.
    """

    paper: ClassVar[str] = "Hinton et al. 2015, Distilling the Knowledge in a Neural Network (on dfkd transfer data)"
    summary: ClassVar[str] = "KD from a transfer file of `dfkd synthesize` (stored soft labels, or --teacher)"
    ignores: ClassVar[dict[str, str]] = {"g_steps": "it has no generator: it trains on the --transfer-data images"}
    quick: ClassVar[dict[str, Any]] = {"batch_size": 8, "s_steps": 2}
    reads: ClassVar[str | None] = "--transfer-data"
    defaults: ClassVar[dict[str, Any]] = {
        "transfer_data": None, "batch_size": 64, "s_optimizer": "adam", "lr_s": 1e-3, "weight_decay": 0.0,
        "schedule": "cosine", "T": 4.0, "s_steps": 10, "augment": "none", "flip_p": 0.5,
    }

    @classmethod
    def default_params(cls, teacher: Teacher | None = None, recipe: str | None = None) -> dict[str, Any]:
        p = super().default_params(teacher, recipe)
        if isinstance(teacher, NoTeacher):
            p.update({k: v for k, v in teacher.recipe.items() if k in p})
        return p

    @classmethod
    def recipe_reason(cls, teacher: Any) -> str | None:
        if not isinstance(teacher, NoTeacher):
            return "with --teacher: the usual KD settings (the file's recorded recipe is for a run from it alone)"
        if teacher.recipe:
            return ("the student settings the transfer file records: its method's, so the student trains as it "
                    "would in place; -p overrides each")
        return "the file records no student recipe (a version-1 file): the usual KD settings"

    def __init__(self, teacher: Teacher, student: nn.Module, params: dict[str, Any], device: torch.device) -> None:
        path = params.get("transfer_data")
        if not path:
            raise DfkdError("method transfer trains from a transfer file: give --transfer-data FILE.npz "
                            "(made by `dfkd synthesize`)")
        super().__init__(teacher, student, params, device)
        self.data = load_transfer(path)
        self.data_sha256 = sha256_file(path)
        self.has_teacher = not isinstance(teacher, NoTeacher)
        if self.has_teacher:
            check_teacher_fits(teacher, self.data)
        if len(self.data) < int(self.p["batch_size"]):  # a batch drew the same images again, unsaid
            self.notice(f"--transfer-data {path}: {len(self.data)} images, fewer than a batch (-p batch_size="
                        f"{self.p['batch_size']}): each batch repeats them; make the file with a larger --num")
        self.augment = make_augment(self.p["augment"], teacher.spec.hw, flip_p=self.p["flip_p"],
                                    fill=teacher.spec.black).to(device)
        self.order = torch.randperm(len(self.data))
        self.cursor = 0
        self.last_logits: torch.Tensor | None = None

    def use_data(self, data: TransferData) -> None:
        """Train on `data` from now on (a rank's slice of the file), in a fresh shuffled order."""
        self.data, self.order, self.cursor = data, torch.randperm(len(data)), 0

    def next_indices(self, n: int) -> torch.Tensor:
        """The next `n` images of the current shuffled pass (a new pass starts when this one runs out)."""
        out = []
        while n > 0:
            if self.cursor >= len(self.order):
                self.order, self.cursor = torch.randperm(len(self.data)), 0
            take = self.order[self.cursor:self.cursor + n]
            self.cursor += len(take)
            n -= len(take)
            out.append(take)
        return torch.cat(out)

    def round(self) -> dict[str, float]:
        logs: dict[str, float] = {}
        for _ in self.student_steps(self.student_steps_per_round):
            idx = self.next_indices(int(self.p["batch_size"]))
            with torch.no_grad():
                x = self.augment(self.data.images(idx, self.teacher.spec).to(self.device))
                t_logits = self.teacher(x) if self.has_teacher else self.data.logits(idx).to(self.device)
            logs.update(step_logs("student", self.student_step(x, t_logits)))
            self.last_images, self.last_logits = x, t_logits
        return logs

    def extra_state(self) -> dict[str, Any]:
        return {"order": self.order.clone(), "cursor": self.cursor, "data_sha256": self.data_sha256}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("data_sha256") not in (None, self.data_sha256):
            raise DfkdError(f"--transfer-data {self.data.path}: the file changed since this run started (its sha256 "
                            "differs from the checkpoint's); resume with the original file")
        if "order" in state:
            self.order, self.cursor = state["order"].clone(), int(state["cursor"])
