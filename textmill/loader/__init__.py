"""Model files on disk -> a ready, frozen torch model: `load_model(path)`.

The package import stays light (no torch) because `textmill.loader.bundled` is read by the
CLI and the HTTP layer; `load_model` and `LoadedModel` are imported from `load` on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from textmill.loader.load import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from textmill.loader import load

        return getattr(load, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
