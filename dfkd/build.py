"""Build a method for a teacher: recipe, settings, student and method in one place (`distill` and `synthesize`)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dfkd.config import resolve_params
from dfkd.ensemble import EnsembleTeacher
from dfkd.errors import DfkdError
from dfkd.hooks import is_batchnorm
from dfkd.inherit import inherit
from dfkd.methods import Method, get_method
from dfkd.methods._recipes import recipe_lines
from dfkd.students import build_student, check_student, student_arch, student_line
from dfkd.teacher import Teacher
from dfkd.utils import seed_everything
from dfkd.validate import check_params


@dataclass
class Built:
    """A built method and what a run records about it: the resolved settings, the student architecture, the recipe."""

    method: Method
    params: dict[str, Any]
    student_name: str
    student_kwargs: dict[str, Any]
    recipe_lines: list[str]  # what a run prints at start: its recipe, why, and its departures from the paper
    init_line: str = ""  # where the student's first weights came from (dfkd.inherit), "student init: ..."
    yours: tuple[str, ...] = ()  # the settings the user gave (a checkpoint keeps them for a resume's lines)


def build_method(name: str, teacher: Teacher, overrides: dict[str, Any], device: torch.device, seed: int,
                 student: str | None = None, student_args: dict[str, Any] | None = None,
                 quantize: str | None = None, min_s_steps: int = 1,
                 local: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 by_auto: Collection[str] = (), student_init: str = "random", resumed: bool = False,
                 handed_on: Collection[str] = (), from_file: Collection[str] = (),
                 yours: Collection[str] | None = None, changed: Collection[str] = ()) -> Built:
    """The method `name` on `teacher`: its recipe for that teacher with `overrides`, and a fresh student.

    The student's initial weights depend on `seed` alone (the RNG is reseeded just before it is made), or, where
    `student_init` takes them from the teacher, on the teacher's weights (the slice uses no RNG), so every rank of
    a distributed run starts from the same student.

    Args:
        name: a registered method.
        teacher: the loaded teacher.
        overrides: method settings given by the user (and the data files a source feeds).
        device: where the method runs.
        seed: the run's seed.
        student: student architecture (None: the usual one for the teacher).
        student_args: its constructor arguments.
        quantize: "int8" for a fake-quantized (QAT) student.
        min_s_steps: the fewest student steps a round may have (`synthesize` allows 0).
        local: the settings this process builds with, from the resolved ones (a rank's share of the batch).
        by_auto: the keys of `overrides` (`recipe`, others) that `--method auto` set, not the user (the recipe lines
            say so).
        student_init: `--student-init`: "auto" and "teacher" start the student from the teacher's sliced weights
            where it fits in them (`dfkd.inherit`), "random" (the default here: `synthesize`) from the seed alone.
        resumed: `overrides` are a resumed run's saved settings, every one of them (no warning of those without
            effect: the run warned when it started).
        handed_on: settings that take effect elsewhere even where this method does not use them (`synthesize`
            hands the student recipe on to the receiver of its file), so no warning says they have none.
        from_file: keys of `overrides` a --config file gave (`DistillConfig.from_file`): where the recipe holds the
            same value they are not said to be the user's (no "set by you", no "has no effect").
        yours: a resumed run's: the keys of `overrides` its user gave (when it started, or with --resume); the
            others are the recipe's, said as a new run says them (None: a checkpoint that did not keep them; its
            saved settings are then read as `from_file`'s, so those the recipe holds count as the recipe's).
        changed: a resumed run's settings given with --resume: the ones checked (the others were, at its start).

    Returns:
        The method, the resolved (global) settings, and the student's architecture and arguments.
    """
    cls = get_method(name)
    recipe = cls.default_params(teacher, overrides.get("recipe"))
    params = cls.finalize(resolve_params(recipe, overrides, name))
    # a resume checks what --resume gives: its saved settings passed when the run started (a bound added since, a
    # learning rate at most 1e6, refused an old run's as "-p lr_s=...", a flag never typed)
    check_params({k: v for k, v in overrides.items() if not resumed or k in changed}, recipe, name,
                 min_s_steps=min_s_steps)
    if resumed and yours is None:  # a checkpoint that kept no user keys: its saved settings are read as a file's
        from_file = [k for k in overrides if k not in changed]
    # a config file's value the recipe holds anyway is not the user's (a run's own config.json holds them all): no
    # "set by you", no "has no effect"; it still counts where giving a value at all does (clip_s = null)
    said = {k: v for k, v in overrides.items() if not (k in from_file and k in recipe and _json(v) == _json(recipe[k]))}
    lined = params
    if resumed:  # its overrides are every saved setting; the lines name the user's alone
        if yours is not None:
            said = {k: v for k, v in overrides.items() if k in yours}
        if params.get("clip_s") == UNNORMALISED_CLIP and recipe.get("clip_s") is None and \
                "clip_s" not in (yours or ()):  # dfkd's clip, said as the run's start said it
            said.pop("clip_s", None)
            lined = {**params, "clip_s": None}
    if not resumed:
        one_teacher = {} if isinstance(teacher, EnsembleTeacher) else \
            dict.fromkeys(("teacher_weighting", "teacher_weights"), "the run has one teacher; repeat --teacher for an "
                          "ensemble")
        warn_no_effect(cls, params, {k: v for k, v in said.items() if k not in by_auto and k not in handed_on},
                       named=overrides.keys(), from_file=from_file, extra=one_teacher)
    lines = recipe_lines(cls, teacher, lined, said, by_auto)
    student_name, student_kwargs = student_arch(teacher, student, student_args)
    seed_everything(seed)
    try:
        net = build_student(student_name, student_kwargs).to(device)
        check_student(net, teacher, student_name)
    except DfkdError as e:
        if student is not None:
            raise
        raise DfkdError(f"{e}; {student_name} is the default student for this teacher: give --student one that "
                        f"takes {teacher.spec.describe()} inputs (dfkd models)") from None
    single = None if isinstance(teacher, EnsembleTeacher) else teacher.module
    init_line = inherit(net, single, student_init, teacher.arch or "the teacher")
    if not resumed:
        params, clip_line = clip_unnormalised(params, overrides, net)
    else:  # a resume runs with its saved settings: the line says dfkd's clip where they hold it
        clip_line = clip_unnormalised(lined, said, net)[1] if lined is not params else None
    lines = [*lines, *[clip_line] * bool(clip_line)]
    if quantize:
        from dfkd.qat import prepare_qat

        net = prepare_qat(net, quantize)
    method = cls(teacher, net, local(params) if local else params, device)
    lines = [student_line(teacher, student, student_name, net), *[f"  {init_line}"] * (student_init != "random"),
             *lines]
    return Built(method, params, student_name, student_kwargs, lines, init_line, tuple(sorted(said)))


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def warn_no_effect(cls: type[Method], params: dict[str, Any], given: dict[str, Any], named: Collection[str] = (),
                   from_file: Collection[str] = (), extra: dict[str, str] | None = None) -> None:
    """Warn of each setting in `given` (the user's) that does nothing in this run (`Method.no_effect`).

    A warning, not an error: one config file may serve several methods, and `--method auto` picks the method.
    `named`: every key the user gave (also those `given` leaves out, a config file's recipe-equal values), so the
    tip on the synthesis batch is not given to a user who set it; `from_file`: keys a --config file gave, named as
    the file's, not as a `-p` the user never typed; `extra`: further settings this run leaves unused, with why.
    """
    def said(key: str) -> str:
        setting = f"{key}={json.dumps(given[key])}"
        return f"--config's {setting}" if key in from_file else f"-p {setting}"

    unused = {**cls.no_effect(params), **(extra or {})}
    for key in sorted(k for k in given if k in unused):
        warnings.warn(f"{said(key)} has no effect: {cls.name} does not use it here ({unused[key]})", stacklevel=3)
    synth = params.get("synth_batch_size")
    set_synth = "synth_batch_size" in {*given, *named}
    if "batch_size" in given and not set_synth and synth not in (None, given["batch_size"]):
        # a user cutting the batch to fit memory on a heavy teacher found the synthesis as large as before
        warnings.warn(f"{said('batch_size')} sets the student's batch; {cls.name} synthesizes images {synth} at a "
                      f"time (-p synth_batch_size=N sets that)", stacklevel=3)


#: The largest gradient norm of a student without normalisation layers, when neither its recipe nor the user set one.
UNNORMALISED_CLIP = 1.0
NORM_LAYERS = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def clip_unnormalised(params: dict[str, Any], overrides: dict[str, Any],
                      net: nn.Module) -> tuple[dict[str, Any], str | None]:
    """The settings with the student's gradient clipped to norm 1 where it has no normalisation layer.

    Nothing in such a student (a LeNet-5) rescales its activations, so one large step kills units for good
    (constant output): the paper recipes of deepinversion and adi (student lr 0.1) left a LeNet-5 at chance on a
    Fashion-MNIST VGG teacher, 70-75 % of the teacher with the clip. A clip the recipe sets (fast, cmi, nayer on a
    CPU) or the user gives (`-p clip_s=...`, `clip_s=null` for none) is kept; students with BatchNorm, GroupNorm,
    LayerNorm or InstanceNorm are left as their recipe has them, and so is every student where `clip_unnormalised`
    is false (`-p clip_unnormalised=false`; the CPU recipes of deepinversion and adi, whose student lr 0.01 does not
    kill a LeNet-5 and which the clip slowed: 2.8-6.2 points lower on a Fashion-MNIST LeNet-5).

    Returns:
        The settings and the line the run prints about the clip (None where nothing changed).
    """
    if not params.get("clip_unnormalised", True) or params.get("clip_s") is not None or "clip_s" in overrides or any(
            is_batchnorm(m) or isinstance(m, NORM_LAYERS) for m in net.modules()):
        return params, None
    return {**params, "clip_s": UNNORMALISED_CLIP}, (
        f"  dfkd setting (not the paper's): clip_s = {UNNORMALISED_CLIP:g} (default: None; the student has no "
        "normalisation layer: unclipped, one large step kills its units for good; -p clip_s=null for none)")
