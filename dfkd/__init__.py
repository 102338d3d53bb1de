"""dfkd: data-free and adversarial knowledge distillation on PyTorch.

The public API, flat: model zoo, model files, teacher loading, data, evaluation. Names are imported on first use, so
`dfkd --help` and `import dfkd.errors` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dfkd.archs import build_model
    from dfkd.convert import convert
    from dfkd.errors import DfkdError
    from dfkd.modelfile import ModelFile, load_model, save_model
    from dfkd.models import create as create_model
    from dfkd.models import list_models
    from dfkd.spec import InputSpec
    from dfkd.teacher import Teacher, load_teacher
    from dfkd.teacher_options import TeacherOptions, load_with_options

_EXPORTS = {
    "DfkdError": ("dfkd.errors", "DfkdError"),
    "InputSpec": ("dfkd.spec", "InputSpec"),
    "ModelFile": ("dfkd.modelfile", "ModelFile"),
    "Teacher": ("dfkd.teacher", "Teacher"),
    "TeacherOptions": ("dfkd.teacher_options", "TeacherOptions"),
    "build_model": ("dfkd.archs", "build_model"),
    "convert": ("dfkd.convert", "convert"),
    "create_model": ("dfkd.models", "create"),
    "list_models": ("dfkd.models", "list_models"),
    "load_model": ("dfkd.modelfile", "load_model"),
    "load_teacher": ("dfkd.teacher", "load_teacher"),
    "load_with_options": ("dfkd.teacher_options", "load_with_options"),
    "save_model": ("dfkd.modelfile", "save_model"),
}
__all__ = ["DfkdError", "InputSpec", "ModelFile", "Teacher", "TeacherOptions", "build_model", "convert", "create_model",
           "list_models", "load_model", "load_teacher", "load_with_options", "save_model"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dfkd' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
