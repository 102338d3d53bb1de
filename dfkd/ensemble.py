"""Several teachers as one: averaged or weighted logits, BN statistics of every member, features of the first."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.errors import DfkdError
from dfkd.hooks import FeatureTaps
from dfkd.spec import InputSpec
from dfkd.teacher import Teacher, load_teacher, warn_unused_arch

WEIGHTINGS = ("mean", "confidence")


def _same_normalisation(a: InputSpec, b: InputSpec) -> bool:
    return all(abs(x - y) <= 1e-4 for x, y in zip(a.mean + a.std, b.mean + b.std))


class EnsembleTeacher(Teacher):
    """Teachers that may differ in architecture, answering as one: a weighted mean of their logits.

    `module` is a ModuleDict {"t0": first, "t1": second, ...}, so every path the ensemble hands out is prefixed:
    `bn_paths()` lists the BatchNorm layers of every member ("t0.stage1.1", "t1.layer1.0.bn1", ...), so BN-statistics
    losses sum over all teachers; `stage_paths()`, `penultimate_path()` and `forward_with_features()` address the
    first member (feature-based losses read its features). Members must agree on classes, channels and input size;
    a member trained with another normalisation receives its own (the ensemble's input is normalised as the
    first member's).

    Args:
        members: the loaded teachers, in --teacher order.
        weights: fixed weight per member (normalised to sum 1); None for equal weights.
        weighting: "mean" (the fixed weights) or "confidence" (per sample, each member's fixed weight times its
            maximum softmax probability, renormalised over members).

    Shape:
        - Input: (B, C, S, S), normalised as the first member's spec says.
        - Output: (B, num_classes) logits.
    """

    def __init__(self, members: Sequence[Teacher], weights: Sequence[float] | None = None,
                 weighting: str = "mean") -> None:
        check_members(members)
        first = members[0]
        modules = nn.ModuleDict({f"t{i}": m.module for i, m in enumerate(members)})
        self.members = list(members)  # a plain list: their modules are registered once, under `module`
        super().__init__(modules, first.spec, fmt="ensemble", source=" + ".join(m.source for m in members),
                         sha256=",".join(m.sha256 for m in members), arch=first.arch, arch_kwargs=first.arch_kwargs,
                         class_names=next((m.class_names for m in members if m.class_names), None))
        self.member_weights = member_weights(weights, len(members))
        if weighting not in WEIGHTINGS:
            raise DfkdError(f"-p teacher_weighting={weighting!r}: use {' or '.join(WEIGHTINGS)}")
        self.weighting = weighting

    def _probe_classes(self) -> int:
        return self.members[0].num_classes

    @property
    def hookable(self) -> bool:
        return self.members[0].hookable

    def member_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each member's logits on `x` (re-normalised for members trained with another normalisation)."""
        x01 = None
        out = []
        for m in self.members:
            if m is not self.members[0] and not _same_normalisation(m.spec, self.spec):
                x01 = self.spec.denormalize(x) if x01 is None else x01
                out.append(m(m.spec.normalize(x01)))
            else:
                out.append(m(x))
        return out

    def combine(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """The weighted mean of member logits (per-sample weights under "confidence")."""
        stacked = torch.stack(logits)  # (M, B, K)
        w = torch.tensor(self.member_weights, dtype=stacked.dtype, device=stacked.device)[:, None]  # (M, 1)
        if self.weighting == "confidence":
            conf = F.softmax(stacked.detach(), dim=2).amax(2)  # (M, B)
            w = w * conf
            w = w / w.sum(0, keepdim=True)
        return (w[:, :, None] * stacked).sum(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.member_logits(x))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ensemble logits and the first member's penultimate features, each member forwarded once."""
        first, feats = self.members[0].forward_with_features(x)
        rest = self.member_logits(x)[1:] if len(self.members) > 1 else []
        return self.combine([first, *rest]), feats

    def bn_paths(self) -> list[str]:
        return [f"t{i}.{p}" for i, m in enumerate(self.members) for p in m.bn_paths()]

    def tap(self, paths: Iterable[str], inputs: bool = True, outputs: bool = False) -> FeatureTaps:
        """Taps on members' layers ("t1.layer1.0.bn1"): refused only for a member without module hooks.

        A TorchScript or ONNX first member made the whole ensemble unhookable, so the BN-FID monitor over a later
        member's BatchNorm layers failed at the end of a run that had trained its whole budget.
        """
        paths = list(paths)
        for p in paths:
            member = self.members[int(p.split(".", 1)[0][1:])]
            if not member.hookable:
                member.tap([p])  # its own message: which file, and how to make it hookable
        return FeatureTaps(self.module, paths, inputs=inputs, outputs=outputs)

    def stage_paths(self) -> list[str]:
        return [f"t0.{p}" for p in self.members[0].stage_paths()]

    def penultimate_path(self) -> str | None:
        path = self.members[0].penultimate_path()
        return None if path is None else f"t0.{path}"


def _member(path: str | os.PathLike, arch: str | None, trust_pickle: bool, spec: InputSpec | None,
            device: str | torch.device, arch_args: dict | None, several: bool) -> Teacher:
    """One teacher of `load_teachers`; in an ensemble, an architecture error says the flag serves every teacher."""
    try:
        return load_teacher(path, arch, trust_pickle, spec, device, arch_args, own_normalisation=several)
    except DfkdError as e:
        if not (several and arch is not None and "--teacher-arch" in str(e)):
            raise
        raise DfkdError(f"{e}; in an ensemble one --teacher-arch (and --arch-arg) serves every state_dict --teacher: "
                        "convert state_dicts of other architectures to dfkd model files first, one each (dfkd convert "
                        "--teacher FILE --teacher-arch NAME ... --out FILE.pt), and give those") from None


def member_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Fixed member weights normalised to sum 1 (equal when None)."""
    if weights is None:
        return [1.0 / n] * n
    w = [float(v) for v in (weights if isinstance(weights, (list, tuple)) else [weights])]
    if len(w) != n or any(v < 0 for v in w) or sum(w) <= 0:
        raise DfkdError(f"-p teacher_weights={list(w)}: give {n} non-negative weights (one per --teacher), "
                        "not all zero")
    return [v / sum(w) for v in w]


def check_members(members: Sequence[Teacher]) -> None:
    """Refuse teachers that cannot be averaged: other classes, channels or input size than the first."""
    if not members:
        raise DfkdError("an ensemble needs at least one --teacher")
    a = members[0]
    named = next((m for m in members if m.class_names), None)  # names are checked against the first that has them
    for b in members[1:]:
        if named is not None and b is not named and b.class_names and list(b.class_names) != list(named.class_names):
            order = " in another order" if sorted(named.class_names) == sorted(b.class_names) else ""
            raise DfkdError(f"--teacher {named.source} names its classes {list(named.class_names)[:10]} but --teacher "
                            f"{b.source} names them {list(b.class_names)[:10]}{order}; the ensemble averages logit k "
                            "of every teacher, so they must name the same classes in the same order")
        if b.num_classes != a.num_classes:
            raise DfkdError(f"--teacher {a.source} has {a.num_classes} classes but --teacher {b.source} has "
                            f"{b.num_classes}; teachers of one run must classify the same classes")
        if b.spec.shape() != a.spec.shape():
            raise DfkdError(f"--teacher {a.source} takes {a.spec.describe()} inputs but --teacher {b.source} takes "
                            f"{b.spec.describe()}; teachers of one run must share the input shape")


def repeated_teacher(paths: Sequence[str | os.PathLike], members: Sequence[Teacher]) -> str | None:
    """What a new run says of a file given twice in an ensemble, or of a copy of another (None: no repeat).

    Its answers weigh double at the cost of one more forward a batch, and a student cannot start from a slice of
    several teachers; it is said when a run starts (its resume cannot drop the repeat).
    """
    first: dict[str, str] = {}
    for path, member in zip(paths, members):
        if member.sha256 and member.sha256 in first:
            same = "is given twice" if str(path) == first[member.sha256] else \
                f"is a copy of --teacher {first[member.sha256]} (the same sha256)"
            return (f"--teacher {path} {same}: the ensemble counts that teacher twice, its answers weighing double "
                    "at the cost of one more forward a batch; drop the repeat (-p teacher_weights weighs teachers)")
        first[member.sha256] = str(path)
    return None


def load_teachers(paths: Sequence[str | os.PathLike], arch: str | None = None, trust_pickle: bool = False,
                  spec: InputSpec | None = None, device: str | torch.device = "cpu",
                  weights: Sequence[float] | None = None, weighting: str = "mean",
                  arch_args: dict | None = None) -> Teacher:
    """Load one teacher, or several wrapped in an `EnsembleTeacher` (arguments as `load_teacher`'s)."""
    if weights is not None and len(paths) == 1:  # accepted without a word: one teacher has nothing to weigh
        member_weights(weights, 1)  # a list of another length: the usual error
    several = len(paths) > 1  # the spec flags are for members that declare none: the others keep their normalisation
    members = [_member(p, arch, trust_pickle, spec, device, arch_args, several) for p in paths]
    warn_unused_arch(arch, arch_args, members)
    if len(members) == 1:
        return members[0]
    return EnsembleTeacher(members, weights, weighting)
