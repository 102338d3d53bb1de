"""Where a run's training batches come from: one class per kind of transfer data, chosen by the run's flags.

A data source decides what the engine would otherwise special-case: which teacher the run has (a network, or a
stand-in when a transfer file comes alone), which method reads it by default, which method settings it feeds
(the file a method loads), which run settings it refuses, and how it splits itself across the ranks of a
`torchrun` job (`shard`). The engine asks `source_for(cfg)` and never names a flag or a method.

- `synthesized` (the default): a data-free method makes every batch. Every rank draws its own noise stream (the
  engine reseeds each rank) and makes its own share of the global batch.
- `transfer` (`--transfer-data FILE.npz` from `dfkd synthesize`): the stored images and soft labels; the teacher
  file is optional. Each rank trains on its own slice of the file.
- `real` (`--data TRAIN`): real labelled images for `--method kd`. Each rank trains on its own slice.

Adding a data source is one class here with `@register_source`: its flag (a `DistillConfig` field), its method,
and whichever hooks it needs.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from dfkd.errors import DfkdError
from dfkd.teacher import Teacher

#: Method settings that are batch sizes: a distributed run splits each across the ranks (the global batch).
BATCH_KEYS = ("batch_size", "synth_batch_size")

_SOURCES: list[type[Source]] = []


def register_source(cls: type[Source]) -> type[Source]:
    """Class decorator: make a data source known to `source_for` (tried in registration order)."""
    _SOURCES.append(cls)
    return cls


class Source:
    """Where batches come from.

    Subclasses set `name`, `flag` (the `DistillConfig` field that selects them) and `method` (the method that
    reads them, the default when the user names none).

    Args:
        cfg: the run's settings.
    """

    name: ClassVar[str] = ""
    flag: ClassVar[str | None] = None  # None: the default source, used when no other source's flag is set
    method: ClassVar[str | None] = None

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    @classmethod
    def selected_by(cls, settings: Any) -> bool:
        """Whether `settings` (a config or a dict of flags) select this source."""
        if cls.flag is None:
            return False
        value = settings.get(cls.flag) if isinstance(settings, dict) else getattr(settings, cls.flag, None)
        return bool(value)

    @property
    def path(self) -> str | None:
        """The file this source reads (None for synthesized batches)."""
        return getattr(self.cfg, self.flag) if self.flag else None

    @property
    def has_teacher(self) -> bool:
        """Whether the run has a teacher network to ask (False: only stored labels)."""
        return bool(self.cfg.teachers)

    def check(self, new: bool = True) -> None:
        """Refuse settings this source cannot run with (before anything is written; `new`: not a resume)."""
        if not self.cfg.teachers:
            raise DfkdError("dfkd distill needs --teacher FILE (or --transfer-data FILE.npz from `dfkd synthesize`)")

    def run_name(self) -> str:
        """What the default run folder is named after (the teacher file, else the data file)."""
        return self.cfg.teachers[0] if self.cfg.teachers else str(self.path)

    def teacher(self, device: torch.device) -> Teacher:
        """The run's teacher: one file, or several answering as one (dfkd.ensemble)."""
        from dfkd.engine import _spec_from_flags
        from dfkd.ensemble import load_teachers

        cfg = self.cfg
        return load_teachers(cfg.teachers, cfg.teacher_arch, cfg.trust_pickle, _spec_from_flags(cfg), device,
                             cfg.params.get("teacher_weights"), cfg.params.get("teacher_weighting", "mean"),
                             cfg.arch_args)

    def overrides(self) -> dict[str, Any]:
        """The method settings of the run: the user's, plus what this source feeds the method (its file)."""
        return dict(self.cfg.params)

    def default_steps(self, method: Any) -> tuple[int, str] | None:
        """Student steps for a run given neither --steps nor --budget-minutes, and the line that says why.

        None (the default): the usual wall-clock budget applies.
        """
        del method
        return None

    # --- several ranks ----------------------------------------------------------------------------------------
    def local_params(self, params: dict[str, Any], world: int) -> dict[str, Any]:
        """The method settings one of `world` ranks builds its method with: its share of every batch size."""
        if world == 1:
            return params
        local = dict(params)
        for key in BATCH_KEYS:
            value = params.get(key)
            if value is None:
                continue
            if int(value) % world:
                raise DfkdError(f"-p {key}={value}: a run on {world} processes splits the batch evenly across them; "
                                f"give a multiple of {world}")
            local[key] = int(value) // world
        return local

    def shard(self, method: Any, rank: int, world: int) -> None:
        """Give rank `rank` of `world` its part of the data (after the method is built, on the rank's own RNG).

        Synthesized batches need nothing here: each rank's own noise stream and batch share make them its own.
        """
        del method, rank, world


def rank_slice(n: int, rank: int, world: int) -> torch.Tensor:
    """Indices of rank `rank`'s slice of `n` items (every `world`-th one, from `rank`)."""
    if n < world:
        raise DfkdError(f"the data holds {n} images, fewer than the {world} processes that would share them")
    return torch.arange(rank, n, world)


@register_source
class TransferFile(Source):
    """A transfer file of `dfkd synthesize`: stored images and the teacher's probabilities; a teacher is optional."""

    name, flag, method = "transfer", "transfer_data", "transfer"

    def check(self, new: bool = True) -> None:
        cfg = self.cfg
        if cfg.method != self.method:
            raise DfkdError(f"--transfer-data trains with the transfer method (the default with --transfer-data), "
                            f"not --method {cfg.method}; drop --method")
        if not cfg.teachers and cfg.student is None:
            raise DfkdError(f"--transfer-data {cfg.transfer_data} without --teacher needs --student ARCH (see `dfkd "
                            "models`): there is no teacher architecture to pick the usual student from")
        features = [f"--feature-loss {cfg.params.get('feature_loss')}"] * bool(cfg.params.get("feature_loss")) + \
            ["--discriminator features"] * (cfg.params.get("discriminator") == "features")
        if not cfg.teachers and features:  # the file holds the teacher's probabilities, not its features
            raise DfkdError(f"{features[0]}: a --transfer-data run without --teacher has no teacher features to "
                            "match; add --teacher FILE (the teacher the file was made from) or drop it")
        if new and not cfg.teachers and cfg.student_init == "teacher":  # it started at random, unsaid (a run
            # started so before this check goes on as it began)
            raise DfkdError("--student-init teacher: a --transfer-data run without --teacher has no teacher weights "
                            "to start the student from; add --teacher FILE (the teacher the file was made from) or "
                            "drop --student-init")

    def teacher(self, device: torch.device) -> Teacher:
        """The teacher file when given, else a stand-in with the transfer file's spec and classes (no forward)."""
        from dfkd.methods.transfer import NoTeacher
        from dfkd.transfer import load_transfer

        return super().teacher(device) if self.cfg.teachers else NoTeacher(load_transfer(self.cfg.transfer_data))

    def overrides(self) -> dict[str, Any]:
        return {**super().overrides(), "transfer_data": self.cfg.transfer_data}

    def default_steps(self, method: Any) -> tuple[int, str] | None:
        """Epochs over the file (this rank's slice) at the method's minibatch: `methods.transfer.steps_for_file`."""
        from dfkd.methods.transfer import EPOCHS, MAX_STEPS, MIN_STEPS, steps_for_file

        n, batch = len(method.data), int(method.p["batch_size"])
        steps = steps_for_file(n, batch)
        return steps, (f"steps: {steps} ({EPOCHS} epochs over the {n} images of {self.cfg.transfer_data} at batch "
                       f"{batch}, within [{MIN_STEPS}, {MAX_STEPS}]; --steps or --budget-minutes sets another)")

    def shard(self, method: Any, rank: int, world: int) -> None:
        """Each rank trains on its own slice of the file, in its own shuffled order."""
        if world > 1:
            method.use_data(method.data.subset(rank_slice(len(method.data), rank, world)))


@register_source
class RealImages(Source):
    """Real labelled training images (`--data`), for a method that distils on them (`kd`)."""

    name, flag, method = "real", "data", "kd"

    def check(self, new: bool = True) -> None:
        super().check(new)
        from dfkd.methods import get_method

        if "data" not in get_method(self.cfg.method).default_params(None):
            raise DfkdError(f"--data {self.cfg.data}: method {self.cfg.method} is data-free; distill on real images "
                            "with --method kd")

    def overrides(self) -> dict[str, Any]:
        return {**super().overrides(), "data": self.cfg.data}

    def shard(self, method: Any, rank: int, world: int) -> None:
        """Each rank reads its own slice of the images (its epochs are permutations of that slice)."""
        if world > 1:
            data = method.synth.data
            method.synth.data = data.subset(rank_slice(len(data), rank, world))


@register_source
class Synthesized(Source):
    """Batches a data-free method synthesizes from the teacher (the default)."""

    name = "synthesized"


def source_for(cfg: Any) -> Source:
    """The data source `cfg` selects: the first whose flag is set, else the default (synthesized)."""
    picked = [cls for cls in _SOURCES if cls.selected_by(cfg)]
    if len(picked) > 1:
        raise DfkdError(f"--{picked[0].flag.replace('_', '-')} and --{picked[1].flag.replace('_', '-')}: a run "
                        "trains on one kind of data; give one of them")
    default = next(cls for cls in _SOURCES if cls.flag is None)
    return (picked[0] if picked else default)(cfg)


def default_method(flags: dict[str, Any]) -> str | None:
    """The method a run on these flags uses when none is named (the selected source's own), or None."""
    picked = [cls for cls in _SOURCES if cls.selected_by(flags)]
    return picked[0].method if picked else None
