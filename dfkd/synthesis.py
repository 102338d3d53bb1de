"""The owner's side of the privacy split: `dfkd synthesize` makes a transfer file next to the teacher.

Generator methods (a persistent generator, `GeneratorSynthesizer`: dafl, dfad, zskt, dfq) train for `steps`
student steps (default `GENERATOR_STEPS`), then their generator is sampled, class-balanced (`Balance`: each
class of the teacher's argmax gets `num / K` images). Every other method (inversion, zskd, cmi, fast) runs `steps`
student steps first (default 0), then rounds, collecting each round's finished batch (`method.last_images`; the
inversion methods already aim each batch at balanced classes); the student those rounds train is discarded. A
method whose student sees augmented views in place (fast and cmi crop, zskd its `augment`) stores each image with
`VIEWS - 1` augmented views, every view labelled by the teacher on its own pixels (`with_views`). Images go to
disk in parts of at least `PART_IMAGES` with the method's state after each (`dfkd.transfer_parts`): a second run
with the same flags resumes, and the file is assembled without holding every image in memory.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dfkd.errors import DfkdError
from dfkd.labels import LabelSpec, minimise
from dfkd.outpaths import folder_lock
from dfkd.teacher import Teacher
from dfkd.transfer import TransferData, load_transfer, meta_arrays, teacher_probs, to_pixels
from dfkd.transfer_meta import RECIPE_KEYS, plain_params, provenance, student_recipe
from dfkd.transfer_parts import Parts, check_room, parts_folder
from dfkd.utils import progress_bar

#: Student steps a generator method trains before its generator is sampled (`synthesize(steps=None)`).
GENERATOR_STEPS = 2000
#: `--num` when not given: images per class, and the most images that default asks for.
PER_CLASS, MAX_DEFAULT_NUM = 1000, 50_000
#: Images a part file holds at least (the method's state is saved after each part).
PART_IMAGES = 2048
#: Views stored of each image made by a method whose student sees augmented views in place (`default_views`).
VIEWS = 4
#: A generator method's samples are class-balanced; after this many times `num` samples the rest is unbalanced.
BALANCE_DRAWS = 5


def default_num(num_classes: int) -> int:
    """`--num` when not given: `PER_CLASS` images a class, at most `MAX_DEFAULT_NUM`."""
    return min(PER_CLASS * num_classes, MAX_DEFAULT_NUM)


def _train(method: Any, steps: int, progress: bool) -> None:
    done = 0
    with progress_bar(total=steps, desc=f"train {method.name}", unit="step", disable=not progress or steps == 0) as bar:
        while done < steps:
            method.set_progress(done / steps)
            method.steps_left = steps - done
            method.round()
            n = max(method.student_steps_per_round, 1)
            done += n
            bar.update(n)


def _batches(method: Any, generator: bool, made: Callable[[], float]) -> Iterator[Tensor]:
    """Endless batches of normalised images: generator samples, or each round's finished batch.

    The rounds are the method's run: before each, its progress is `made()`, the fraction of the images made so
    far, so whatever the method schedules over a run (the student's learning rate, Fast's adversarial term after
    its warm-up and its generator reset) happens at the same point of the file as it would in place.
    """
    size = int(method.p["batch_size"])
    method.steps_left = None  # the rounds' student steps are the method's own, not what is left of `steps`
    while True:
        if generator:
            with torch.no_grad():
                yield method.synth.sample(size).detach()
            continue
        method.set_progress(made())
        method.round()
        if method.last_images is None:
            raise DfkdError(f"method {method.name} produced no images in a round; it cannot synthesize transfer data")
        yield method.last_images.detach()


def default_views(recipe: dict[str, Any]) -> int:
    """Views stored of each image a method makes: `VIEWS` if its student sees augmented views in place, else 1."""
    return VIEWS if recipe.get("method_augment", "none") != "none" else 1


def with_views(x: Tensor, views: int, recipe: dict[str, Any], spec: Any) -> Tensor:
    """`x` (normalised) followed by `views - 1` augmented copies, each drawn with the method's student augmentation.

    In place such a method's teacher labels every augmented view its student sees; from a file the labels are
    fixed, so the owner stores views (each labelled by the teacher on its own pixels) instead of the receiver
    cropping images under labels that describe the uncropped ones.
    """
    if views <= 1:
        return x
    from dfkd.augment import make_augment

    aug = make_augment(recipe["method_augment"], spec.hw, flip_p=float(recipe.get("flip_p", 0.0)),
                       fill=spec.black).to(x.device)
    with torch.no_grad():
        return torch.cat([x, *(aug(x) for _ in range(views - 1))])


class Balance:
    """Class quotas for the images of a generator method: `num` split evenly over the classes of the teacher's argmax.

    A generator is sampled unconditionally, so its classes come out as the generator happens to favour them. Each
    sampled image is kept only while its class (the teacher's top-1 on its pixels) is under quota. If the generator
    makes some class too rarely to fill it within `BALANCE_DRAWS` x `num` samples, the rest is filled with whatever
    comes (a warning names the short classes) rather than sampling forever.

    Args:
        num: images to make in all.
        num_classes: the teacher's classes.
        state: `state_dict()` of an interrupted run (counts and draws so far), or None.
    """

    def __init__(self, num: int, num_classes: int, state: dict[str, Any] | None = None) -> None:
        base, extra = divmod(num, num_classes)
        self.quota = torch.tensor([base + (k < extra) for k in range(num_classes)])
        self.counts = torch.zeros(num_classes, dtype=torch.long)
        self.drawn, self.limit, self.warned = 0, BALANCE_DRAWS * num, False
        if state:
            self.counts, self.drawn = torch.as_tensor(state["counts"]).clone(), int(state["drawn"])

    def keep(self, probs: Tensor) -> Tensor:
        """Indices of the rows of `probs` (a sampled batch's labels) to keep; counts them."""
        self.drawn += len(probs)
        over = self.drawn > self.limit
        if over:
            self._warn()
        keep = []
        for i, c in enumerate(probs.argmax(1).tolist()):
            if over or self.counts[c] < self.quota[c]:
                self.counts[c] += 1
                keep.append(i)
        return torch.tensor(keep, dtype=torch.long)

    def _warn(self) -> None:
        if not self.warned:
            short = [k for k in range(len(self.quota)) if self.counts[k] < self.quota[k]]
            warnings.warn(f"the generator made classes {short} too rarely to balance them within {self.limit} "
                          "samples; the rest of the file is filled unbalanced", stacklevel=3)
            self.warned = True

    @property
    def gave_up(self) -> bool:
        """Whether the quotas were given up (the file is not class-balanced)."""
        return self.drawn > self.limit

    def state_dict(self) -> dict[str, Any]:
        return {"counts": self.counts.clone(), "drawn": self.drawn}


def synthesis_methods() -> list[str]:
    """The methods that make synthetic images (not transfer, kd or crossmodal, which read them)."""
    from dfkd.methods import get_method, list_methods

    return [m for m in list_methods() if m != "transfer" and not get_method(m).reads]


def check_synthesis_method(method: str) -> None:
    """Refuse a method that makes no synthetic images (an unknown one by `get_method`'s message)."""
    from dfkd.methods import get_method

    if method == "transfer":
        raise DfkdError("--method transfer distills from a transfer file; it cannot make one")
    if get_method(method).reads:  # kd, crossmodal: "give --data TRAIN" said to a user who gave it (dfkd extend)
        raise DfkdError(f"--method {method}: learns from your images, it makes no synthetic ones; use one of "
                        f"{', '.join(synthesis_methods())}")


def synthesize(teacher: Teacher, method: str, num: int | None, out: str | os.PathLike,
               params: dict[str, Any] | None = None, seed: int = 0, device: str | torch.device = "cpu",
               student: str | None = None, steps: int | None = None, progress: bool = False,
               labels: LabelSpec | None = None, eval_data: str | None = None,
               views: int | None = None, force: bool = False) -> TransferData:
    """Make `num` synthetic transfer images with a registered method and write them, with the teacher's labels.

    See the module docstring for how each kind of method makes images and how a run resumes. The file records its
    provenance and the method's student recipe (`dfkd.transfer_meta`).

    Args:
        teacher: the loaded teacher.
        method: a registered method name.
        num: images to write (None: `default_num`).
        out: the .npz to write (atomically, once every image is there).
        params: method hyper-parameter overrides (as `-p`).
        seed: random seed.
        device: where synthesis runs.
        student: the student architecture the method trains alongside (adversarial methods need one).
        steps: training before collection (see above).
        progress: show progress bars (steps, then images, each with its ETA).
        labels: what of the teacher's output to store (`dfkd.labels`; default the full softmax).
        eval_data: real test data to measure the teacher's top-1 on, for the provenance (else the model file's).
        views: images stored per image the method makes: it and `views - 1` augmented views, each labelled by the
            teacher (None: `default_views`, 4 for a method whose student sees augmented views in place, else 1).
        force: replace `out` (--force); else a file that appeared there while this ran is kept, this not written.

    Returns:
        The written data, as `load_transfer` reads it back.
    """
    from dfkd.build import build_method
    from dfkd.checkpoint import set_rng_state
    from dfkd.generators import GeneratorSynthesizer
    from dfkd.utils import seed_everything

    num = default_num(teacher.num_classes) if num is None else num
    if num < 1:
        raise DfkdError(f"--num {num}: give a positive number of images")
    if num < teacher.num_classes:  # a 1-image transfer file then trained a student at chance, unsaid
        warnings.warn(f"--num {num}: fewer images than the teacher's {teacher.num_classes} classes, so some classes "
                      f"cannot appear in the file; give --num {default_num(teacher.num_classes)} (the default) or more "
                      "for a student", stacklevel=2)
    check_synthesis_method(method)
    labels = labels or LabelSpec()
    if labels.mode == "topk" and (labels.k or 1) >= teacher.num_classes:  # a user minimising what leaves: say so
        warnings.warn(f"--labels {labels.text()}: the teacher has {teacher.num_classes} classes, so every row keeps "
                      f"all of them, as --labels soft does; give K under {teacher.num_classes} to store less",
                      stacklevel=2)
    top1, top1_on = _teacher_top1(teacher, eval_data, device)
    device = torch.device(device)
    seed_everything(seed)
    built = build_method(method, teacher, params or {}, device, seed, student, min_s_steps=0, handed_on=RECIPE_KEYS)
    m, p, name = built.method, built.method.p, built.student_name
    generator = isinstance(m.synth, GeneratorSynthesizer)
    trained = GENERATOR_STEPS if steps is None and generator else steps or 0
    recipe = student_recipe(m)
    views = default_views(recipe) if views is None else views
    if views < 1:
        m.close()
        raise DfkdError(f"--views {views}: give 1 (the images alone) or more (each image and its augmented views)")
    with ExitStack() as held:
        try:
            spec = teacher.spec
            check_room(out, num, spec.channels * spec.size * spec.width, teacher.num_classes)
            busy = (f"--out {out}: {{pid}} is making this file (its parts are in {parts_folder(out)}); wait for it "
                    "to end, or stop it and run the same command again to finish the file")  # both wrote one file
            existed = parts_folder(out).is_dir()
            if existed:  # locked before its settings are compared: a live one's user was told to delete it
                held.enter_context(folder_lock(parts_folder(out), busy))
            parts = Parts(out, {"method": method, "teacher_sha256": teacher.sha256, "num": num, "seed": seed,
                                "steps": trained, "student": name, "labels": labels.text(),
                                "params": plain_params(p), "views": views})
            if not existed:  # a new folder: locked once made
                held.enter_context(folder_lock(parts.folder, busy))
            m.attach_storage(parts.folder)
            state, done = parts.state(), parts.done()
            if state is None:
                _train(m, trained, progress)
            else:
                m.load_state_dict(state["method"])
                set_rng_state(state["rng"])
            balance = _collect(m, generator, parts, num, done, progress, teacher, labels, device, views, recipe)
        finally:
            m.close()
        record = provenance(teacher, method, p, seed=seed, steps=trained, num=num, labels=labels.text(), top1=top1,
                            top1_on=top1_on)
        record.update(views=views, class_balanced=balance is not None and not balance.gave_up)
        parts.assemble(meta_arrays(teacher.spec, teacher.num_classes, method, teacher.sha256, record, recipe), num,
                       replace=force)
    return load_transfer(out, "--out")


def spread(probs: Tensor, n: int) -> Tensor:
    """Indices of at most `n` of the images, in order, spread over the teacher's classes (its argmax).

    A batch aimed at every class holds them in blocks (DeepInversion's 256 targets, class by class): the first 200
    of them left the last classes out of a `--num 200` file, unsaid. Each class's k-th image comes before any
    class's (k+1)-th, so a cut keeps the classes as even as the images allow.
    """
    if len(probs) <= n:
        return torch.arange(len(probs))
    cls = probs.argmax(1)
    one_hot = torch.nn.functional.one_hot(cls, probs.shape[1])
    rank = (one_hot.cumsum(0) * one_hot).sum(1) - 1  # the k of each image among its class's
    first = torch.sort(rank * len(cls) + torch.arange(len(cls))).indices[:n]  # by k, then by position
    return first.sort().values


def _collect(m: Any, generator: bool, parts: Parts, num: int, done: int, progress: bool, teacher: Teacher,
             labels: LabelSpec, device: torch.device, views: int, recipe: dict[str, Any]) -> Balance | None:
    """Make the images still missing, part by part, each with its labels and the state after it.

    Returns:
        The class quotas of a generator method (None for others), as they stand after the last part.
    """
    from dfkd.checkpoint import rng_state

    state = parts.state() or {}
    balance = Balance(num, teacher.num_classes, state.get("balance")) if generator else None
    left = num - done
    xs: list[Tensor] = []
    batches = _batches(m, generator, lambda: (num - left + sum(map(len, xs))) / num)
    with progress_bar(total=num, initial=done, desc=f"synthesize {m.name}", unit="img", disable=not progress) as bar:
        while left > 0:
            xs, ps = [], []
            while sum(map(len, xs)) < min(PART_IMAGES, left):
                x = to_pixels(with_views(next(batches), views, recipe, teacher.spec), teacher.spec)
                probs = teacher_probs(teacher, x, device, int(m.p["batch_size"]))
                if balance is not None:
                    keep = balance.keep(probs)
                    x, probs = x[keep], probs[keep]
                xs.append(x)
                ps.append(probs)
            probs = torch.cat(ps)
            keep = spread(probs, left)
            x, probs = torch.cat(xs)[keep], minimise(probs[keep], labels)
            extra = {"balance": balance.state_dict()} if balance is not None else {}
            parts.add(x, probs, {"method": m.state_dict(), "rng": rng_state(), **extra})
            left -= len(x)
            bar.update(len(x))
    return balance


def _teacher_top1(teacher: Teacher, eval_data: str | None, device: str | torch.device) -> tuple[float | None,
                                                                                               str | None]:
    """The teacher's top-1 for the provenance: measured on `eval_data`, else its model file's record, else None.

    A top-1 near chance (`data_doubt`: the data is likely not the teacher's) is warned of, and the file records it
    with that doubt beside the data's name, so that `dfkd report` and the receiver see it too.
    """
    if eval_data is None:
        top1 = teacher.recorded_top1
        return top1, ("its model file's record" if top1 is not None else None)
    from dfkd.data import load_for
    from dfkd.evaluate import accuracy, data_doubt, size_note

    images = load_for(eval_data, "--eval-data", teacher.num_classes, teacher.spec, teacher.class_names)
    top1 = float(accuracy(teacher, images, teacher.spec, torch.device(device))["top1"])
    doubt = data_doubt(top1, teacher.num_classes, "--eval-data", eval_data, size_note(images, teacher.spec),
                       teacher.recorded_top1)
    if doubt:
        warnings.warn(doubt, stacklevel=3)
        return top1, f"{Path(eval_data).name}; near chance: likely not data of this teacher"
    return top1, Path(eval_data).name
