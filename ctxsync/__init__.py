"""
ctxsync: named key/value contexts kept in sync between machines, peer to peer, as Yjs CRDTs.

``from ctxsync import Client, SyncClient`` gives the local API's clients (docs/client.md).
They are imported on first use (PEP 562), so ``import ctxsync`` stays light for the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ctxsync.client import Client, SyncClient

__version__ = "0.1.0"

__all__ = ["Client", "SyncClient", "__version__"]

_LAZY = {"Client": "ctxsync.client", "SyncClient": "ctxsync.client"}


def __getattr__(name: str) -> Any:
    """Import the clients on first access (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
