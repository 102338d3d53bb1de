"""Start the student from the teacher's own weights where their architectures allow it (weight inheritance).

A data-free run has the teacher's weights and nothing else; where the student is the teacher's architecture made
narrower (LeNet-5 -> LeNet-5-half, WRN-16-2 -> WRN-16-1) or shallower (torchvision's ResNet-34 -> ResNet-18, whose
blocks keep their names), every student tensor has a teacher tensor of the same name and rank that is at least
as large in each dimension, and the student can start as a slice of the teacher instead of at random, as
DistilBERT starts from every other layer of BERT (Sanh et al. 2019) and prune-then-distill pipelines start from
the pruned network. The slice keeps the *first* channels of every layer: a layer's kept outputs are then exactly
the next layer's kept inputs, through residual sums and the channel-major flatten before a classifier, with no
graph analysis. Each weight is scaled by the teacher's fan-in over the student's, so a unit's input keeps its
scale with half its inputs gone. A teacher BatchNorm that the student lacks (a BN teacher, a BN-free student) is
folded into the convolution or linear layer before it first (`torch.nn.utils.fuse_conv_bn_eval`).

Before any training, a LeNet-5-half sliced from a Fashion-MNIST LeNet-5 (89.74 %) answers 53.6 % of the
Fashion-MNIST test set right, one sliced from the demo BN LeNet-5 (99.53 %) 45.4 % of MNIST's, against 10-11 % at
random (2026-12-06); keeping the channels of largest weight norm instead of the first (consistent across layers
only where the network is a plain chain) did worse on the first (39 % on half the test set). What it does to the
students runs end with is in the README (*The student's first weights*).

`--student-init auto` (the default) inherits wherever the shapes allow and the student is smaller than the teacher
(a student of the teacher's own architecture, as the literature pairs a WRN-16-1 teacher with, would start as the
teacher itself), and starts at random elsewhere, saying which; `teacher` insists (an error names the first tensor
that does not fit; the teacher's own architecture is then a copy of it); `random` is the papers' start.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from dfkd.errors import DfkdError

#: `--student-init` choices.
INITS = ("auto", "teacher", "random")


@dataclass(frozen=True)
class Inheritance:
    """What the student takes from the teacher: one tensor per name, or why it cannot (`reason`)."""

    tensors: dict[str, torch.Tensor]
    reason: str = ""
    folded: int = 0  # teacher BatchNorm layers folded into the layer before (the student has none there)
    narrowed: bool = False  # some tensor is a slice, not the whole teacher tensor
    left_out: int = 0  # teacher tensors the student has no name for (a deeper teacher's extra blocks)


def plan(student: nn.Module, teacher: nn.Module) -> Inheritance:
    """The student's state, sliced from `teacher`, or an empty plan with the reason it does not fit."""
    from dfkd.auto import has_attention

    theirs, folded = _folded_state(teacher, student)
    if theirs is None:
        return Inheritance({}, "the teacher's BatchNorm would have to be folded into its layers, which a TorchScript "
                               "module does not allow")
    source = theirs.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    narrowed = False
    for name, mine in student.state_dict().items():
        if not mine.is_floating_point():  # BatchNorm's num_batches_tracked
            continue
        t = source.get(name)
        if t is None or t.ndim != mine.ndim or any(a > b for a, b in zip(mine.shape, t.shape)):
            what = "none" if t is None else f"{tuple(t.shape)}"
            return Inheritance({}, f"the student's {name} {tuple(mine.shape)} has no teacher tensor of that name at "
                                   f"least as large (teacher: {what}): it is not the teacher's architecture made "
                                   "narrower or shallower")
        part = t.detach()[tuple(slice(0, n) for n in mine.shape)].float().clone()
        if mine.ndim >= 2 and t.shape[1] != mine.shape[1]:  # fan-in: weights are (out, in, ...)
            part *= t.shape[1] / mine.shape[1]
        tensors[name] = part.contiguous()
        narrowed = narrowed or part.shape != t.shape
    if narrowed and has_attention(teacher):  # first rows of a stacked query/key/value weight are not a narrower one
        return Inheritance({}, "an attention network is not made narrower by slicing its tensors (stacked "
                               "query/key/value weights, heads)")
    left_out = sum(v.is_floating_point() and k not in tensors for k, v in source.items())
    return Inheritance(tensors, folded=folded, narrowed=narrowed, left_out=left_out)


def _folded_state(teacher: nn.Module, student: nn.Module) -> tuple[nn.Module | None, int]:
    """`teacher` with each BatchNorm the student lacks folded into the layer before, and how many were folded.

    The teacher is copied where anything changes. None where such a BatchNorm is in a TorchScript module (its
    layers cannot be replaced).
    """
    has = {name for name, _ in student.named_parameters()}
    if isinstance(teacher, torch.jit.ScriptModule):  # its submodules are not nn.Conv2d/BatchNorm2d instances
        lacking = any("BatchNorm" in getattr(m, "original_name", "") and f"{name}.weight" not in has
                      for name, m in teacher.named_modules())
        return (None if lacking else teacher), 0
    pairs = []
    for parent_name, parent in teacher.named_modules():
        children = list(parent.named_children())
        prefix = f"{parent_name}." if parent_name else ""
        for (a_name, a), (b_name, b) in zip(children, children[1:]):
            if (isinstance(a, (nn.Conv2d, nn.Linear)) and isinstance(b, (nn.BatchNorm2d, nn.BatchNorm1d))
                    and b.track_running_stats and f"{prefix}{a_name}.weight" in has
                    and f"{prefix}{b_name}.weight" not in has):
                pairs.append((parent_name, a_name, b_name))
    if not pairs:
        return teacher, 0
    teacher = copy.deepcopy(teacher).float().eval()
    for parent_name, a_name, b_name in pairs:
        parent = teacher.get_submodule(parent_name)
        a, b = getattr(parent, a_name), getattr(parent, b_name)
        fuse = nn.utils.fuse_conv_bn_eval if isinstance(a, nn.Conv2d) else nn.utils.fuse_linear_bn_eval
        setattr(parent, a_name, fuse(a, b))
        setattr(parent, b_name, nn.Identity())
    return teacher, len(pairs)


def inherit(student: nn.Module, teacher: nn.Module | None, mode: str, teacher_name: str = "the teacher") -> str:
    """Load the student with the teacher's sliced weights as `mode` says; the line a run prints about it.

    Args:
        student: the freshly built student (changed in place).
        teacher: the teacher's module (None: several teachers or none, so nothing to slice).
        mode: "auto", "teacher" or "random" (`--student-init`).
        teacher_name: how the line names the teacher (its architecture).

    Raises:
        DfkdError: `mode` "teacher" where the student does not fit in the teacher.
    """
    if mode not in INITS:
        raise DfkdError(f"--student-init {mode}: choose one of {', '.join(INITS)}")
    if mode == "random":
        return "student init: random (--student-init random)"
    got = plan(student, teacher) if teacher is not None else Inheritance({}, "the run has no single teacher network")
    if mode == "auto" and got.tensors and not (got.narrowed or got.left_out):
        return ("student init: random (the student is the teacher's own architecture, so its weights would make it "
                "the teacher itself, and the run would measure nothing; --student-init teacher starts from them)")
    if not got.tensors:
        if mode == "teacher" and teacher is None:  # no --student can fix that
            raise DfkdError(f"--student-init teacher: {got.reason} to take weights from (an ensemble of several "
                            "--teacher); use --student-init random, or distil one teacher")
        if mode == "teacher":
            raise DfkdError(f"--student-init teacher: {got.reason}; give a --student that is the teacher's "
                            "architecture made narrower or shallower, or --student-init random")
        return f"student init: random ({got.reason})"
    student.load_state_dict(got.tensors, strict=False)
    return (f"student init: {len(got.tensors)} tensors from {teacher_name} ({'; '.join(_how(got))}; dfkd setting, "
            "not the paper's: --student-init random starts at random as the papers do)")


def _how(got: Inheritance) -> list[str]:
    """What the slice did, in words: the channels it kept, the layers it left out, the BatchNorm it folded."""
    parts = []
    if got.narrowed:
        outs = [str(t.shape[0]) for t in got.tensors.values() if t.ndim >= 2][:-1]  # the classifier keeps classes
        parts.append(f"the first {', '.join(outs[:6])}{', ...' if len(outs) > 6 else ''} output channels of its "
                     "layers, fan-in rescaled")
    if got.left_out:
        parts.append(f"{got.left_out} tensor{'s' * (got.left_out > 1)} of layers the student does not have left out")
    if got.folded:
        parts.append(f"{got.folded} BatchNorm layer{'s' * (got.folded > 1)} folded into the layer before")
    return parts or ["all of its weights: the student is the teacher's architecture"]
