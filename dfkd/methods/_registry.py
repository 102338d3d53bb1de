"""The method registry: `@register_method("dfad")`, `get_method(name)`, `list_methods()`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from dfkd._registry import Registry

if TYPE_CHECKING:
    from dfkd.methods.base import Method

METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Register a Method subclass under `name` (its `name` attribute is set to match)."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        return METHODS.register(name)(cls)

    return deco


def get_method(name: str) -> type[Method]:
    """The Method class registered as `name`; a DfkdError lists the known ones."""
    return METHODS.get(name)


def list_methods() -> list[str]:
    """Names of every registered method."""
    return METHODS.names()
