"""Lazy public names for a package: ``import napari_bcd`` (or ``.model``, ``.review``) stays cheap.

napari reads the plugin manifest at start-up and the CLI starts for a card's
JSON; neither should import torch, Qt or napari before a name that needs
them is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_names"]


def lazy_names(package: str, names: dict[str, str], namespace: dict[str, Any]
               ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``names`` maps each public name to the submodule defining it.

    A name is imported on first use and then kept in ``namespace`` (the package's globals).
    """
    public = sorted(names)

    def __getattr__(name: str) -> Any:
        if name in names:
            target = names[name]  # ".sub" of this package, or "..sub" of its parent
            value = getattr(importlib.import_module(target if target.startswith(".") else f".{target}", package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return list(namespace.get("__all__", public))

    return __getattr__, __dir__
