"""The frozen teacher: a user's classifier, always in eval mode, with feature taps keyed by module path."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn

from dfkd.errors import DfkdError
from dfkd.hooks import FeatureTaps, batchnorm_paths
from dfkd.io import sha256_file
from dfkd.loading import LoadedModel, load_user_model
from dfkd.models import ZooModel
from dfkd.spec import InputSpec

HOOKABLE = {"dfkd", "state_dict", "pickle", "export"}

#: Teachers below this many parameters are "LeNet scale": method recipes shrink to what a CPU does in minutes.
SMALL_TEACHER_PARAMS = 200_000


def teacher_size(teacher: nn.Module | None) -> int:
    """Parameter count of a teacher (0 when unknown)."""
    return 0 if teacher is None else sum(p.numel() for p in teacher.parameters())


def is_small_teacher(teacher: nn.Module | None) -> bool:
    """True for a LeNet-scale teacher (fewer than SMALL_TEACHER_PARAMS parameters)."""
    return teacher is not None and teacher_size(teacher) < SMALL_TEACHER_PARAMS


class Teacher(nn.Module):
    """Wraps a user's classifier so that it cannot be trained: eval mode always, no gradient to its weights.

    Gradients still flow to the *input* (generators and inversion need them).

    Args:
        module: the classifier, `forward(x) -> logits`.
        spec: its input spec.
        fmt: the file format it came from ("dfkd", "state_dict", "pickle", "torchscript", "export").
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
        for p in self.module.parameters():  # per tensor: ScriptModules refuse `requires_grad_`
            p.requires_grad_(False)
        self.train(False)
        self.num_classes = self._probe_classes()

    def train(self, mode: bool = True) -> Teacher:  # noqa: ARG002 - a teacher never trains
        """Stay in eval mode whatever is asked: BatchNorm must use its running statistics."""
        super().train(False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def _probe_classes(self) -> int:
        device = next((p.device for p in self.module.parameters()), torch.device("cpu"))
        x = torch.zeros(self.spec.shape(2), device=device)
        try:
            with torch.no_grad():
                out = self.module(x)
        except Exception as e:  # noqa: BLE001 - any failure here means the declared shape is wrong
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            hint = "re-export with a dynamic batch dimension" if "equal to" in msg else \
                "check --channels/--input-size or the architecture"
            raise DfkdError(f"--teacher {self.source}: the model does not accept inputs of shape "
                            f"{tuple(x.shape)} ({msg}); {hint}") from None
        if isinstance(out, (tuple, list)):
            raise DfkdError(f"--teacher {self.source}: forward returns a {type(out).__name__}; dfkd needs a module "
                            "whose forward returns the logits tensor alone (wrap it)")
        if out.dim() != 2:
            raise DfkdError(f"--teacher {self.source}: forward returns shape {tuple(out.shape)}, expected "
                            "(batch, classes) logits")
        return int(out.shape[1])

    @property
    def hookable(self) -> bool:
        """True when module hooks work (not TorchScript)."""
        return self.fmt in HOOKABLE

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
        linears = [n for n, m in self.module.named_modules() if isinstance(m, nn.Linear)]
        return linears[-1] if linears else None

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
            raise DfkdError(f"--teacher {self.source}: no Linear layer to read penultimate features from "
                            f"({self.fmt} teacher); use a method that needs only the logits")
        with self.tap([path]) as taps:
            logits = self.module(x)
            return logits, taps.inputs[path].flatten(1)

    def stage_paths(self) -> list[str]:
        """Block outputs (for attention transfer) when the architecture declares them."""
        return list(getattr(self.module, "stages", ())) if self.hookable else []

    def tap(self, paths: Iterable[str], inputs: bool = True, outputs: bool = False) -> FeatureTaps:
        """Feature taps on the wrapped classifier (paths as in `bn_paths()`); use in a `with` block."""
        if not self.hookable:
            raise DfkdError(f"--teacher {self.source}: a {self.fmt} teacher has no module hooks; save it as a "
                            "state_dict, dfkd model file or torch.export archive to use feature-based losses")
        return FeatureTaps(self.module, paths, inputs=inputs, outputs=outputs)


def load_teacher(
    path: str | os.PathLike,
    arch: str | None = None,
    trust_pickle: bool = False,
    spec: InputSpec | None = None,
    device: str | torch.device = "cpu",
    arch_args: dict | None = None,
) -> Teacher:
    """Load a teacher file (any format of DESIGN §4) into a frozen `Teacher` on `device`.

    Args:
        path: the file.
        arch: `--teacher-arch` for plain state_dicts (zoo name, torchvision:NAME, timm:NAME or module:callable).
        trust_pickle: allow a pickled module (runs code from the file).
        spec: input spec from flags; overrides the file's.
        device: where the teacher runs.
        arch_args: constructor arguments for `arch` (`--arch-arg KEY=VALUE`).

    Raises:
        DfkdError: with one readable line, for anything wrong with the file or flags.
    """
    loaded: LoadedModel = load_user_model(path, arch=arch, trust_pickle=trust_pickle, spec=spec, arch_args=arch_args)
    if loaded.spec is None:
        raise DfkdError(f"--teacher {path}: a {loaded.fmt} file carries no input spec; give --channels C "
                        "--input-size S --mean M --std S (the normalisation the teacher was trained with)")
    module = loaded.module.to(device)
    return Teacher(module, loaded.spec, fmt=loaded.fmt, source=str(path), sha256=sha256_file(path),
                   arch=loaded.arch, arch_kwargs=loaded.arch_kwargs, class_names=loaded.class_names)
