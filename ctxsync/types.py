"""
Small value types shared by every layer: ids as ``NewType`` and protocol constants.

This module is a leaf: it imports nothing from ctxsync.
"""

from __future__ import annotations

from typing import Literal, NewType, TypeAlias

NodeId = NewType("NodeId", str)
"""A node's id: base32 of the SHA-256 of its certificate's DER, in dashed groups (see
:func:`ctxsync.crypto.node_id_from_cert`). Not the Yjs ``client_id``."""

DocId = NewType("DocId", str)
"""A context's name, which is also its Yjs document guid."""

SessionId = NewType("SessionId", str)
"""Opaque id of one live connection to one peer, for logs."""

Origin: TypeAlias = NodeId | Literal["local"]
"""Who made a change: a peer's node id, or ``"local"`` for this node's own writes."""

PROTOCOL_VERSION = 2
"""Version of the peer wire protocol (docs/protocol.md). Sent in ``Hello``."""

ENTRIES_ROOT = "entries"
"""Name of the root ``Y.Map`` that holds a context's entries."""

TLS_SERVER_NAME = "ctxsync"
"""Fixed SNI sent by every dialer; hostnames are not checked, certificates are pinned."""

MAX_DOC_ID_CHARS = 128
"""Longest context name, in characters."""

_DOC_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-:")


def is_valid_doc_id(text: str) -> bool:
    """
    Tell whether ``text`` can name a context.

    A context name is 1 to :data:`MAX_DOC_ID_CHARS` characters of ``A-Z a-z 0-9 . _ - :``,
    not starting with ``.`` (so it is safe in URLs, file names and shells).
    """
    return (
        0 < len(text) <= MAX_DOC_ID_CHARS
        and not text.startswith(".")
        and all(c in _DOC_ID_CHARS for c in text)
    )
