"""Package attributes imported on first use (PEP 562): a package whose modules need torch can still be imported, for
its config classes, without loading torch — config validation stays fast (docs/design.md §5)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, homes: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level `__getattr__` and `__dir__` of `package` for the attributes `homes` maps to the submodule
    that defines them (name → submodule, relative to the package)."""

    def __getattr__(name: str) -> Any:
        if name in homes:
            return getattr(importlib.import_module(f"{package}.{homes[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*importlib.import_module(package).__dict__, *homes})

    return __getattr__, __dir__
