"""dfkd: data-free and adversarial knowledge distillation on PyTorch.

The public API, flat: model zoo, model files, teacher loading, data, evaluation.
"""

from dfkd.errors import DfkdError
from dfkd.modelfile import ModelFile, load_model, save_model
from dfkd.models import create as create_model
from dfkd.models import list_models
from dfkd.spec import InputSpec
from dfkd.teacher import Teacher, load_teacher

__all__ = [
    "DfkdError",
    "InputSpec",
    "ModelFile",
    "Teacher",
    "create_model",
    "list_models",
    "load_model",
    "load_teacher",
    "save_model",
]
__version__ = "0.1.0"
