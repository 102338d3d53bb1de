"""The frozen teacher: a user's classifier, always in eval mode, with feature taps keyed by module path."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from operator import attrgetter, itemgetter
from typing import Any

import torch
from torch import nn

from dfkd.errors import DfkdError, first_line
from dfkd.hooks import FeatureTaps, batchnorm_paths
from dfkd.io import sha256_file
from dfkd.loading import LoadedModel, load_user_model
from dfkd.models import ZooModel, use_fast_pools
from dfkd.perimage import PerImage
from dfkd.spec import InputSpec

HOOKABLE = {"dfkd", "state_dict", "pickle", "export", "onnx"}
#: Formats whose graph was traced at an example batch, which may have fixed the batch to its size (dfkd.perimage).
EXPORTED = {"onnx", "export", "torchscript"}

#: Teachers below this many parameters are "LeNet scale": method recipes shrink to what a CPU does in minutes.
SMALL_TEACHER_PARAMS = 200_000


def teacher_size(teacher: nn.Module | None) -> int:
    """Parameter count of a teacher, or of any module (0 for None)."""
    return 0 if teacher is None else sum(p.numel() for p in teacher.parameters())


def is_small_teacher(teacher: nn.Module | None) -> bool:
    """True for a LeNet-scale teacher (fewer than SMALL_TEACHER_PARAMS parameters)."""
    return teacher is not None and teacher_size(teacher) < SMALL_TEACHER_PARAMS


#: Inputs past this many pixels (1024 x 1024, 21 times a 224-px image) are said to be costly before the first forward.
LARGE_PIXELS = 1024 * 1024


class Teacher(nn.Module):
    """Wraps a user's classifier so that it cannot be trained: eval mode always, no gradient to its weights.

    Gradients still flow to the *input* (generators and inversion need them).

    Args:
        module: the classifier, `forward(x) -> logits`.
        spec: its input spec.
        fmt: the file format it came from ("dfkd", "state_dict", "pickle", "torchscript", "export", "onnx").
        source: the file path (for messages and provenance).
        sha256: the file's hash (for provenance).
        arch: zoo architecture name, when known.
        arch_kwargs: zoo architecture arguments, when known.

    Shape:
        - Input: (B, C, S, S), normalised as `spec` says.
        - Output: (B, num_classes) logits.
    """

    def __init__(
        self,
        module: nn.Module,
        spec: InputSpec,
        fmt: str = "dfkd",
        source: str = "<memory>",
        sha256: str = "",
        arch: str | None = None,
        arch_kwargs: dict | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.spec, self.fmt, self.source, self.sha256 = spec, fmt, source, sha256
        self.arch, self.arch_kwargs, self.class_names = arch, arch_kwargs, class_names
        #: How the logits are read from the module's output when it returns more than them (None: it is them).
        self._logits_of: Callable[[Any], torch.Tensor] | None = None
        #: What dfkd changed about how it reads the file (each also a warning at load time); a run logs them.
        self.notes: list[str] = []
        #: The test top-1 the file records (a dfkd model file's provenance), else None; set by `load_teacher`.
        self.recorded_top1: float | None = None
        for p in self.module.parameters():  # per tensor: ScriptModules refuse `requires_grad_`
            p.requires_grad_(False)
        if self.hookable:
            use_fast_pools(self.module)  # the same outputs; a frozen teacher's forward is most of a CPU run's time
        self.train(False)
        pixels = spec.hw[0] * spec.hw[1]
        if pixels > LARGE_PIXELS:  # 4000 px: minutes and 7 GB before a word was said
            self.note(f"--teacher {source}: it takes {spec.describe()} inputs, {pixels / 224**2:.0f} "
                      "times the pixels of a 224-px image; its first forwards (batches of 2 and 3, to read its "
                      "classes) and every step cost about that much more compute and memory")
        self.num_classes = self._probe_classes()

    def train(self, mode: bool = True) -> Teacher:  # noqa: ARG002 - a teacher never trains
        """Stay in eval mode whatever is asked: BatchNorm must use its running statistics."""
        super().train(False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from(self.module(x))

    def logits_from(self, out: Any) -> torch.Tensor:
        """The logits in an output of the wrapped module (all of it, or the part `logits_reader` found)."""
        return out if self._logits_of is None else self._logits_of(out)

    @property
    def outputs_logits(self) -> bool:
        """Whether the wrapped module's output is the logits themselves (not a tuple or dict holding them)."""
        return self._logits_of is None

    def _probe_classes(self) -> int:
        """Number of classes, from a forward at batch 2; the teacher must also pass `check_outputs`.

        A module that returns more than its logits (`(logits, features)` or `(features, logits)`, `{"logits":
        ...}`, an object with a `logits` attribute, as many training codebases and Hugging Face models do) is read
        through them, with a warning line saying which part was taken.
        """
        device = next((p.device for p in self.module.parameters()), torch.device("cpu"))
        x = torch.randn(self.spec.shape(3), generator=torch.Generator().manual_seed(0)).to(device)
        if self.fmt in EXPORTED and self._fixed_at_one(x):
            self._run_per_image(x)
        out = self._probe_forward(x[:2])
        head = last_linear(self.module)
        reader = logits_reader(out, head[1].out_features if head else None)
        if reader is not None:
            self._logits_of, part = reader
            out = self._logits_of(out)
            self.note(f"--teacher {self.source}: its forward returns more than (batch, classes) logits; {part}, "
                      f"shape {tuple(out.shape)}, is read as the logits")
        elif isinstance(out, (tuple, list)):
            raise DfkdError(f"--teacher {self.source}: forward returns a {type(out).__name__} without a (batch, "
                            "classes) tensor in it; dfkd needs the logits (wrap the module to return them alone)")
        elif isinstance(out, Mapping):
            shapes = ", ".join(f"{k!r}: {tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}"
                               for k, v in out.items())
            raise DfkdError(f"--teacher {self.source}: forward returns a {type(out).__name__} ({shapes}) without a "
                            "'logits' entry or one (batch, classes) tensor to take for it; wrap the module in a "
                            "class whose forward returns the logits alone (e.g. `return self.net(x)['KEY']`) and "
                            "give that class as --teacher-arch module:Class")
        if not torch.is_tensor(out) or out.dim() != 2:
            shape = f"shape {tuple(out.shape)}" if torch.is_tensor(out) else f"a {type(out).__name__}"
            raise DfkdError(f"--teacher {self.source}: forward returns {shape}, expected (batch, classes) logits")
        out3 = self.logits_from(self._probe_forward(x))
        check_outputs(self.source, out, out3, self._logits_or_none(x[:1]))
        if are_probabilities(out3):
            self._logits_of = LogOf(self._logits_of)
            self.note(f"--teacher {self.source}: it outputs probabilities (each row is non-negative and sums to 1, "
                      "as after a final softmax); dfkd reads their log as the logits, which have the same softmax")
        return int(out.shape[1])

    def _fixed_at_one(self, x: torch.Tensor) -> bool:
        """Whether the module takes one image only: (1, K) logits alone, an error or another shape at 2 or 3."""
        one = self._logits_or_none(x[:1])
        if one is None or one.shape[0] != 1:
            return False
        return any(out is None or out.shape != (len(b), one.shape[1])
                   for b in (x[:2], x) for out in [self._logits_or_none(b)])

    def _run_per_image(self, x: torch.Tensor) -> None:
        """Run a file exported at a fixed batch of 1 on each image of a batch (dfkd.perimage), and say so."""
        with full_fp32():
            self.module = PerImage(self.module, x)
        how = "vectorised with torch.func.vmap" if self.module.vectorised else \
            "in a loop, several times slower than a whole batch"
        self.note(f"--teacher {self.source}: it takes one image at a time (its batch dimension was fixed to 1 when "
                  f"it was exported); dfkd runs it on each image of a batch ({how}), without module hooks (no "
                  "BatchNorm statistics or feature objectives); re-export it with a dynamic batch dimension "
                  "(torch.onnx.export(..., dynamic_shapes=({0: torch.export.Dim('batch')},)) or dynamic_axes; "
                  "torch.export.export(..., dynamic_shapes=...)) for the hooks" +
                  ("" if self.module.vectorised else " and the speed"))

    def note(self, message: str) -> None:
        """Warn of a change in how the file is read, and keep it in `notes` for the run's log."""
        self.notes.append(message)
        warnings.warn(message, stacklevel=3)

    def _fixed_batch(self, x: torch.Tensor) -> int | None:
        """The one batch size a module that failed at batch 2 runs at, among the usual ones; None if none does."""
        for n in (4, 8, 16, 32, 64, 128, 256):
            try:
                with torch.no_grad(), full_fp32():
                    self.module(x[:1].expand(n, *x.shape[1:]))
                return n
            except Exception:  # noqa: BLE001 - not this size either
                continue
        return None

    def _probe_forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            with torch.no_grad(), full_fp32():
                return self.module(x)
        except Exception as e:  # noqa: BLE001 - any failure here means the declared shape is wrong
            msg = first_line(e)
            if len(x) != 2:
                hint = f"it runs at batch 2 but not at batch {len(x)}: re-export it with a dynamic batch dimension"
            elif "equal to" in msg or self._logits_or_none(x[:1]) is not None:
                hint = ("it takes one image at a time (its batch dimension was fixed when it was exported): "
                        "re-export it with a dynamic batch dimension (torch.onnx.export(..., dynamic_shapes=({0: "
                        "torch.export.Dim('batch')},)) or dynamic_axes; torch.export.export(..., dynamic_shapes=...))")
            elif (fixed := self._fixed_batch(x)) is not None:
                hint = (f"it runs on batches of exactly {fixed} (its forward fixes the batch size, as a view({fixed}, "
                        "...) does): make it take any batch (x.flatten(1), or x.view(x.size(0), -1))")
            elif _takes_flat_vectors(self.module, x):
                cls = type(self.module).__name__
                hint = (f"its first layer is a Linear of {x[0].numel()} inputs: it takes flattened vectors, and dfkd "
                        f"gives images ({x.shape[1]} x {x.shape[2]} x {x.shape[3]}); give --teacher-arch a subclass "
                        f"that flattens them, which keeps the weights' names (class Flat({cls}): def forward(self, "
                        "x): return super().forward(x.flatten(1)))")
            else:
                hint = ("check --channels/--input-size (S, or HxW for an input that is not square) or the "
                        "architecture")
            raise DfkdError(f"--teacher {self.source}: the model does not accept inputs of shape "
                            f"{tuple(x.shape)} ({msg}); {hint}") from None

    def _logits_or_none(self, x: torch.Tensor) -> torch.Tensor | None:
        """The logits of `x`; None when the module does not take it or gives no (B, K) rows.

        A forward that squeezes its batch dimension gives (K,) at batch 1; it still runs on batches of two or more.
        """
        try:
            with torch.no_grad(), full_fp32():
                out = self.logits_from(self.module(x))
        except Exception:  # noqa: BLE001 - any failure: it does not
            return None
        return out if torch.is_tensor(out) and out.dim() == 2 else None

    @property
    def hookable(self) -> bool:
        """True when module hooks work (not TorchScript, not a fixed-batch file run per image)."""
        return self.fmt in HOOKABLE and not isinstance(self.module, PerImage)

    @property
    def no_hooks(self) -> str:
        """Why module hooks do not work, for messages ("it is TorchScript"); '' when they do."""
        if isinstance(self.module, PerImage):
            return "it was exported at a fixed batch of 1 and runs one image at a time"
        return "" if self.hookable else f"it is {a_file(self.fmt)}"

    @property
    def hooks_remedy(self) -> str:
        """What gives a teacher without module hooks (`no_hooks`) its hooks back, for messages."""
        if isinstance(self.module, PerImage):
            return "re-export it with a dynamic batch dimension"
        return "save it as a state_dict, dfkd model file or torch.export archive"

    def bn_paths(self) -> list[str]:
        """Module paths (inside `self.module`) of the BatchNorm layers; empty for BN-free or TorchScript teachers."""
        return batchnorm_paths(self.module) if self.hookable else []

    def module_at(self, path: str) -> nn.Module:
        """The submodule at `path` of the wrapped classifier."""
        return dict(self.module.named_modules())[path]

    def penultimate_path(self) -> str | None:
        """Path of the final Linear layer: its input is the penultimate feature vector."""
        if not self.hookable:
            return None
        if isinstance(self.module, ZooModel):
            return "classifier"
        head = last_linear(self.module)
        return head[0] if head else None

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and penultimate features (B, D) in one forward.

        Zoo models give their `forward_features` (for LeNet-5 the 120-d conv3 output DAFL reads); other modules
        give the input of their last Linear layer.
        """
        if isinstance(self.module, ZooModel):
            f = self.module.forward_features(x)
            return self.module.forward_head(f), f
        path = self.penultimate_path()
        if path is None:
            why = f"{self.no_hooks}, without module hooks" if self.no_hooks else "it has no Linear layer"
            raise DfkdError(f"--teacher {self.source}: no penultimate features to read ({why}); use a method that "
                            "needs only the logits")
        with self.tap([path]) as taps:
            logits = self.logits_from(self.module(x))
            return logits, taps.inputs[path].flatten(1)

    def stage_paths(self) -> list[str]:
        """Block outputs (for attention transfer) when the architecture declares them."""
        return list(getattr(self.module, "stages", ())) if self.hookable else []

    def tap(self, paths: Iterable[str], inputs: bool = True, outputs: bool = False) -> FeatureTaps:
        """Feature taps on the wrapped classifier (paths as in `bn_paths()`); use in a `with` block."""
        if not self.hookable:
            raise DfkdError(f"--teacher {self.source} has no module hooks ({self.no_hooks}); {self.hooks_remedy} to "
                            "use feature-based losses")
        return FeatureTaps(self.module, paths, inputs=inputs, outputs=outputs)


@contextmanager
def full_fp32() -> Iterator[None]:
    """IEEE fp32 convolutions and matmuls on a GPU (no TF32) inside the block, the previous settings after it.

    cuDNN convolutions run in TF32 by default on recent GPUs, about 1e-3 relative error a layer, and the algorithm
    (and so the rounding) changes with the batch size: through a deep network the batch-independence check below
    would refuse a sound eval-mode teacher.
    """
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch points these flags to its fp32_precision settings
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def a_file(fmt: str) -> str:
    """"an ONNX file", "a TorchScript file", ...: a file format as messages name it."""
    return {"onnx": "an ONNX", "torchscript": "a TorchScript", "export": "a torch.export", "pickle": "a pickle",
            "state_dict": "a state_dict", "dfkd": "a dfkd model"}.get(fmt, f"a {fmt}") + " file"


def _takes_flat_vectors(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether the module's first weighted layer is a Linear of one whole image's size (an MLP fed flat batches)."""
    first = next((m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    return isinstance(first, nn.Linear) and first.in_features == x[0].numel()


def are_probabilities(out: torch.Tensor) -> bool:
    """True when every row of `out` (B, K) is a probability vector: in [0, 1] and summing to 1 (within 1e-3).

    Logits or log-probabilities (a log_softmax head: already logits, up to a constant per row) are not.
    """
    out = out.detach().float()
    return bool(out.shape[1] > 1 and out.min() >= 0 and out.max() <= 1 and (out.sum(1) - 1).abs().max() < 1e-3)


class LogOf:
    """Reads logits from a module that outputs probabilities: the log of what `read` (None: the output) gives.

    log p = z - logsumexp(z) for a softmax of logits z, so softmax(log p / T) = softmax(z / T) at every
    temperature; probabilities that underflowed to 0 become the log of the smallest normal float.
    """

    def __init__(self, read: Callable[[Any], torch.Tensor] | None) -> None:
        self.read = read

    def __call__(self, out: Any) -> torch.Tensor:
        p = out if self.read is None else self.read(out)
        return p.clamp_min(torch.finfo(p.dtype).tiny).log()


def _flatten_1x1(t: torch.Tensor) -> torch.Tensor:
    """(batch, classes, 1, 1) -> (batch, classes): the logits of a head that ends in a 1x1 convolution."""
    return t.flatten(1)


def logits_reader(out: Any, head: int | None = None) -> tuple[Callable[[Any], torch.Tensor], str] | None:
    """How to read (batch, classes) logits from a forward that returns more than them, and its name; else None.

    In a tuple or list, its one 2-D tensor; of several, the one as wide as `head` (the output width of the
    module's last Linear layer, its classifier head as a rule) where exactly one is, else the first, so
    `(features, logits)` is read right as well as `(logits, features)`. Else a mapping's `logits` entry or a
    `logits` attribute (Hugging Face's outputs are mappings with one), each only when it is a 2-D tensor; a mapping
    without one gives its one 2-D tensor, or of several the one as wide as `head` where exactly one is.
    """
    def logits_like(t: Any) -> bool:
        return torch.is_tensor(t) and t.dim() == 2

    if torch.is_tensor(out) and out.dim() == 4 and tuple(out.shape[2:]) == (1, 1):  # a fully convolutional head
        return _flatten_1x1, "its (batch, classes, 1, 1) output, flattened"

    def candidates(entries: Iterable[tuple[Any, Any]]) -> tuple[list[Any], Any]:
        """The keys of the 2-D entries, and the one key as wide as `head` (None unless exactly one is)."""
        found = [(k, t) for k, t in entries if logits_like(t)]
        wide = [k for k, t in found if t.shape[1] == head]
        return [k for k, _ in found], wide[0] if len(wide) == 1 else None

    if isinstance(out, (tuple, list)):
        found, wide = candidates(enumerate(out))
        if not found:
            return None
        i = found[0] if wide is None else wide
        return itemgetter(i), f"element {i} of the {type(out).__name__} (counting from 0)"
    if isinstance(out, Mapping):
        if logits_like(out.get("logits")):
            return itemgetter("logits"), "its 'logits' entry"
        found, wide = candidates(out.items())
        key = found[0] if len(found) == 1 else wide
        return None if key is None else (itemgetter(key), f"its {key!r} entry")
    if not torch.is_tensor(out) and logits_like(getattr(out, "logits", None)):
        return attrgetter("logits"), "its 'logits' attribute"
    return None


def last_linear(module: nn.Module) -> tuple[str, nn.Linear] | None:
    """Path and layer of the module's last Linear layer (its classifier head as a rule), or None without one."""
    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def check_outputs(source: str, out2: torch.Tensor, out3: torch.Tensor, out1: torch.Tensor | None = None) -> None:
    """Refuse a teacher whose logits are useless: non-finite, fewer than 2 classes, or batch-dependent.

    `out2` and `out3` are its outputs on the same two images alone and with a third, `out1` on the first image
    alone: an eval-mode classifier gives each image the same logits whatever the batch (a fixed-batch export or a
    model left in train mode does not).
    """
    where = f"--teacher {source}"
    if out2.shape[1] < 2:
        raise DfkdError(f"{where}: gives {out2.shape[1]} class(es); a classifier to distill needs at least 2 (a "
                        "binary classifier with one sigmoid output: give it two logits, [0, z])")
    if not torch.isfinite(out2).all():
        raise DfkdError(f"{where}: gives non-finite logits (NaN or inf) on a probe batch; its weights are broken "
                        "(check the file, or the --mean/--std it is given)")
    if out3.dim() != 2 or out3.shape[0] != 3 or out3.shape[1] != out2.shape[1]:
        raise DfkdError(f"{where}: gives shape {tuple(out3.shape)} at batch 3 (expected (3, {out2.shape[1]})); "
                        "re-export it with a dynamic batch dimension")
    if not torch.allclose(out3[:2].float(), out2.float(), rtol=1e-3, atol=1e-4):
        raise DfkdError(f"{where}: gives other logits for the same images at batch 3 than at batch 2; it must "
                        "treat each image alone (eval mode, no batch statistics, a dynamic batch dimension)")
    if out1 is not None and out1.shape == out2[:1].shape and not torch.allclose(out1.float(), out2[:1].float(),
                                                                                rtol=1e-3, atol=1e-4):
        raise DfkdError(f"{where}: gives an image other logits in a batch of 2 than alone; it must treat each image "
                        "alone (eval mode, no batch statistics, a dynamic batch dimension)")


def _warn_spec_override(path: str | os.PathLike, spec: InputSpec | None, loaded: LoadedModel) -> None:
    """Say so when the flags replace the input shape or normalisation a file itself declares (dfkd's files).

    A replaced normalisation went unsaid: the shipped CIFAR-10 WRN-16-1 given --mean 0 --std 1 answered 30.75 % of
    its test set (81.03 % with its own).
    """
    declared = loaded.declared
    if spec is None or declared is None:
        return
    if declared.shape() != spec.shape():
        warnings.warn(f"--teacher {path}: the file declares {declared.describe()} inputs; --channels/--input-size "
                      f"make it {spec.describe()}", stacklevel=3)
    if not _same_numbers(declared.mean, spec.mean) or not _same_numbers(declared.std, spec.std):
        warnings.warn(f"--teacher {path}: the file declares the normalisation {_normalisation(declared)}; "
                      f"--mean/--std make it {_normalisation(spec)}, which the network was not trained with unless "
                      "the file is wrong", stacklevel=3)


def _normalisation(spec: InputSpec) -> str:
    """"mean [0.1307] std [0.3081]": a spec's normalisation as messages print it (4 digits)."""
    def text(values: Sequence[float]) -> str:
        return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"

    return f"mean {text(spec.mean)} std {text(spec.std)}"


def _same_numbers(a: Sequence[float], b: Sequence[float]) -> bool:
    """Equal as people type normalisation values (0.1316 for 0.13157938...): within 1e-3."""
    return len(a) == len(b) and all(abs(x - y) <= 1e-3 for x, y in zip(a, b))


def _own_normalisation(loaded: LoadedModel, spec: InputSpec | None) -> InputSpec | None:
    """The flags' shape with the file's own normalisation, for a file that declares one of as many channels."""
    declared = loaded.declared
    if spec is None or declared is None or declared.channels != spec.channels:
        return None
    return InputSpec(spec.channels, spec.size, tuple(declared.mean), tuple(declared.std), spec.width)


def load_teacher(
    path: str | os.PathLike,
    arch: str | None = None,
    trust_pickle: bool = False,
    spec: InputSpec | None = None,
    device: str | torch.device = "cpu",
    arch_args: dict | None = None,
    own_normalisation: bool = False,
) -> Teacher:
    """Load a teacher file (any format of DESIGN §4) into a frozen `Teacher` on `device`.

    Args:
        path: the file.
        arch: `--teacher-arch` for plain state_dicts (zoo name, torchvision:NAME, timm:NAME or module:callable).
        trust_pickle: allow a pickled module (runs code from the file).
        spec: input spec from flags; overrides the file's.
        device: where the teacher runs.
        arch_args: constructor arguments for `arch` (`--arch-arg KEY=VALUE`).
        own_normalisation: a file that declares its normalisation keeps it, `spec` setting only the shape (an
            ensemble's spec flags are for its members that declare none).

    Raises:
        DfkdError: with one readable line, for anything wrong with the file or flags.
    """
    loaded: LoadedModel = load_user_model(path, arch=arch, trust_pickle=trust_pickle, spec=spec, arch_args=arch_args)
    if loaded.spec is None:
        raise DfkdError(f"--teacher {path}: {a_file(loaded.fmt)} carries no input spec; give --channels C "
                        "--input-size S (or HxW) --mean M --std S (the normalisation the teacher was trained with)")
    kept = _own_normalisation(loaded, spec) if own_normalisation else None
    _warn_spec_override(path, kept or spec, loaded)
    if kept is not None and spec is not None and not (_same_numbers(kept.mean, spec.mean)
                                                      and _same_numbers(kept.std, spec.std)):
        warnings.warn(f"--teacher {path}: keeps the normalisation the file declares ({_normalisation(kept)}); "
                      "--mean/--std are for the teachers of the ensemble that declare none", stacklevel=2)
    module, widened = _in_fp32(loaded.module, path)
    teacher = Teacher(module.to(device), kept or loaded.spec, fmt=loaded.fmt, source=str(path),
                      sha256=sha256_file(path), arch=loaded.arch, arch_kwargs=loaded.arch_kwargs,
                      class_names=loaded.class_names)
    teacher.notes[:0] = loaded.notes + ([widened] if widened else [])
    teacher.recorded_top1 = loaded.top1
    _check_declared_classes(path, loaded, teacher.num_classes)
    return teacher


def _in_fp32(module: nn.Module, path: str | os.PathLike) -> tuple[nn.Module, str]:
    """`module` with its float16/bfloat16 (exactly) or float64 (rounded) weights and buffers made float32.

    So it takes the float32 images every command feeds it; --precision bf16/fp16 still runs it in low precision
    under autocast. A file saved after `model.half()` (a TorchScript, torch.export, ONNX or pickled module; a
    state_dict is loaded into a float32 network anyway) is told so once; the message is returned ("" if none).
    """
    other = (torch.float16, torch.bfloat16, torch.float64)
    low = {t.dtype for t in (*module.parameters(), *module.buffers()) if t.dtype in other}
    if not low:
        return module, ""
    values = "rounded to float32" if torch.float64 in low else "the same values"  # a model.double() one
    message = (f"{path}: its weights are {'/'.join(sorted(str(d).removeprefix('torch.') for d in low))}; dfkd holds "
               f"them in float32 ({values}) and computes as --precision says")
    warnings.warn(message, stacklevel=3)
    return module.float(), message


def _check_declared_classes(path: str | os.PathLike, loaded: LoadedModel, logits: int) -> None:
    """A model file's `num_classes` and `class_names` must agree with the logits its network gives."""
    declared = {"num_classes": loaded.num_classes,
                "class_names": None if loaded.class_names is None else len(loaded.class_names)}
    for field, n in declared.items():
        if n is not None and n != logits:
            raise DfkdError(f"--teacher {path}: the file's {field} says {n} classes but its network gives {logits} "
                            "logits; the file is inconsistent: re-export it")


def warn_unused_arch(arch: str | None, arch_args: dict | None, members: Sequence[Teacher]) -> None:
    """Say so when --teacher-arch/--arch-arg were given but no teacher file is a plain state_dict that uses them.

    A dfkd model file, TorchScript, torch.export or ONNX file brings its own network, so the flags are ignored
    for it; a user who believes they chose the architecture should hear which network runs instead.
    """
    if (arch is None and not arch_args) or any(m.fmt == "state_dict" for m in members):
        return
    flags = [f"--teacher-arch {arch}"] if arch else []
    flags += [f"--arch-arg {k}={v}" for k, v in (arch_args or {}).items()]
    files = "; ".join(f"{m.source} is {a_file(m.fmt)}" + (f" of {m.arch}" if m.fmt == "dfkd" and m.arch else "")
                      for m in members)
    them = "they apply" if len(flags) > 1 else "it applies"
    brings = "which brings its own network" if len(members) == 1 else "each bringing its own network"
    warnings.warn(f"{' '.join(flags)} not used: {files}, {brings}; {them} to plain state_dicts only",
                  stacklevel=3)
