"""Feature taps: forward hooks keyed by module path, held by a context manager that removes them."""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType

import torch
from torch import nn


def is_batchnorm(module: nn.Module) -> bool:
    """True for BatchNorm layers, including the unflattened modules of a `torch.export` archive."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    buffers = dict(module.named_buffers(recurse=False))
    return "running_mean" in buffers and "running_var" in buffers


def batchnorm_paths(model: nn.Module) -> list[str]:
    """Module paths of every BatchNorm layer with running statistics, in forward-definition order."""
    return [name for name, m in model.named_modules() if name and is_batchnorm(m)
            and getattr(m, "running_mean", None) is not None]


class FeatureTaps:
    """Record the inputs and/or outputs of modules addressed by path during forward passes.

    Use as a context manager; hooks are removed on exit. Set `active = False` to skip recording (for forwards
    whose features nobody reads). Records are replaced by every forward (the latest one wins).

    Args:
        model: the module tree to tap.
        paths: module paths as in `model.named_modules()`.
        inputs: record each module's first positional input, in `self.inputs[path]`.
        outputs: record each module's output, in `self.outputs[path]`.

    Example:
        >>> with FeatureTaps(teacher, batchnorm_paths(teacher)) as taps:
        ...     teacher(x)
        ...     bn_input = taps.inputs["stage1.1"]
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], inputs: bool = True, outputs: bool = False) -> None:
        modules = dict(model.named_modules())
        self.paths = list(paths)
        missing = [p for p in self.paths if p not in modules]
        if missing:
            raise KeyError(f"no module at path(s) {missing}")
        self.modules = {p: modules[p] for p in self.paths}
        self.want_inputs, self.want_outputs = inputs, outputs
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.active = True
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, path: str):  # noqa: ANN202
        def fn(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not self.active:
                return
            if self.want_inputs and args:
                self.inputs[path] = args[0]
            if self.want_outputs:
                self.outputs[path] = output

        return fn

    def __enter__(self) -> FeatureTaps:
        self._handles = [m.register_forward_hook(self._hook(p)) for p, m in self.modules.items()]
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the hooks and drop the records."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        """Drop the records (they hold activations and their graphs)."""
        self.inputs.clear()
        self.outputs.clear()
