"""Which recipe a teacher gets, "paper" or "cpu", and how the run says so.

Papers give settings per dataset: MNIST (1 x 32 x 32 LeNets), CIFAR (3 x 32 x 32 ResNets/WRNs) and, for some,
ImageNet (224 px). A method's `paper_params(teacher)` picks the set whose inputs look like the teacher's:
`input_kind(spec)` is "mnist" for at most 1 x 32 x 32 values, "imagenet" from 64 px a side, "cifar" otherwise.
Where a paper has no ImageNet-size setting, its CIFAR setting applies with batches of at most `LARGE_BATCH`.

The "cpu" recipe (a method's `cpu` settings over the paper's: smaller batches and generators, more steps) was
measured better on this project's 2-core CPU on small MNIST-kind teachers: the LeNet-5s (1 x 32 x 32, 62K
parameters, 0.4M multiply-adds an image, with and without BN), a custom Fashion-MNIST CNN with BN (1 x 28 x 28,
207K parameters, 1.2M multiply-adds) and Caffe's MNIST LeNet without BN (1 x 28 x 28, 431K parameters, 2.3M
multiply-adds). So it is every method's default for teachers like those: MNIST-kind inputs *and* at most
`CPU_TEACHER_MACS` multiply-adds per image (`cpu_teacher`), a count of the teacher's own forward pass
(`multiply_adds`, torch's FLOP counter on one image) because a step's cost, not the parameter count, is what the
recipe is about. A method whose CPU recipe changes only what a step costs (batch sizes, generator width, steps a
round, the learning rates that go with them; `cpu_any_cost`) keeps it on heavier MNIST-kind teachers too: on a
Fashion-MNIST WRN-16-2 with BN (101M multiply-adds an image, 5 CPU-minutes, % of the teacher, paper -> cpu) fast
68.1 -> 80.3, dfq 14.1 -> 79.8, cmi 36.4 -> 69.8, nayer 18.3 -> 68.3, dafl 14.5 -> 56.2, zskd 16.7 -> 29.8, and dfad
(11.1 -> 15.2) and zskt (18.3 -> 15.1) near chance either way; on a VGG-style Fashion-MNIST net without BN (22M
multiply-adds, made after this rule) fast 79.6 -> 87.9, nayer 46.6 -> 89.0, cmi 82.0 -> 85.3, dfq 52.3 -> 82.1. The
recipes that carry priors fitted to a LeNet (DeepInversion's and ADI's TV and jitter, ZeroQ's), or a loss weight
tuned on one (online's critic weight), keep the 5M line: on the WRN-16-2 deepinversion fell 23.4 -> 14.3 and zeroq
30.5 -> 11.1. (On the BN-free VGG the other way: deepinversion 11.1 -> 45.7, adi 11.1 -> 44.6, their paper
recipes' BN-free LeNet-5 student dying at the paper's student lr 0.1; one teacher each way, so the line stays where
it was set.) Every other teacher (the shipped CIFAR WRN-16-1 among them) gets the paper recipe. `-p recipe=paper`
or `-p recipe=cpu` picks one whatever the teacher; the run prints which it uses, why, and every setting that departs
from the paper (`recipe_lines`).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, ClassVar

from dfkd.cost import count_macs, millions, multiply_adds
from dfkd.errors import DfkdError
from dfkd.spec import InputSpec
from dfkd.teacher import teacher_size

#: Batch size at ImageNet-size inputs where a paper gives none: DeepInversion's ImageNet default
#: (NVlabs `imagenet_inversion.py --bs 64`) and DFAD's 224 px Caltech-101 setting (`--batch_size 64`).
LARGE_BATCH = 64
#: The recipes `-p recipe=` takes.
RECIPES = ("paper", "cpu")
#: The CPU recipes were measured better on MNIST-kind teachers of up to 2.3M multiply-adds an image (Caffe's LeNet);
#: the line sits at about twice that.
CPU_TEACHER_MACS = 5_000_000


def input_kind(spec: InputSpec | None) -> str | None:
    """The kind of a teacher's inputs: "mnist", "cifar" or "imagenet" (None without a teacher).

    "imagenet" from 64 px on the shorter side; "mnist" for at most 1x32x32 values an image, and for grey images
    whose shorter side is at most 32 px (the same set for square images; a grey 28x44 or 28x56 image too: on a
    BatchNorm LeNet-5 of MNIST stretched to 28x44, 99.42 %, 5 CPU-minutes, the MNIST kind's pick, fast, reached
    98.70 % where dfq, the CIFAR kind's, reached 91.17; on a Fashion-MNIST one at 28x56, 90.93 %, 85.83 against
    76.89); "cifar" for the rest.
    """
    if spec is None:
        return None
    if spec.side >= 64:
        return "imagenet"
    return "mnist" if spec.pixels <= 32 * 32 or (spec.channels == 1 and spec.side <= 32) else "cifar"


def teacher_kind(teacher: Any) -> str | None:
    """`input_kind` of a teacher's spec (None for no teacher)."""
    return None if teacher is None else input_kind(teacher.spec)


def cpu_sized(kind: str | None, macs: int | None) -> bool:
    """True for inputs of `kind` and `macs` multiply-adds like the CPU recipes' teachers: MNIST kind, <= 5M."""
    return kind == "mnist" and macs is not None and macs <= CPU_TEACHER_MACS


def heavy_teacher(teacher: Any) -> int | None:
    """The teacher's multiply-adds an input when past the CPU recipes' line (`CPU_TEACHER_MACS`), else None.

    None too where torch's FLOP counter cannot see into the teacher (a TorchScript file).
    """
    return _past_line(multiply_adds(teacher))


def heavy_model(model: Any, spec: InputSpec) -> int | None:
    """`heavy_teacher` for a model being trained (`dfkd train-teacher`): counted afresh, not remembered."""
    return _past_line(count_macs(model, spec))


def _past_line(macs: int | None) -> int | None:
    return macs if macs is not None and macs > CPU_TEACHER_MACS else None


def cpu_teacher(teacher: Any) -> bool:
    """True for a teacher like those the CPU recipes were measured on (`cpu_sized`)."""
    kind = teacher_kind(teacher)
    return kind == "mnist" and cpu_sized(kind, multiply_adds(teacher))  # no FLOP count for larger inputs


def check_recipe(recipe: str) -> None:
    """Refuse a recipe name other than "paper" or "cpu"."""
    if recipe not in RECIPES:
        raise DfkdError(f"-p recipe={recipe}: use paper or cpu")


def cap_batches(p: dict[str, Any], keys: tuple[str, ...] = ("batch_size", "synth_batch_size")) -> None:
    """Cap every batch-size setting in `p` at LARGE_BATCH (in place)."""
    for k in keys:
        if p.get(k):
            p[k] = min(int(p[k]), LARGE_BATCH)


class Recipe:
    """A method's settings: the paper's per input kind, a measured CPU recipe over them, and what it keeps apart.

    `Method` inherits this; a method sets `defaults` (its paper's settings), overrides `paper_params` where the
    paper gives settings per dataset, sets `cpu` and `cpu_reason` for a CPU recipe, `deviations` for departures
    from the paper that are not settings, and overrides `finalize` for settings that follow others.
    """

    #: Settings every method shares (dfkd.methods.base.BASE_DEFAULTS).
    base_defaults: ClassVar[dict[str, Any]] = {}
    #: The method's paper settings over `base_defaults` (each class down the hierarchy adds its own).
    defaults: ClassVar[dict[str, Any]] = {}
    #: The measured CPU recipe's settings over the paper's ({}: the method has none); see `default_params`.
    cpu: ClassVar[dict[str, Any]] = {}
    #: Why the CPU recipe departs from the paper: what was measured, in one line.
    cpu_reason: ClassVar[str] = ""
    #: The CPU recipe changes only what a step costs (batches, widths, steps a round, their learning rates), no
    #: prior or loss weight fitted to a LeNet: it is the default for MNIST-kind teachers of any cost (module doc).
    cpu_any_cost: ClassVar[bool] = False
    #: Departures from the paper or reference code kept in every recipe (not hyper-parameters), one line each.
    deviations: ClassVar[tuple[str, ...]] = ()
    #: Settings that are dfkd's, not the paper's (collapse watch, EMA, selection, input statistics, objectives):
    #: a changed one is "a dfkd setting", never "departs from the paper".
    own_settings: ClassVar[frozenset[str]] = frozenset()
    name: ClassVar[str] = ""

    @classmethod
    def recipe_reason(cls, teacher: Any) -> str | None:  # noqa: ARG003 - the hook's signature
        """Why this method's settings are what they are for `teacher`, where the usual rule does not say it."""
        return None

    @classmethod
    def paper_params(cls, teacher: Any = None) -> dict[str, Any]:
        """The paper's settings for this teacher's input kind: BASE_DEFAULTS overlaid with each class's `defaults`.

        Methods whose paper gives settings per dataset override this and pick by `_recipes.input_kind`.
        """
        del teacher
        merged = dict(cls.base_defaults)
        for klass in reversed(cls.__mro__):
            merged.update(klass.__dict__.get("defaults", {}))
        return merged

    @classmethod
    def cpu_params(cls, teacher: Any = None) -> dict[str, Any]:
        """The measured CPU recipe's settings over the paper's: each class's `cpu`, base first ({}: none)."""
        del teacher
        merged: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            merged.update(klass.__dict__.get("cpu", {}))
        return merged

    @classmethod
    def default_params(cls, teacher: Any = None, recipe: str | None = None) -> dict[str, Any]:
        """The resolved recipe: the paper's settings, with the CPU recipe on top where it applies.

        Args:
            teacher: the teacher (its input kind picks the paper's dataset setting; see `_recipes.cpu_teacher`).
            recipe: "paper" or "cpu"; None: "cpu" where `cpu_default` says so, else "paper".
        """
        cpu = cls.cpu_params(teacher)
        if recipe is None:
            recipe = "cpu" if cls.cpu_default(teacher) else "paper"
        check_recipe(recipe)
        p = cls.paper_params(teacher)
        if recipe == "cpu":
            p.update(cpu)
        p["recipe"] = recipe
        return p

    @classmethod
    def cpu_default(cls, teacher: Any) -> bool:
        """True where the method's CPU recipe is its default for `teacher`.

        That is a teacher like those it was measured on (MNIST kind, <= 5M multiply-adds an image), or any
        MNIST-kind one where `cpu_any_cost`.
        """
        if not cls.cpu_params(teacher):
            return False
        return cpu_teacher(teacher) or (cls.cpu_any_cost and teacher_kind(teacher) == "mnist")

    @classmethod
    def finalize(cls, params: dict[str, Any]) -> dict[str, Any]:
        """`params` with settings that follow others filled in (so config.json holds no "chosen later" None).

        Here: `feature_weight` None with objectives named becomes each objective's paper weight, by name.
        Subclasses fill in their own (and call this).
        """
        fl = params.get("feature_loss")
        if fl not in (None, "", []) and params.get("feature_weight") is None:
            names = [fl] if isinstance(fl, str) else list(fl)
            from dfkd.objectives import get_objective

            params = {**params, "feature_weight": {n: get_objective(n).default_weight for n in names}}
        return params

    @classmethod
    def cpu_reasons(cls) -> list[str]:
        """Why the CPU recipe departs from the paper, base classes first (one line each)."""
        out: list[str] = []
        for klass in reversed(cls.__mro__):
            why = klass.__dict__.get("cpu_reason", "")
            if why and why not in out:
                out.append(why)
        return out

    @classmethod
    def all_deviations(cls) -> list[str]:
        """Every kept departure from the paper beyond hyper-parameters, base classes first."""
        out: list[str] = []
        for klass in reversed(cls.__mro__):
            out += [d for d in klass.__dict__.get("deviations", ()) if d not in out]
        return out



def _teacher_words(teacher: Any) -> str:
    s = teacher.spec
    kind, n = teacher_kind(teacher), teacher_size(teacher)
    macs = multiply_adds(teacher) if kind == "mnist" else None
    cost = "" if macs is None else f", {millions(macs)} multiply-adds an image"
    return f"{s.describe()} inputs ({kind} kind), {n:,} parameters{cost}"


def why_recipe(cls: type[Recipe], teacher: Any, given: str | None, by_auto: bool = False) -> str:
    """Why `cls` runs the recipe it does for `teacher` (`given`: the recipe set, if any; `by_auto`: set by auto)."""
    if given and by_auto:
        other = next(r for r in RECIPES if r != given)
        return f"set by --method auto for this teacher, as its line says; -p recipe={other} for the other"
    if given:
        return f"set by recipe={given}"
    if teacher is None:
        return "no teacher given: the paper's settings"
    if reason := cls.recipe_reason(teacher):
        return reason
    words = _teacher_words(teacher)
    if not cls.cpu_params(teacher):
        return f"teacher {words}; method {cls.name} has no CPU recipe"
    if cpu_teacher(teacher):
        return (f"teacher {words}: MNIST kind and <= {millions(CPU_TEACHER_MACS)} multiply-adds, like the small "
                "MNIST teachers its CPU recipe was measured better on; -p recipe=paper for the paper's settings")
    if cls.cpu_default(teacher):
        return (f"teacher {words}: MNIST kind; {cls.name}'s CPU recipe changes only what a step costs, so it stays "
                f"the default past {millions(CPU_TEACHER_MACS)} multiply-adds (measured on a 101M-multiply-add "
                "Fashion-MNIST WRN-16-2); -p recipe=paper for the paper's settings")
    if cls.cpu_any_cost:
        return (f"teacher {words}: the CPU recipe is the default for MNIST-kind teachers only; -p recipe=cpu to "
                "use it anyway")
    return (f"teacher {words}: {cls.name}'s CPU recipe holds settings fitted to MNIST-kind teachers of <= "
            f"{millions(CPU_TEACHER_MACS)} multiply-adds an image; -p recipe=cpu to use it anyway")


def departures(cls: type[Recipe], teacher: Any, params: dict[str, Any], overrides: dict[str, Any],
               by_auto: Collection[str] = ()) -> list[str]:
    """One line per setting of `params` that differs from the paper's, with where the value came from.

    `by_auto`: keys of `overrides` that `--method auto` set (its rule's settings), not the user.

    dfkd's own settings (`own_settings`: the papers have none of them) are said to differ from dfkd's default.
    """
    paper = cls.finalize(cls.paper_params(teacher))
    cpu = cls.cpu_params(teacher) if params.get("recipe") == "cpu" else {}
    lines = []
    for key in sorted(k for k in params if k in paper and k != "recipe" and params[k] != paper[k]):
        source = ("set by --method auto" if key in by_auto else "set by you" if key in overrides
                  else "cpu recipe" if key in cpu else "follows another setting")
        own = key in cls.own_settings
        what, ref = ("dfkd setting (not the paper's)", "default") if own else ("departs from the paper", "paper")
        lines.append(f"{what}: {key} = {params[key]!r} ({ref}: {paper[key]!r}; {source})")
    return lines


def recipe_lines(cls: type[Recipe], teacher: Any, params: dict[str, Any],
                 overrides: dict[str, Any] | None = None, by_auto: Collection[str] = ()) -> list[str]:
    """What a run prints at start: its recipe and why, each departure from the paper and why, kept deviations.

    `by_auto`: the keys of `overrides` (the recipe, other settings) that `--method auto` set, not the user.
    """
    given = (overrides or {}).get("recipe")
    overrides = {k: v for k, v in (overrides or {}).items() if k != "recipe"}
    lines = [f"recipe: {params['recipe']} ({why_recipe(cls, teacher, given, 'recipe' in by_auto)})"]
    moved = departures(cls, teacher, params, overrides, by_auto)
    lines += [f"  {m}" for m in moved] or ["  every setting is the paper's"]
    if params["recipe"] == "cpu":
        lines += [f"  why the cpu recipe: {why}" for why in cls.cpu_reasons()]
    lines += [f"  kept deviation: {d}" for d in cls.all_deviations()]
    return lines
