"""Reading the teacher's BatchNorm inputs for BN-statistics losses, and saying once when there are none.

A teacher without BatchNorm still carries one statistic of its training data: its input normalisation. Images
normalised as (pixel - mean) / std have per-channel mean 0 and variance 1 over the data when mean and std are the
data's, so the input is matched as a BatchNorm layer 0 with running mean 0 and running variance 1 (on by default,
`-p input_stats=false` drops it). The identity (0, 1) and the [-1, 1] convention (0.5, 0.5) are not statistics
of anything and get no such term. Measured (5 CPU-minutes, LeNet-5-half student, README "Cross-teacher
benchmark"): on a BN-free Fashion-MNIST LeNet-5 (90.13 %) fast went from 67.3 to 75.6 % top-1 and cmi from
66.5 to 71.6; cmi on the BN-free MNIST LeNet-5 from 90.0 to 97.3. The method's own BN weight is used: matching
the generator output with weight 1 beat weights 3 and 10 (73.7 against 71.1 and 70.5 %, cmi, Fashion LeNet-5).
"""

from __future__ import annotations

import warnings

import torch

from dfkd.hooks import FeatureTaps
from dfkd.spec import InputSpec
from dfkd.teacher import Teacher

#: Parameters every BN-statistics method takes (in its `defaults`).
BN_DEFAULTS: dict[str, bool] = {"input_stats": True}

_BN_FREE = ("the data-free methods made without BatchNorm (dafl, dfad, zskt, zskd); in the README's cross-teacher "
            "benchmark fast with the input term led them on every BN-free teacher, and `--method auto` picks it")


class BNInputs:
    """Taps on every BatchNorm layer of the teacher; `layers()` gives (input, running_mean, running_var) tuples.

    A teacher without BatchNorm (plain LeNet-5, or TorchScript) gets one warning naming the method and what is
    lost. With `input_stats` and an input normalisation that is a data statistic (`normalisation_is_statistic`),
    `layers()` then gives the teacher's input as the one layer, with running mean 0 and variance 1 (see the module
    docstring); else it is empty and the BN term is zero. `modules` and `paths` name real BatchNorm layers only.

    Args:
        teacher: the frozen teacher.
        method: name of the method (for the warning).
        input_stats: on a BN-free teacher, match the input to its normalisation's statistics.
    """

    def __init__(self, teacher: Teacher, method: str, input_stats: bool = True) -> None:
        self.paths = teacher.bn_paths()
        self.modules = [teacher.module_at(p) for p in self.paths]
        self.taps = FeatureTaps(teacher.module, self.paths, inputs=True) if self.paths else None
        self.input_tap: FeatureTaps | None = None
        if self.taps is not None:
            self.taps.__enter__()
            for member in getattr(teacher, "members", ()):  # an ensemble: said of a member alone, unsaid beside others
                if not member.bn_paths():
                    why = "it has no BatchNorm layers" if member.hookable else f"{member.no_hooks} (no module hooks)"
                    warnings.warn(f"{method}: the teacher {member.source} offers no BatchNorm statistics ({why}); the "
                                  "BN matching term matches the other teachers' layers only", stacklevel=2)
            return
        why = f"{teacher.no_hooks} (no module hooks)" if not teacher.hookable else "it has no BatchNorm layers"
        if teacher.fmt == "onnx" and teacher.hookable:
            why += (": an ONNX export folds BatchNorm into the convolutions; if the network had BatchNorm and you hold "
                    "it, its state_dict or a torch.export archive keeps the statistics (the demo BN LeNet-5 exported "
                    "so, auto at 2 CPU-minutes: 95.2 % top-1, against 98.5 from its own file)")
        spec = teacher.spec
        if input_stats and normalisation_is_statistic(spec):
            self.input_tap = FeatureTaps(teacher, [""], inputs=True).__enter__()  # the wrapper: TorchScript too
            what = (f"the BN matching term matches the teacher's input instead: the synthetic batch's per-channel "
                    f"mean and variance to those its normalisation (mean {_fmt(spec.mean)}, std {_fmt(spec.std)}) "
                    f"implies for its training data. If those are not the data's statistics, -p input_stats=false "
                    f"drops the term")
        else:
            what = (f"the BN matching term is dropped and {method} goes on with its other terms"
                    + ("" if not input_stats else " (its input normalisation, "
                       f"mean {_fmt(spec.mean)}, std {_fmt(spec.std)}, is not a data statistic to match instead)"))
        warnings.warn(f"{method}: the teacher {teacher.source} offers no BatchNorm statistics ({why}); {what}. "
                      f"The alternatives for a BN-free teacher: {_BN_FREE}.", stacklevel=2)

    @property
    def available(self) -> bool:
        """True when there are statistics to match (BatchNorm layers, or the input's)."""
        return self.taps is not None or self.input_tap is not None

    def set_active(self, active: bool) -> None:
        """Record BN inputs only on forwards whose statistics are matched (saves memory on student steps)."""
        for taps in (self.taps, self.input_tap):
            if taps is not None:
                taps.active = active
                if not active:
                    taps.clear()

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(BN input of the last teacher forward, running mean, running var) per layer, in order."""
        if self.input_tap is not None:
            if "" not in self.input_tap.inputs:
                return []
            x = self.input_tap.inputs[""]  # normalised data: per-channel mean 0, variance 1
            c = x.shape[1]
            return [(x, x.new_zeros(c, dtype=torch.float32), x.new_ones(c, dtype=torch.float32))]
        if self.taps is None:
            return []
        return [(self.taps.inputs[p], m.running_mean, m.running_var) for p, m in zip(self.paths, self.modules)
                if p in self.taps.inputs]

    def close(self) -> None:
        for taps in (self.taps, self.input_tap):
            if taps is not None:
                taps.remove()


def normalisation_is_statistic(spec: InputSpec) -> bool:
    """Whether `spec`'s mean and std can be a dataset's statistics: not the identity (0, 1), not (0.5, 0.5)."""
    pairs = set(zip(spec.mean, spec.std))
    return not pairs <= {(0.0, 1.0)} and not pairs <= {(0.5, 0.5)}


def _fmt(values: tuple[float, ...]) -> str:
    return ", ".join(f"{v:.4g}" for v in values)
