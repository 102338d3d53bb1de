"""The objective registry: `@register_objective("rkd")`, `get_objective(name)`, `list_objectives()`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from dfkd._registry import Registry

if TYPE_CHECKING:
    from dfkd.objectives.base import Objective

OBJECTIVES: Registry[type[Objective]] = Registry("objective")


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Register an Objective subclass under `name` (its `name` attribute is set to match)."""

    def deco(cls: type[Objective]) -> type[Objective]:
        cls.name = name
        return OBJECTIVES.register(name)(cls)

    return deco


def get_objective(name: str) -> type[Objective]:
    """The Objective class registered as `name`; a DfkdError lists the known ones."""
    return OBJECTIVES.get(name)


def list_objectives() -> list[str]:
    """Names of every registered objective."""
    return OBJECTIVES.names()
