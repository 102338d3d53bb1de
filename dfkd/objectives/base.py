"""What every student-side objective is: weighted loss terms read from teacher and student features."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from dfkd.errors import DfkdError
from dfkd.generators.base import LossDict
from dfkd.hooks import FeatureTaps
from dfkd.models import ZooModel
from dfkd.teacher import Teacher

#: A feature is a module path and which side of the module is read ("input" or "output").
Feature = tuple[str, str]


def student_penultimate(model: nn.Module) -> str:
    """Path of the student's final Linear layer (its input is the penultimate feature vector)."""
    if isinstance(model, ZooModel):
        return "classifier"
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise DfkdError("the student has no Linear layer to read penultimate features from")
    return linears[-1]


def teacher_penultimate(teacher: Teacher, flag: str) -> str:
    """Path of the teacher's final Linear layer, or a DfkdError naming the flag that needs it."""
    path = teacher.penultimate_path()
    if path is None:
        raise DfkdError(f"{flag}: the teacher {teacher.source} ({teacher.fmt}) offers no penultimate features "
                        "(no module hooks or no Linear layer); save it as a dfkd model file or state_dict")
    return path


class Objective:
    """A loss a method adds to its own student loss: `terms()` returns named, weighted loss tensors.

    Subclasses call `watch()` with the student and teacher features they read, implement `terms()` and set
    `default_weight` to the paper's weight. Modules in `self.learned` (adapters) are trained by the student's
    optimizer and saved in `state_dict()`.

    Args:
        teacher: the frozen teacher.
        student: the student being trained.
        params: the method's resolved hyper-parameters (`feature_weight`, `disc_weight`, `lr_d`, ...).
        device: where everything runs.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    default_weight: ClassVar[float] = 1.0

    def __init__(self, teacher: Teacher, student: nn.Module, params: dict[str, Any], device: torch.device) -> None:
        self.teacher, self.student, self.p, self.device = teacher, student, params, device
        self.weight = self.resolve_weight()
        self.learned = nn.ModuleDict()
        self._s_taps: FeatureTaps | None = None
        self._t_taps: FeatureTaps | None = None
        self._t_x: torch.Tensor | None = None  # the batch whose teacher features `_t_taps` hold

    def resolve_weight(self) -> float:
        """`feature_weight`: None -> the paper's weight; a number -> that; a dict -> its entry for this name."""
        fw = self.p.get("feature_weight")
        if isinstance(fw, dict):
            return float(fw.get(self.name, self.default_weight))
        return self.default_weight if fw is None else float(fw)

    # --- features -----------------------------------------------------------------------------------------
    def watch(self, student: list[str], teacher: list[str]) -> None:
        """Tap these student and teacher module paths (inputs and outputs are both recorded)."""
        self._s_taps = FeatureTaps(self.student, student, inputs=True, outputs=True).__enter__()
        self._s_taps.active = False
        flag = f"--feature-loss {self.name}"
        self._t_taps = _teacher_taps(self.teacher, teacher, flag) if teacher else None

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Record the student's watched features during the forwards in this block."""
        if self._s_taps is None:
            yield
            return
        self._s_taps.active = True
        try:
            yield
        finally:
            self._s_taps.active = False

    def student_feature(self, feat: Feature) -> torch.Tensor:
        """A watched student feature from the last forward inside `capture()`."""
        path, side = feat
        store = self._s_taps.inputs if side == "input" else self._s_taps.outputs
        if path not in store:
            raise RuntimeError(f"objective {self.name}: no student feature at {path}; forward the student inside "
                               "Method.student_forward (capture) before asking for terms")
        return store[path]

    def release(self) -> None:
        """Drop the recorded student features (they hold activations until the next forward otherwise)."""
        if self._s_taps is not None:
            self._s_taps.clear()

    @contextmanager
    def capture_teacher(self, x: torch.Tensor) -> Iterator[None]:
        """Record the teacher's watched features during its forward on `x` in this block.

        `teacher_features(x)` then reads them instead of forwarding the teacher again.
        """
        if self._t_taps is None:
            yield
            return
        self._t_x = None
        self._t_taps.active = True
        try:
            yield
        finally:
            self._t_taps.active = False
        self._t_x = x

    def teacher_features(self, x: torch.Tensor, feats: list[Feature]) -> list[torch.Tensor]:
        """The teacher's watched features on `x` (no gradient), forwarding the teacher only when needed.

        The taps keep the features of the last batch they saw (from `capture_teacher`, or an earlier call: ZSKT
        reuses a batch for 10 steps); another batch costs one more teacher forward.
        """
        taps = self._t_taps
        if self._t_x is not x:
            self._t_x = None
            taps.active = True
            try:
                with torch.no_grad():
                    self.teacher(x)
            finally:
                taps.active = False
            self._t_x = x
        return [(taps.inputs if side == "input" else taps.outputs)[path] for path, side in feats]

    def probe(self, s_feats: list[Feature], t_feats: list[Feature]) -> tuple[list[torch.Size], list[torch.Size]]:
        """Shapes of watched features on a 2-image batch of zeros (student in eval mode: no BN update)."""
        x = torch.zeros(self.teacher.spec.shape(2), device=self.device)
        was = self.student.training
        self.student.eval()
        try:
            with torch.no_grad(), self.capture():
                self.student(x)
            s = [self.student_feature(f).shape for f in s_feats]
        finally:
            self.student.train(was)
            self._s_taps.clear()
        t = [f.shape for f in self.teacher_features(x, t_feats)] if t_feats else []
        return s, t

    # --- the objective ------------------------------------------------------------------------------------
    def terms(self, x: torch.Tensor, s_logits: torch.Tensor, t_logits: torch.Tensor) -> LossDict:
        """Named, weighted loss terms on transfer images `x` (student forwarded inside `capture()`)."""
        raise NotImplementedError

    def extra_step(self, x: torch.Tensor, s_logits: torch.Tensor, t_logits: torch.Tensor) -> LossDict:
        """The objective's own optimisation step, after the student's update (discriminators); logged terms."""
        del x, s_logits, t_logits
        return {}

    def parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the student's optimizer (adapters)."""
        return list(self.learned.parameters())

    def state_dict(self) -> dict[str, Any]:
        return {"learned": self.learned.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learned.load_state_dict(state["learned"])

    def close(self) -> None:
        """Remove the feature taps."""
        for taps in (self._s_taps, self._t_taps):
            if taps is not None:
                taps.remove()


def _teacher_taps(teacher: Teacher, paths: list[str], flag: str) -> FeatureTaps:
    if not teacher.hookable:
        raise DfkdError(f"{flag}: the teacher {teacher.source} has no module hooks ({teacher.no_hooks}); "
                        f"{teacher.hooks_remedy} to use feature-based objectives")
    taps = teacher.tap(paths, inputs=True, outputs=True).__enter__()
    taps.active = False
    return taps
