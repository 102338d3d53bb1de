"""The model zoo: `create(name, ...)`, `list_models()`, `register_model(name)`."""

from dfkd.models import lenet, mobilenet, resnet, vgg, wrn  # noqa: F401  (registers the models)
from dfkd.models._base import MODELS, ZooModel, create, list_models, register_model

__all__ = ["MODELS", "ZooModel", "create", "list_models", "register_model"]
