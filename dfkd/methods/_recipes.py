"""Which recipe a teacher gets, "paper" or "cpu", and how the run says so.

Papers give settings per dataset: MNIST (1 x 32 x 32 LeNets), CIFAR (3 x 32 x 32 ResNets/WRNs) and, for some,
ImageNet (224 px). A method's `paper_params(teacher)` picks the set whose inputs look like the teacher's:
`input_kind(spec)` is "mnist" for at most 1 x 32 x 32 values, "imagenet" from 64 px a side, "cifar" otherwise.
Where a paper has no ImageNet-size setting, its CIFAR setting applies with batches of at most `LARGE_BATCH`.

The "cpu" recipe (a method's `cpu` settings over the paper's) was measured better on this project's 2-core CPU,
and only on LeNet-5 MNIST teachers (1 x 32 x 32 inputs, about 60K parameters, with and without BN). So it is the
default only for teachers like those: MNIST-kind inputs *and* fewer than `CPU_TEACHER_PARAMS` parameters
(`cpu_teacher`). Every other teacher (the shipped CIFAR WRN-16-1 with 175K parameters among them) gets the paper
recipe. `-p recipe=paper` or `-p recipe=cpu` picks one whatever the teacher; the run prints which it uses, why,
and every setting that departs from the paper (`recipe_lines`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dfkd.errors import DfkdError
from dfkd.spec import InputSpec

if TYPE_CHECKING:
    from dfkd.methods.base import Method

#: Batch size at ImageNet-size inputs where a paper gives none: DeepInversion's ImageNet default
#: (NVlabs `imagenet_inversion.py --bs 64`) and DFAD's 224 px Caltech-101 setting (`--batch_size 64`).
LARGE_BATCH = 64
#: The recipes `-p recipe=` takes.
RECIPES = ("paper", "cpu")
#: The CPU recipes were measured on MNIST teachers below this many parameters (LeNet-5: ~62K).
CPU_TEACHER_PARAMS = 200_000


def input_kind(spec: InputSpec | None) -> str | None:
    """The kind of a teacher's inputs: "mnist", "cifar" or "imagenet" (None without a teacher)."""
    if spec is None:
        return None
    if spec.size >= 64:
        return "imagenet"
    return "mnist" if spec.channels * spec.size * spec.size <= 32 * 32 else "cifar"


def teacher_kind(teacher: Any) -> str | None:
    """`input_kind` of a teacher's spec (None for no teacher)."""
    return None if teacher is None else input_kind(teacher.spec)


def parameter_count(teacher: Any) -> int:
    """A teacher's parameter count (0 for none)."""
    return 0 if teacher is None else sum(p.numel() for p in teacher.parameters())


def cpu_teacher(teacher: Any) -> bool:
    """True for a teacher like those the CPU recipes were measured on: MNIST-kind inputs, < 200K parameters."""
    return teacher_kind(teacher) == "mnist" and parameter_count(teacher) < CPU_TEACHER_PARAMS


def check_recipe(recipe: str) -> None:
    """Refuse a recipe name other than "paper" or "cpu"."""
    if recipe not in RECIPES:
        raise DfkdError(f"-p recipe={recipe}: use paper or cpu")


def cap_batches(p: dict[str, Any], keys: tuple[str, ...] = ("batch_size", "synth_batch_size")) -> None:
    """Cap every batch-size setting in `p` at LARGE_BATCH (in place)."""
    for k in keys:
        if p.get(k):
            p[k] = min(int(p[k]), LARGE_BATCH)


def _teacher_words(teacher: Any) -> str:
    s = teacher.spec
    kind, n = teacher_kind(teacher), parameter_count(teacher)
    return f"{s.channels}x{s.size}x{s.size} inputs ({kind} kind), {n:,} parameters"


def why_recipe(cls: type[Method], teacher: Any, given: str | None) -> str:
    """Why `cls` runs the recipe it does for `teacher` (`given`: the recipe the user set, if any)."""
    if given:
        return f"set by recipe={given}"
    if teacher is None:
        return "no teacher given: the paper's settings"
    words = _teacher_words(teacher)
    if not cls.cpu_params(teacher):
        return f"teacher {words}; method {cls.name} has no CPU recipe"
    if cpu_teacher(teacher):
        return (f"teacher {words}: MNIST kind and < {CPU_TEACHER_PARAMS:,} parameters, like the LeNet-5 teachers "
                "its CPU recipe was measured better on; -p recipe=paper for the paper's settings")
    return (f"teacher {words}: the CPU recipe was measured on MNIST teachers of < {CPU_TEACHER_PARAMS:,} "
            "parameters only; -p recipe=cpu to use it anyway")


def departures(cls: type[Method], teacher: Any, params: dict[str, Any], overrides: dict[str, Any]) -> list[str]:
    """One line per setting of `params` that differs from the paper's, with where the value came from."""
    paper = cls.finalize(cls.paper_params(teacher))
    cpu = cls.cpu_params(teacher) if params.get("recipe") == "cpu" else {}
    lines = []
    for key in sorted(k for k in params if k in paper and k != "recipe" and params[k] != paper[k]):
        source = "set by you" if key in overrides else "cpu recipe" if key in cpu else "follows another setting"
        lines.append(f"{key} = {params[key]!r} (paper: {paper[key]!r}; {source})")
    return lines


def recipe_lines(cls: type[Method], teacher: Any, params: dict[str, Any],
                 overrides: dict[str, Any] | None = None) -> list[str]:
    """What a run prints at start: its recipe and why, each departure from the paper and why, kept deviations."""
    given = (overrides or {}).get("recipe")
    overrides = {k: v for k, v in (overrides or {}).items() if k != "recipe"}
    lines = [f"recipe: {params['recipe']} ({why_recipe(cls, teacher, given)})"]
    moved = departures(cls, teacher, params, overrides)
    lines += [f"  departs from the paper: {m}" for m in moved] or ["  every setting is the paper's"]
    if params["recipe"] == "cpu":
        lines += [f"  why the cpu recipe: {why}" for why in cls.cpu_reasons()]
    lines += [f"  kept deviation: {d}" for d in cls.all_deviations()]
    return lines
