"""
ctxsync.errors defines this hierarchy:

* CtxSyncError
    * ConfigError                 fatal at startup; names file and key
    * ProtocolError               abstract (h11)
        * LocalProtocolError      we tried to send something invalid: a bug
        * RemoteProtocolError     peer sent something invalid: close the session
            * DecodeError         truncated / malformed frame
            * UnsupportedVersion  peer speaks another protocol version
    * CryptoError                 bad key, certificate or peer card; never carries key material
    * PeerError                   .peer_id
        * PeerUnreachable         dial failed: retry with backoff
        * PeerDisconnected        connection dropped: retry
        * HandshakeRejected       unknown node or wrong identity: do not retry
    * StoreError                  SQLite failed or the store is unusable
        * SchemaVersionError      store written by a newer ctxsync
        * StoreCorrupt            the store cannot be read; it is kept untouched
    * EntryError                  a bad context name, key or value (also ValueError)
    * NotFound                    no such context or entry (also KeyError)
    * ApiError                    the local API refused a request (.code)
    * InvalidState                API misuse, e.g. send on a closed session (also RuntimeError)

Leaf module: imports nothing from ctxsync.
"""

from __future__ import annotations


class CtxSyncError(Exception):
    """Base class of every error ctxsync raises on purpose."""


class ConfigError(CtxSyncError):
    """A configuration file or value is invalid.

    Attributes:
        path: The file, when known.
        key: The offending key (dotted), when known.
    """

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        where = ""
        if path:
            where += f"{path}: "
        if key:
            where += f"{key}: "
        super().__init__(f"{where}{message}")
        self.path = path
        self.key = key


class ProtocolError(CtxSyncError):
    """Abstract: the peer protocol was violated (see the two subclasses)."""


class LocalProtocolError(ProtocolError):
    """We tried to send something invalid. This is a bug in ctxsync."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid; the session must be closed."""


class DecodeError(RemoteProtocolError):
    """A frame is truncated or malformed."""


class UnsupportedVersion(RemoteProtocolError):
    """The peer speaks a protocol version this node does not."""

    def __init__(self, version: int) -> None:
        super().__init__(f"unsupported protocol version {version}")
        self.version = version


class CryptoError(CtxSyncError):
    """A key, certificate, peer card or sealed value is invalid. Never carries secrets."""


class PeerError(CtxSyncError):
    """Something went wrong with one peer.

    Attributes:
        peer_id: The peer's node id, when known.
    """

    def __init__(self, message: str, *, peer_id: str | None = None) -> None:
        super().__init__(message)
        self.peer_id = peer_id


class PeerUnreachable(PeerError):
    """Dialing the peer failed (refused, timed out, TLS failed). Retry with backoff."""


class PeerDisconnected(PeerError):
    """An open connection to the peer dropped. Retry."""


class HandshakeRejected(PeerError):
    """The peer is not who it must be (unknown node, id mismatch). Do not retry."""


class StoreError(CtxSyncError):
    """SQLite failed, or the store cannot be used."""


class SchemaVersionError(StoreError):
    """The store's schema version is newer than this ctxsync knows."""


class StoreCorrupt(StoreError):
    """The store cannot be read. It is kept as it is; nothing is deleted or overwritten."""


class ContextLoadFailed(StoreError):
    """A context unloaded from memory could not be read back from the store; it stays unloaded."""


class EntryError(CtxSyncError, ValueError):
    """A context name, key or value is invalid (empty, too long, not JSON, too large)."""


class UpdateNotReady(EntryError):
    """A local Yjs client's update builds on structs this node lacks: ask the client by sync step 1."""


class ContextRebuilding(EntryError):
    """The context is being rebuilt from the store after a failed apply; retry in a moment."""


class NotFound(CtxSyncError, KeyError):
    """No such context or entry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "not found"


class ApiError(CtxSyncError):
    """The local API refused a request.

    Attributes:
        code: Machine-readable reason, e.g. ``"not_found"``, ``"bad_request"``, ``"unauthorized"``.
    """

    def __init__(self, message: str, *, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


class InvalidState(CtxSyncError, RuntimeError):
    """The API was misused, e.g. sending on a closed session."""
