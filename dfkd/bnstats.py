"""Reading the teacher's BatchNorm inputs for BN-statistics losses, and saying once when there are none."""

from __future__ import annotations

import warnings

import torch

from dfkd.hooks import FeatureTaps
from dfkd.teacher import Teacher

_BN_FREE = ("the data-free methods made without BatchNorm (dafl, dfad, zskt, zskd), or `--method auto`, which "
            "picks dfad or cmi for it from measured properties")


class BNInputs:
    """Taps on every BatchNorm layer of the teacher; `layers()` gives (input, running_mean, running_var) tuples.

    A teacher without BatchNorm (plain LeNet-5, or TorchScript) gets one warning naming the method and what is
    lost; `layers()` is then empty and the BN term is zero.

    Args:
        teacher: the frozen teacher.
        method: name of the method (for the warning).
    """

    def __init__(self, teacher: Teacher, method: str) -> None:
        self.paths = teacher.bn_paths()
        self.modules = [teacher.module_at(p) for p in self.paths]
        self.taps = FeatureTaps(teacher.module, self.paths, inputs=True) if self.paths else None
        if self.taps is not None:
            self.taps.__enter__()
        else:
            why = "it is TorchScript (no module hooks)" if not teacher.hookable else "it has no BatchNorm layers"
            warnings.warn(f"{method}: the teacher {teacher.source} offers no BatchNorm statistics ({why}); the BN "
                          f"matching term is dropped and {method} goes on with its other terms. For a BN-free "
                          f"teacher, see also {_BN_FREE}.", stacklevel=2)

    @property
    def available(self) -> bool:
        return self.taps is not None

    def set_active(self, active: bool) -> None:
        """Record BN inputs only on forwards whose statistics are matched (saves memory on student steps)."""
        if self.taps is not None:
            self.taps.active = active
            if not active:
                self.taps.clear()

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(BN input of the last teacher forward, running mean, running var) per layer, in order."""
        if self.taps is None:
            return []
        return [(self.taps.inputs[p], m.running_mean, m.running_var) for p, m in zip(self.paths, self.modules)
                if p in self.taps.inputs]

    def close(self) -> None:
        if self.taps is not None:
            self.taps.remove()
