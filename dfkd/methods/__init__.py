"""Distillation methods: one file each, registered by name with `@register_method`.

Every public module in this package is imported here, so a new method is one new file.
"""

import importlib
import pkgutil

from dfkd.methods._registry import METHODS, get_method, list_methods, register_method
from dfkd.methods.base import Method

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "Method", "get_method", "list_methods", "register_method"]
