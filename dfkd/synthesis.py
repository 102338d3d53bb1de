"""The owner's side of the privacy split: `dfkd synthesize` makes a transfer file next to the teacher.

Generator methods (a persistent generator, `GeneratorSynthesizer`: dafl, dfad, zskt, dfq) train for `steps`
student steps (default `GENERATOR_STEPS`), then their generator is sampled. Every other method (inversion, zskd,
cmi, fast) runs `steps` student steps first (default 0), then rounds, collecting each round's finished batch
(`method.last_images`); the student those rounds train is discarded. Images go to disk in parts of at least
`PART_IMAGES` with the method's state after each (`dfkd.transfer_parts`): a second run with the same flags
resumes, and the file is assembled without holding every image in memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dfkd.errors import DfkdError
from dfkd.labels import LabelSpec, minimise
from dfkd.teacher import Teacher
from dfkd.transfer import TransferData, load_transfer, meta_arrays, teacher_probs, to_pixels
from dfkd.transfer_meta import plain_params, provenance, recorded_top1, student_recipe
from dfkd.transfer_parts import Parts

#: Student steps a generator method trains before its generator is sampled (`synthesize(steps=None)`).
GENERATOR_STEPS = 2000
#: `--num` when not given: images per class, and the most images that default asks for.
PER_CLASS, MAX_DEFAULT_NUM = 1000, 50_000
#: Images a part file holds at least (the method's state is saved after each part).
PART_IMAGES = 2048


def default_num(num_classes: int) -> int:
    """`--num` when not given: `PER_CLASS` images a class, at most `MAX_DEFAULT_NUM`."""
    return min(PER_CLASS * num_classes, MAX_DEFAULT_NUM)


def _train(method: Any, steps: int, progress: bool) -> None:
    from tqdm import tqdm

    done = 0
    with tqdm(total=steps, desc=f"train {method.name}", unit="step", disable=not progress or steps == 0) as bar:
        while done < steps:
            method.set_progress(done / steps)
            method.steps_left = steps - done
            method.round()
            n = max(method.student_steps_per_round, 1)
            done += n
            bar.update(n)


def _batches(method: Any, generator: bool) -> Iterator[Tensor]:
    """Endless uint8 batches: generator samples, or each round's finished batch."""
    spec, size = method.teacher.spec, int(method.p["batch_size"])
    while True:
        if generator:
            with torch.no_grad():
                yield to_pixels(method.synth.sample(size), spec)
            continue
        method.round()
        if method.last_images is None:
            raise DfkdError(f"method {method.name} produced no images in a round; it cannot synthesize transfer data")
        yield to_pixels(method.last_images, spec)


def _parts(method: Any, generator: bool, left: int) -> Iterator[Tensor]:
    """Parts of at least PART_IMAGES images (the last one smaller) until `left` images are made."""
    batches = _batches(method, generator)
    while left > 0:
        got: list[Tensor] = []
        while sum(map(len, got)) < min(PART_IMAGES, left):
            got.append(next(batches))
        part = torch.cat(got)[:left]
        left -= len(part)
        yield part


def synthesize(teacher: Teacher, method: str, num: int | None, out: str | os.PathLike,
               params: dict[str, Any] | None = None, seed: int = 0, device: str | torch.device = "cpu",
               student: str | None = None, steps: int | None = None, progress: bool = False,
               labels: LabelSpec | None = None, eval_data: str | None = None) -> TransferData:
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
    if method == "transfer":
        raise DfkdError("--method transfer distills from a transfer file; it cannot make one")
    labels = labels or LabelSpec()
    top1, top1_on = _teacher_top1(teacher, eval_data, device)
    device = torch.device(device)
    seed_everything(seed)
    built = build_method(method, teacher, params or {}, device, seed, student, min_s_steps=0)
    m, p, name = built.method, built.method.p, built.student_name
    generator = isinstance(m.synth, GeneratorSynthesizer)
    trained = GENERATOR_STEPS if steps is None and generator else steps or 0
    try:
        parts = Parts(out, {"method": method, "teacher_sha256": teacher.sha256, "num": num, "seed": seed,
                            "steps": trained, "student": name, "labels": labels.text(), "params": plain_params(p)})
        m.attach_storage(parts.folder)
        state, done = parts.state(), parts.done()
        if state is None:
            _train(m, trained, progress)
        else:
            m.load_state_dict(state["method"])
            set_rng_state(state["rng"])
        _collect(m, generator, parts, num, done, progress, teacher, labels, device)
        recipe = student_recipe(m)
    finally:
        m.close()
    record = provenance(teacher, method, p, seed=seed, steps=trained, num=num, labels=labels.text(), top1=top1,
                        top1_on=top1_on)
    parts.assemble(meta_arrays(teacher.spec, teacher.num_classes, method, teacher.sha256, record, recipe), num)
    return load_transfer(out, "--out")


def _collect(m: Any, generator: bool, parts: Parts, num: int, done: int, progress: bool, teacher: Teacher,
             labels: LabelSpec, device: torch.device) -> None:
    """Make the images still missing, part by part, each with its labels and the state after it."""
    from tqdm import tqdm

    from dfkd.checkpoint import rng_state

    with tqdm(total=num, initial=done, desc=f"synthesize {m.name}", unit="img", disable=not progress) as bar:
        for x in _parts(m, generator, num - done):
            probs = minimise(teacher_probs(teacher, x, device, int(m.p["batch_size"])), labels)
            parts.add(x, probs, {"method": m.state_dict(), "rng": rng_state()})
            bar.update(len(x))


def _teacher_top1(teacher: Teacher, eval_data: str | None, device: str | torch.device) -> tuple[float | None,
                                                                                               str | None]:
    """The teacher's top-1 for the provenance: measured on `eval_data`, else its model file's record, else None."""
    if eval_data is None:
        top1 = recorded_top1(teacher)
        return top1, ("its model file's record" if top1 is not None else None)
    from dfkd.data import check_fits, load_images
    from dfkd.evaluate import accuracy

    images = load_images(eval_data)
    check_fits(images, teacher.num_classes, teacher.spec, "--eval-data", eval_data)
    return float(accuracy(teacher, images, teacher.spec, torch.device(device))["top1"]), Path(eval_data).name
