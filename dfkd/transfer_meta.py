"""What a transfer file records about itself: its provenance, and the student recipe the receiver adopts.

Provenance answers "which teacher and settings made this file, and when": the teacher file's name and sha256, its
class names where its file names them (a student distilled from the file alone records them, and reads an image
folder by them), its top-1 accuracy when known (from a dfkd model file's own record, or measured on `--eval-data`
at synthesis), the method and every resolved hyper-parameter, the seed, the training steps, the label minimisation,
the dfkd version and the UTC date. The recipe is the method's student-side settings, so a receiver trains from the
file the way the method trains its student in place (same optimizer, learning rate, minibatch, temperature,
schedule and the augmentation the method shows its student).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from dfkd.teacher import Teacher

#: Student-side settings a method's recipe hands to the receiver (`distill --transfer-data`).
RECIPE_KEYS = ("batch_size", "s_optimizer", "lr_s", "momentum", "weight_decay", "schedule", "milestones", "gamma",
               "T")


def student_recipe(method: Any) -> dict[str, Any]:
    """The student-side settings of a built method, and the augmentation it shows its student.

    Latent-pool methods (fast, cmi) train on crop (+ flip) views of their pool, zskd on its `augment` kind; the
    others on the images as made. That kind is recorded as `method_augment`, while `augment` stays "none": in place
    the teacher labels every view afresh, but from the file alone the stored labels describe the un-augmented
    images, and crops under those labels cost accuracy (fast on the MNIST LeNet-5-BN teacher, 300 student steps
    from 1536 images: 28.78 % with the crops, 41.51 % without). A receiver with the teacher, or who wants them,
    re-applies it with `-p augment=KIND`.
    """
    p = method.p
    recipe = {k: p[k] for k in RECIPE_KEYS if k in p}
    recipe["batch_size"] = int(p["batch_size"])
    from dfkd.methods._latent import LatentMethod

    if isinstance(method, LatentMethod):
        recipe.update(method_augment="crop_flip", flip_p=float(p["flip_p"]))
    elif isinstance(p.get("augment"), str):
        recipe.update(method_augment=p["augment"], flip_p=float(p.get("flip_p", 0.0)))
    else:
        recipe["method_augment"] = "none"
    recipe["augment"] = "none"
    return recipe


def provenance(teacher: Teacher, method: str, params: dict[str, Any], *, seed: int, steps: int, num: int,
               labels: str, top1: float | None, top1_on: str | None) -> dict[str, Any]:
    """The provenance record written into a transfer file (JSON-ready)."""
    from dfkd import __version__

    return {
        "teacher": {"file": Path(teacher.source).name, "sha256": teacher.sha256, "format": teacher.fmt,
                    "arch": teacher.arch, "top1": top1, "top1_on": top1_on, "class_names": teacher.class_names},
        "method": method, "settings": plain_params(params), "seed": seed, "steps": steps, "num": num, "labels": labels,
        "dfkd_version": __version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def plain_params(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters as JSON values (anything else as its text)."""
    out = {}
    for k, v in params.items():
        out[k] = v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)
    return out
