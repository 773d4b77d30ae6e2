"""The engine core: one llama.cpp context serving many sequences, with prefix reuse and tiered
sessions. Usable without Ray and without HTTP: nothing here imports `ray`, `fastapi` or the
layers above (`kv3d.server`, `kv3d.bench`, `kv3d.cli`).

Importing a leaf module (`kv3d.engine.codec`, `kv3d.engine.statefmt`) loads no native library;
`Engine` and `EngineSettings` are loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kv3d.engine.engine import Engine, EngineSettings

__all__ = ["Engine", "EngineSettings"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kv3d.engine import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
