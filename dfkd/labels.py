"""Label minimisation for transfer files: ship less of the teacher's output than its full softmax.

`--labels` chooses what each stored row keeps of the teacher's probabilities p on an image:

    soft            p itself (the default; all the teacher's "dark knowledge")
    topk=K          the K largest entries of p renormalised, every other class exactly 0
    hard            the one-hot row of argmax p (what a labelled data set would reveal)
    temperature=T   softmax(log p / T): T < 1 sharpens towards hard, T > 1 flattens

`--label-decimals D` then rounds each row to D decimals and renormalises it (a coarser number leaks less; the
argmax class keeps a positive value, since it is at least 1/K before rounding and D >= 1).
The receiver reads every mode alike: a row of probabilities whose log is the KD target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dfkd.errors import DfkdError

MODES = ("soft", "topk", "hard", "temperature")


@dataclass(frozen=True)
class LabelSpec:
    """A parsed `--labels` value (`k` for topk, `T` for temperature) and the optional rounding."""

    mode: str = "soft"
    k: int | None = None
    T: float | None = None
    decimals: int | None = None

    def text(self) -> str:
        """The `--labels` text that gives this spec, plus the rounding (for provenance and reports)."""
        base = {"topk": f"topk={self.k}", "temperature": f"temperature={self.T}"}.get(self.mode, self.mode)
        return base + (f", {self.decimals} decimals" if self.decimals is not None else "")


def parse_labels(text: str, decimals: int | None = None) -> LabelSpec:
    """`soft`, `hard`, `topk=K` or `temperature=T` (and a rounding to `decimals`) -> LabelSpec.

    Raises:
        DfkdError: an unknown mode, a K below 1, a temperature that is not a positive number, decimals below 1,
            decimals for hard labels.
    """
    if decimals is not None and not 1 <= decimals <= 8:
        raise DfkdError(f"--label-decimals {decimals}: give 1 to 8 decimals (or leave it out for full precision)")
    name, _, value = text.strip().partition("=")
    if name == "hard" and not value and decimals is not None:  # one-hot labels have no decimals to round
        raise DfkdError(f"--label-decimals {decimals}: --labels hard stores one class a row, with nothing to round; "
                        "drop --label-decimals, or give soft, topk=K or temperature=T labels")
    if name in ("soft", "hard") and not value:
        return LabelSpec(name, decimals=decimals)
    if name == "topk" and value:
        try:
            k = int(value)
        except ValueError:
            k = 0
        if k < 1:
            raise DfkdError(f"--labels {text}: K must be a whole number >= 1, e.g. topk=3")
        return LabelSpec("topk", k=k, decimals=decimals)
    if name == "temperature" and value:
        try:
            t = float(value)
        except ValueError:
            t = float("nan")
        if not (t > 0 and t < float("inf")):
            raise DfkdError(f"--labels {text}: the temperature must be a positive number, e.g. temperature=0.5")
        return LabelSpec("temperature", T=t, decimals=decimals)
    raise DfkdError(f"--labels {text}: use soft, hard, topk=K or temperature=T")


def minimise(probs: Tensor, spec: LabelSpec) -> Tensor:
    """The rows `spec` keeps of the teacher's probabilities `probs` (each row still sums to 1).

    Shape:
        - probs: (N, K) rows of probabilities.
        - output: (N, K), float32.
    """
    p = probs.float()
    if spec.mode == "hard":
        p = torch.nn.functional.one_hot(p.argmax(1), p.shape[1]).float()
    elif spec.mode == "topk":
        k = min(int(spec.k or 1), p.shape[1])
        vals, idx = p.topk(k, dim=1)
        p = torch.zeros_like(p).scatter_(1, idx, vals)
    elif spec.mode == "temperature":
        p = torch.softmax(p.clamp_min(torch.finfo(torch.float32).tiny).log() / float(spec.T or 1.0), 1)
    p = p / p.sum(1, keepdim=True)
    if spec.decimals is not None:
        p = torch.round(p, decimals=spec.decimals)
        p = p / p.sum(1, keepdim=True)
    return p
