"""Class-incremental distillation without the old data: `dfkd extend`.

A deployed classifier knows classes 0..K-1; new labelled data brings classes K..K+M-1 (their indices are appended).
The old training data is gone, so the old classes are kept alive by *data-free replay*: images synthesized from
the old model alone with any dfkd synthesis method (DeepInversion by default), labelled by the old model. The
extended model starts from the old one (its head grown by M rows) and trains with the losses of Always Be Dreaming
(Smith et al., "Always Be Dreaming: A New Approach for Data-Free Class-Incremental Learning", ICCV 2021):

    L = CE_local(real, new classes)  +  CE_local(replay, old classes)
        + hkd_weight * || w ⊙ (h_old(x) - h(x)) ||^2   on real and replay images
        + CE(head only, all classes, real + replay)

`CE_local` is cross-entropy over one task's logits only (so the new task cannot push old logits down and the
synthetic images, which are not real digits, never compete with real ones); the feature term keeps the
penultimate features where the old head reads them, each dimension weighted by its importance to the old head
(mean |weight| over the old classes, normalised to mean 1); the last term calibrates the grown head across old and
new classes with features detached. Adam at 1e-3 and `hkd_weight` 1 are dfkd's settings, measured on the MNIST demo
(the paper tunes its weights per benchmark, with a generator retrained for each task). The extended model is a
dfkd model file, so it is the `--teacher` of the next task: repeat for as many tasks as arrive.

Two references are trained in the same run from the same start, with the same steps and batch, when
`--eval-data` is given: fine-tuning on the new data alone (what forgetting looks like) and, with `--old-data`, joint
training on old and new real data (the ceiling, which needs the data `extend` does without).
"""

from __future__ import annotations

import filecmp
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfkd.data import ImageData, load_for, load_images
from dfkd.errors import DfkdError
from dfkd.evaluate import predict, size_note
from dfkd.io import atomic_copy, atomic_write_text, read_json_object, same_data
from dfkd.lifelong_train import (
    PHASES,
    Batches,
    Phase,
    evaluate_split,
    grow_model,
    train_phase,
)
from dfkd.modelfile import ModelFile, save_model
from dfkd.stopping import terminate_as_interrupt
from dfkd.teacher import Teacher


@dataclass(frozen=True)
class ExtendConfig:
    """Settings of `dfkd extend`.

    Args:
        teacher: the old model (knows classes 0..K-1).
        data: labelled images of the new classes.
        out: the extended model file to write.
        eval_data: test images of old and new classes (old/new/all accuracy and the references).
        old_data: real old-class images, used only by the joint-training reference (never by `extend` itself).
        method: dfkd synthesis method that makes the replay images.
        replay: number of replay images.
        replay_steps: student steps the synthesis method trains before collecting (None: its default).
        params: overrides of the synthesis method's hyper-parameters (`-p`).
        steps: training steps (each: `batch_size` new images and `batch_size` replay images).
        batch_size: images per step from each source.
        lr: Adam learning rate.
        hkd_weight: weight of the importance-weighted feature distillation.
        work: folder for the replay file, checkpoints and the report (default: `<out>` without its suffix + `.extend/`).
        seed: random seed.
        device: cpu, cuda or auto.
        checkpoint_every: steps between checkpoints.
    """

    teacher: str
    data: str
    out: str
    eval_data: str | None = None
    old_data: str | None = None
    method: str = "deepinversion"
    replay: int = 2048
    replay_steps: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    hkd_weight: float = 1.0
    work: str | None = None
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 100

    def work_dir(self) -> Path:
        """Where the replay, checkpoints and report live."""
        return Path(self.work) if self.work else Path(str(Path(self.out).with_suffix("")) + ".extend")


def append_labels(data: ImageData, k_old: int, path: str) -> ImageData:
    """New-class labels as indices of the extended model: kept when all are >= k_old, shifted up when they start at 0.

    Labels from 0 are read as k_old on however many new classes there are (6 new classes 0..5 on a 5-class model
    were refused as "on both sides" of 5); labels starting between 0 and k_old fit neither convention and are
    refused. A new class index without an image (labels {0, 2}, or {12} for a 5-class model) gets a warning: the
    extended model would have an output no image taught.
    """
    if len(data) == 0:
        raise DfkdError(f"--data {path}: holds no images")
    lo, hi = int(data.y.min()), int(data.y.max())
    if lo < 0:
        raise DfkdError(f"--data {path}: labels must be >= 0, found {lo}")
    if 0 < lo < k_old:
        raise DfkdError(f"--data {path}: labels run {lo}..{hi}, from inside the old model's {k_old} classes; give only "
                        f"the new classes' images, labelled from 0 (read as {k_old} on) or from {k_old}")
    out = data if lo >= k_old else ImageData(data.x, data.y + k_old, data.class_names)
    empty = sorted(set(range(k_old, int(out.y.max()) + 1)) - {int(c) for c in out.y.unique()})
    if empty:
        shown = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
        warnings.warn(f"--data {path}: new class(es) {shown} of the extended model have no image (labels run {lo}..{hi}"
                      f"); it gets {len(empty)} output(s) nothing teaches. Relabel the new classes without gaps",
                      stacklevel=2)
    return out


#: The share of the images labelled with an old class's index that the old model answers with that very index,
#: above which labels from 0 are read as the old classes themselves (new classes would agree about 1/K by chance).
OLD_CLASS_AGREEMENT = 0.5


def check_not_old_classes(data: ImageData, teacher: Teacher, path: str, device: torch.device,
                          n: int = 512) -> None:
    """Labels from 0: new classes, or the old model's own classes (alone, or with the new)?

    Labels 0..M-1 are read as new classes K..K+M-1, however many; but a whole dataset (old classes and new) is
    labelled from 0 too, and was extended as if every class were new, and so were images of old classes alone. Where
    the old model answers most of the images labelled 0..K-1 with that very label, they are its own classes, and the
    data is refused.
    """
    k_old, top = teacher.num_classes, int(data.y.max())
    if int(data.y.min()) != 0:
        return
    idx = (data.y < k_old).nonzero().flatten()[:n]
    agree = float((predict(teacher, data.subset(idx), teacher.spec, device).argmax(1) == data.y[idx]).float().mean())
    if agree > OLD_CLASS_AGREEMENT and top < k_old:  # images of old classes 0..2 were taught as new classes K..K+2
        raise DfkdError(f"--data {path}: labels 0..{top} are read as new classes {k_old}..{k_old + top}, but the old "
                        f"model answers {100 * agree:.0f} % of the images with that very label: they are its own "
                        f"classes; give images of classes it does not know")
    if agree > OLD_CLASS_AGREEMENT:
        raise DfkdError(f"--data {path}: labels run 0..{int(data.y.max())}, and the old model answers "
                        f"{100 * agree:.0f} % of the images labelled 0..{k_old - 1} with that very label: they are its "
                        f"own {k_old} classes; give only the new classes' images, labelled from 0 (read as {k_old} on) "
                        f"or from {k_old}")


def check_new_channels(data: ImageData, teacher: Teacher, path: str) -> None:
    """New classes come from the old model's domain: images of another channel count are refused, not converted."""
    c = int(data.x.shape[1])
    if c != teacher.spec.channels:
        raise DfkdError(f"--data {path}: images have {c} channel(s), the old model takes {teacher.spec.channels}; give "
                        f"new-class images of the model's kind ({teacher.spec.describe()})")


def make_replay(teacher: Teacher, cfg: ExtendConfig, work: Path, device: torch.device) -> ImageData:
    """Synthesize (once; a resumed run reads the file back) `cfg.replay` images of the old classes."""
    from dfkd.transfer import load_transfer, synthesize

    path = work / "replay.npz"
    if path.exists():
        data = load_transfer(path, "replay")
    else:
        data = synthesize(teacher, cfg.method, cfg.replay, path, cfg.params, cfg.seed, device,
                          steps=cfg.replay_steps, progress=True)
    return ImageData(data.x, data.probs.argmax(1))


def _check_replay_settings(cfg: ExtendConfig) -> None:
    """Refuse a replay method that makes no images, or `-p` keys and values it does not take, before any file."""
    from dfkd.config import check_method_params
    from dfkd.transfer import check_synthesis_method

    check_synthesis_method(cfg.method)
    check_method_params(cfg.method, cfg.params, min_s_steps=0)


def wrote_out(cfg: ExtendConfig) -> bool:
    """Whether `cfg.out` is the model this run wrote: a byte-identical copy of `<work>/model.pt`."""
    out, ours = Path(cfg.out), cfg.work_dir() / "model.pt"
    return out.is_file() and ours.is_file() and filecmp.cmp(out, ours, shallow=False)


def _check_config(cfg: ExtendConfig, work: Path, resume: bool) -> None:
    """A new run needs a new (or empty) work folder; a resumed one the same settings as before."""
    from dfkd.outpaths import check_output_file

    saved = work / "config.json"
    if work.exists() and not work.is_dir():
        raise DfkdError(f"--work {work}: is a file, not a folder; give a folder for the run (it is created when "
                        "missing)")
    if not resume:
        if work.exists() and any(work.iterdir()):
            where = f"--work {work}" if cfg.work else f"--out {cfg.out}: its work folder {work} (named after --out)"
            if saved.is_file():
                raise DfkdError(f"{where}: holds an earlier extend run; continue it with --resume or remove it")
            # a folder of the user's was called an earlier run, and --resume then called it none: advice in a loop
            found = ", ".join(sorted(p.name for p in work.iterdir())[:3])
            fix = "give another --work (a new or empty folder)" if cfg.work else "give --work DIR, or another --out"
            raise DfkdError(f"{where}: holds files that are not an extend run's ({found}); {fix}")
        if Path(cfg.out).exists():
            raise DfkdError(f"--out {cfg.out}: exists; dfkd never overwrites a model file, pick another --out")
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved, json.dumps(asdict(cfg), indent=1))
        return
    if not saved.exists():
        raise DfkdError(f"--resume: {work} holds no extend run (no config.json); start it without --resume")
    before = read_json_object(saved, "put back the file the run wrote, or start a new run with another --out "
                                     "(or --work)")
    for key, value in asdict(cfg).items():
        if key != "device" and before.get(key) != json.loads(json.dumps(value)):
            raise DfkdError(f"--resume: {key} was {before.get(key)!r} in {work}, now {value!r}; give the same "
                            "settings to resume (only --device may change)")
    if not wrote_out(cfg):  # a file the run did not write
        check_output_file(cfg.out, force=None)


def extend(cfg: ExtendConfig, teacher: Teacher, resume: bool = False) -> dict[str, Any]:
    """Extend `teacher` to the classes of `cfg.data`; write `cfg.out`; train and evaluate the references.

    Args:
        cfg: the settings.
        teacher: the loaded old model (a dfkd model file or anything with a rebuildable architecture).
        resume: continue the run in `cfg.work_dir()` from its checkpoints.

    Returns:
        The report: class counts and, with `eval_data`, old/new/all top-1 of the teacher, the extended model and
        the references (fractions in [0, 1]). Also written to `<work>/report.json`.
    """
    with terminate_as_interrupt():  # SIGTERM, SIGHUP: as Ctrl-C (each phase stops after a step)
        return _extend(cfg, teacher, resume)


def _extend(cfg: ExtendConfig, teacher: Teacher, resume: bool) -> dict[str, Any]:
    from dfkd.utils import pick_device, seed_everything

    device = pick_device(cfg.device)
    if cfg.old_data and not cfg.eval_data and not resume:  # it was read, checked, and left unused without a word
        raise DfkdError(f"--old-data {cfg.old_data}: trains the joint-training reference, which is measured on "
                        "--eval-data; add --eval-data TEST, or drop --old-data")
    work = cfg.work_dir()
    k_old = teacher.num_classes
    given = load_images(cfg.data)
    new = append_labels(given, k_old, cfg.data)
    check_new_channels(new, teacher, cfg.data)
    how = size_note(new, teacher.spec)  # a resize (28 px MNIST to a 32-px LeNet) is the usual reading; a stretch not
    if "stretched" in how and not resume:  # 28x56 images: new-class top-1 2 % against 36, unsaid
        warnings.warn(f"--data {cfg.data}: its images are {how} for the old model", stacklevel=2)
    check_not_old_classes(given, teacher, cfg.data, device)
    k_all = int(new.y.max()) + 1
    if k_all - k_old == 1 and not resume:
        warnings.warn(f"--data {cfg.data}: one new class: the new-data loss of Always Be Dreaming is a cross-entropy "
                      "over the new classes' logits alone, which is zero for one class, so the network's features do "
                      "not learn it and only the classifier head does; give two or more new classes, or more --steps",
                      stacklevel=2)
    test = load_for(cfg.eval_data, "--eval-data", k_all, teacher.spec, _all_names(teacher, new, k_all)) \
        if cfg.eval_data else None
    if cfg.eval_data and not resume and same_data(cfg.eval_data, cfg.data):
        warnings.warn(f"--eval-data {cfg.eval_data} is the --data the model trains on: its new-class top-1 there is "
                      "training accuracy, and it holds no old class; give held-out images of every class",
                      stacklevel=2)
    old = load_for(cfg.old_data, "--old-data", k_old, teacher.spec, teacher.class_names) if cfg.old_data else None
    _check_replay_settings(cfg)  # before the work folder: a typo refused after it blocked a rerun and a resume
    _check_config(cfg, work, resume)
    seed_everything(cfg.seed)
    replay = make_replay(teacher, cfg, work, device)
    sources = {"extend": [new, replay], "finetune": [new], "joint": [new, old]}
    report: dict[str, Any] = {"old_classes": k_old, "all_classes": k_all, "replay_classes":
                              int(replay.y.unique().numel()), "new_images": len(new), "replay_images": len(replay)}
    extended = None
    for name in PHASES:
        if name != "extend" and (test is None or (name == "joint" and old is None)):
            continue
        torch.manual_seed(cfg.seed)  # every phase starts from the same grown model, whatever ran before (resumes)
        model = grow_model(teacher, k_all).to(device)
        phase = Phase(name, model, teacher, k_old, Batches(sources[name], teacher.spec, cfg.batch_size, cfg.seed),
                      cfg.steps, cfg.lr, cfg.hkd_weight, cfg.checkpoint_every, work / f"{name}.pt")
        train_phase(phase, device)
        extended = model if name == "extend" else extended
        if test is not None:
            report[name] = evaluate_split(model, test, teacher.spec, k_old, k_all, device)
    if test is not None:
        report["teacher"] = evaluate_split(teacher, test, teacher.spec, k_old, k_old, device)
    atomic_write_text(work / "report.json", json.dumps(report, indent=1))
    _write_model(cfg, teacher, extended, new, k_all)  # last: --out appears when the run is done
    return report


def _all_names(teacher: Teacher, new: ImageData, k_all: int) -> list[str] | None:
    """The extended model's class names: the teacher's, then the new data's (numbers where one side has none)."""
    if not (teacher.class_names or new.class_names):
        return None
    old_names = list(teacher.class_names or [str(i) for i in range(teacher.num_classes)])
    return old_names + list(new.class_names or [str(i) for i in range(len(old_names), k_all)])


def _write_model(cfg: ExtendConfig, teacher: Teacher, model: nn.Module, new: ImageData, k_all: int) -> None:
    """Write the model as `<work>/model.pt`, then copy it to `cfg.out`: a resume knows the copy as its own."""
    if wrote_out(cfg):  # a resumed run wrote it before it was stopped
        return
    names = _all_names(teacher, new, k_all)
    prov = {"kind": "extended", "from": os.path.basename(teacher.source), "new_data": os.path.basename(cfg.data),
            "method": cfg.method, "old_classes": teacher.num_classes, "steps": cfg.steps}
    kwargs = {**(teacher.arch_kwargs or {}), "num_classes": k_all}
    ours = cfg.work_dir() / "model.pt"
    save_model(ours, model, ModelFile(teacher.arch, kwargs, teacher.spec, k_all, names, prov))
    atomic_copy(ours, cfg.out, replace=False)  # a file that appeared at --out while the run trained is kept
