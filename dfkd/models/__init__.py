"""The model zoo: `create(name, ...)`, `list_models()`, `register_model(name)`."""

from dfkd.models import lenet, mobilenet, resnet, vgg, wrn  # noqa: F401  (registers the models)
from dfkd.models._base import MODELS, MaxPool2, ZooModel, create, list_models, register_model, use_fast_pools

__all__ = ["MODELS", "MaxPool2", "ZooModel", "create", "list_models", "register_model", "use_fast_pools"]
