"""
The Yjs endpoint: y-websocket's protocol at ``/yjs/CONTEXT`` on the local API.

Any Yjs application can use its local daemon as a y-websocket server: the JavaScript
``WebsocketProvider`` (y-websocket), pycrdt's ``Provider`` (pycrdt-websocket), or anything else
speaking y-protocols. :mod:`ctxsync.api` checks the API token, the Host header and the absence of
an Origin header, then hands the connection to :func:`serve`. docs/yjs.md is the user's guide.

Wire format (y-protocols ``sync.js`` and ``awareness.js``, as y-websocket frames them): every
binary websocket message is one message, lib0-encoded::

    message     = varuint message_type, body
    0 sync      : varuint sync_type, varuint8array payload
                  sync_type 0 step 1: payload = encoded state vector (``Doc.get_state()``)
                  sync_type 1 step 2: payload = Yjs v1 update answering a step 1
                  sync_type 2 update: payload = Yjs v1 update
    1 awareness : varuint8array awareness_update
    2 auth      : (server to client only; ignored if a client sends it)
    3 query awareness : (no body) "send me the awareness states you know"

    awareness_update = varuint count, count x (varuint client_id, varuint clock, varstring state)

where ``varuint8array`` is a varuint byte length then the bytes, and ``varstring`` a varuint8array
of UTF-8 (``state`` is JSON text; ``null`` means the client is gone).

What :func:`serve` does with one connection:

- On connect it sends sync step 1 (the context's state vector) and the awareness states it knows.
  It answers the client's step 1 with step 2 (``doc.get_update(client_state_vector)``).
- A client's step 2 and updates go through :meth:`ctxsync.mesh.Mesh.apply_client_update` (checked
  like a peer's update, stored, then sent to the peers), never straight into the document. An
  update that builds on changes this node lacks is dropped and the client asked for what is
  missing (sync step 1), as the mesh does with peers.
- Every update that changes the context (CLI writes, peers, other Yjs clients) is sent to the
  client as a sync update, except the client's own. Outgoing messages wait in a bounded queue;
  a client too slow to drain it is closed (1013) and resyncs when it reconnects.
- Awareness updates are applied to the context's awareness table on this daemon (y-protocols
  rules: a higher clock wins) and what changed is sent to every client of the context here,
  the sender included, as y-websocket does (its JS client counts the echo as a sign of life).
  Awareness never reaches the peers or the store. When a client disconnects, the others get its
  states as ``null``; so do they for a state not renewed for :data:`AWARENESS_TIMEOUT_S` (30 s,
  y-protocols' ``outdatedTimeout``).
- Remote bytes are hostile: a malformed message (1003) or a refused update (1008) closes only
  that connection and is logged as ``yjs.refused``; pycrdt panics (``BaseException``) are caught.

pycrdt's own decoding helpers (``pycrdt.Decoder``) are not used on client bytes: they trust
claimed lengths, build unbounded integers from long varuints (quadratic time), and their
``write_var_string`` writes the length in characters instead of UTF-8 bytes. The decoding here
bounds everything before it loops or allocates.

Imports: :mod:`ctxsync.mesh` (the narrow Yjs part of its API) and pure modules; nothing imports
this module but :mod:`ctxsync.api`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

import structlog
from pycrdt import YSyncMessageType, create_awareness_message, create_update_message, write_message
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from ctxsync.errors import ContextRebuilding, DecodeError, EntryError, StoreError, UpdateNotReady
from ctxsync.mesh import Mesh
from ctxsync.types import DocId
from ctxsync.yupdate import InvalidUpdate, decode_state_vector

__all__ = [
    "AwarenessEntry", "AwarenessMessage", "AwarenessStates", "MessageType", "QueryAwareness",
    "SyncMessage", "UnknownMessage", "decode_awareness_update", "decode_message",
    "encode_awareness_update", "serve",
]  # fmt: skip

log = structlog.get_logger("ctxsync.yjs")

EMPTY_UPDATE: Final = b"\x00\x00"
"""The Yjs v1 update that carries nothing (an empty step 2 is one)."""

MAX_QUEUED_BYTES: Final = 64 * 2**20
"""Outgoing bytes queued for one client before it is closed as too slow (one message is always accepted)."""
MAX_QUEUED_MESSAGES: Final = 10_000
"""Outgoing messages queued for one client before it is closed as too slow."""
MAX_AWARENESS_BYTES: Final = 2**20
"""Largest awareness update accepted from a client, in bytes."""
MAX_AWARENESS_CLIENTS: Final = 10_000
"""Most awareness states (Yjs client ids) kept per context on this daemon."""
AWARENESS_TIMEOUT_S: Final = 30.0
"""A state not renewed for this long (seconds) is removed: y-protocols' ``outdatedTimeout``.
Clients renew their own every 15 s, so only one whose client stopped without leaving goes."""
AWARENESS_CHECK_S: Final = 3.0
"""Period of the check for such states, in seconds (y-protocols checks every outdatedTimeout / 10)."""
MAX_VARUINT: Final = 2**53 - 1
"""Largest varuint read (lib0 refuses more: JavaScript integers are exact up to 2**53 - 1)."""

CLOSE_UNSUPPORTED: Final = 1003
"""Close code for a malformed message or a text message."""
CLOSE_REFUSED: Final = 1008
"""Close code for a refused update or awareness update (policy violation)."""
CLOSE_INTERNAL: Final = 1011
"""Close code when the store failed to commit a client's update."""
CLOSE_TRY_AGAIN: Final = 1013
"""Close code for a client too slow to read what is sent to it, or while the store is failing."""
CLOSE_TIMEOUT_S: Final = 10.0
"""Time given to a closing handshake this side starts before the TCP connection is dropped, in seconds."""
_MAX_REASON_BYTES: Final = 120  # a close reason must fit in a control frame (123 bytes)


class MessageType(IntEnum):
    """y-websocket message types (the first varuint of every message)."""

    SYNC = 0
    AWARENESS = 1
    AUTH = 2
    QUERY_AWARENESS = 3


# -- pure: decoding and encoding ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SyncMessage:
    """A sync message (y-protocols ``sync.js``)."""

    sync_type: YSyncMessageType
    payload: bytes
    """A state vector for step 1, a Yjs v1 update for step 2 and update. Not yet validated."""


@dataclass(frozen=True, slots=True)
class AwarenessEntry:
    """One client's awareness state in an awareness update."""

    client_id: int
    """The Yjs client id of the state's owner (not a node id)."""
    clock: int
    """Increases with every change of the state; the higher clock wins."""
    state: bytes
    """The state as UTF-8 JSON text, checked to parse; ``b"null"`` means the client is gone."""


@dataclass(frozen=True, slots=True)
class AwarenessMessage:
    """An awareness message (y-protocols ``awareness.js``)."""

    entries: tuple[AwarenessEntry, ...]


@dataclass(frozen=True, slots=True)
class QueryAwareness:
    """A query-awareness message: the sender wants the awareness states we know."""


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    """A message of a type this server does not handle (``auth`` or an application's own)."""

    message_type: int


YjsMessage = SyncMessage | AwarenessMessage | QueryAwareness | UnknownMessage


class _Reader:
    """A bounded lib0 reader: every claimed length is checked against the bytes left."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def varuint(self, what: str) -> int:
        start, value, shift = self.pos, 0, 0
        while True:
            if self.pos >= len(self.data):
                raise DecodeError(f"truncated varuint ({what}) at byte {start}")
            b = self.data[self.pos]
            self.pos += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
            if shift > 56:
                raise DecodeError(f"varuint ({what}) longer than 8 bytes at byte {start}")
        if value > MAX_VARUINT:
            raise DecodeError(f"varuint ({what}) over 2**53 - 1 at byte {start}")
        return value

    def varbytes(self, what: str) -> bytes:
        at = self.pos
        n = self.varuint(f"length of {what}")
        if n > len(self.data) - self.pos:
            raise DecodeError(f"{what} at byte {at} claims {n} bytes; {len(self.data) - self.pos} are left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def end(self, what: str) -> None:
        if self.pos != len(self.data):
            raise DecodeError(f"{len(self.data) - self.pos} trailing bytes after the {what}")


def decode_message(message: bytes) -> YjsMessage:
    """
    Decode one y-websocket message received from a client.

    Args:
        message: One binary websocket message (layout in the module docstring).

    Returns:
        The message. Sync payloads are returned as they are: the caller validates state vectors
        and updates (:func:`ctxsync.yupdate.decode_state_vector`, ``Mesh.apply_client_update``).

    Raises:
        DecodeError: The bytes are truncated, a varuint is over 2**53 - 1, a length exceeds the
            bytes left, the sync type is unknown, bytes trail the message, or an awareness
            update is malformed or over :data:`MAX_AWARENESS_BYTES`.

    """
    r = _Reader(bytes(message))
    message_type = r.varuint("message type")
    if message_type == MessageType.SYNC:
        sync_type = r.varuint("sync type")
        if sync_type not in (
            YSyncMessageType.SYNC_STEP1,
            YSyncMessageType.SYNC_STEP2,
            YSyncMessageType.SYNC_UPDATE,
        ):
            raise DecodeError(f"unknown sync message type {sync_type}")
        payload = r.varbytes("sync payload")
        r.end("sync message")
        return SyncMessage(YSyncMessageType(sync_type), payload)
    if message_type == MessageType.AWARENESS:
        update = r.varbytes("awareness update")
        r.end("awareness message")
        return AwarenessMessage(decode_awareness_update(update))
    if message_type == MessageType.QUERY_AWARENESS:
        r.end("query-awareness message")
        return QueryAwareness()
    return UnknownMessage(message_type)


def decode_awareness_update(update: bytes) -> tuple[AwarenessEntry, ...]:
    """
    Decode an awareness update (y-protocols ``encodeAwarenessUpdate``).

    Args:
        update: ``varuint count``, then ``count x (varuint client_id, varuint clock, varstring
            state_json)``.

    Returns:
        Its entries, in order; each state is checked to be UTF-8 JSON text.

    Raises:
        DecodeError: The update is malformed, a state is not JSON, or it is over
            :data:`MAX_AWARENESS_BYTES`.

    """
    if len(update) > MAX_AWARENESS_BYTES:
        raise DecodeError(f"awareness update is {len(update)} bytes; the limit is {MAX_AWARENESS_BYTES}")
    r = _Reader(bytes(update))
    count = r.varuint("awareness count")
    if count * 3 > len(update) - r.pos:  # each entry takes at least 3 bytes
        raise DecodeError(f"awareness count {count} exceeds the {len(update) - r.pos} bytes left")
    entries = []
    for _ in range(count):
        client_id = r.varuint("awareness client id")
        clock = r.varuint("awareness clock")
        state = r.varbytes("awareness state")
        try:
            json.loads(state.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise DecodeError(f"awareness state of client {client_id} is not JSON text: {exc}") from None
        entries.append(AwarenessEntry(client_id, clock, state))
    r.end("awareness update")
    return tuple(entries)


def encode_awareness_update(entries: Iterable[AwarenessEntry]) -> bytes:
    """
    Encode an awareness update (y-protocols ``encodeAwarenessUpdate``).

    Returns:
        The update; wrap it with ``pycrdt.create_awareness_message`` to send it.

    """
    items = list(entries)
    out = bytearray(_varuint(len(items)))
    for e in items:
        out += _varuint(e.client_id) + _varuint(e.clock) + _varuint(len(e.state)) + e.state
    return bytes(out)


def _varuint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    out.append(n)
    return bytes(out)


def _sync_message(sync_type: YSyncMessageType, payload: bytes) -> bytes:
    """A sync message: ``varuint 0, varuint sync_type, varuint8array payload``."""
    return bytes([MessageType.SYNC, sync_type]) + write_message(payload)


class AwarenessStates:
    """
    The awareness states of the Yjs clients of one context on this daemon.

    Applies updates with the rules of y-protocols ``applyAwarenessUpdate``: an entry is taken
    when its clock is higher than the one known, or equal with a ``null`` state for a client
    that has one. Each state is owned by the connection that last set it, so the states of a
    connection can be removed when it goes; a state not renewed for
    :data:`AWARENESS_TIMEOUT_S` is removed by :meth:`expire`, as y-protocols' ``Awareness``
    (which the y-websocket server runs) removes it after its ``outdatedTimeout``.

    Args:
        max_clients: Most states kept; an update that would add more is refused.

    """

    def __init__(self, *, max_clients: int = MAX_AWARENESS_CLIENTS) -> None:
        self.max_clients = max_clients
        self.clocks: dict[int, int] = {}
        """Client id -> the last clock taken (kept after the state goes, until its owner leaves)."""
        self.states: dict[int, bytes] = {}
        """Client id -> its state as JSON text (never ``null``)."""
        self._owners: dict[int, object] = {}
        self._renewed: dict[int, float] = {}
        """Client id -> when its state was last taken (``time.monotonic()`` seconds)."""

    def apply(self, entries: Iterable[AwarenessEntry], owner: object, *, now: float | None = None) -> list[int]:
        """
        Apply an update's entries on behalf of ``owner`` (one connection), at ``now``
        (``time.monotonic()`` seconds; the current time if None).

        Returns:
            Client ids whose entry was taken (added, renewed or removed): send
            :meth:`encode` of them to every client.

        Raises:
            EntryError: Taking the update would keep more than ``max_clients`` states; nothing
                was applied.

        """
        entries = list(entries)
        new_ids = {e.client_id for e in entries if e.client_id not in self.clocks and e.state != b"null"}
        if len(self.clocks) + len(new_ids) > self.max_clients:
            raise EntryError(f"more than {self.max_clients} awareness states in this context")
        changed: list[int] = []
        now = time.monotonic() if now is None else now
        for e in entries:
            known = self.clocks.get(e.client_id)
            current = 0 if known is None else known
            gone = e.state == b"null"
            if not (current < e.clock or (current == e.clock and gone and e.client_id in self.states)):
                continue
            if gone and known is None:
                continue  # nothing known is removed (and a flood of unknown ids costs no memory)
            self.clocks[e.client_id] = e.clock
            self._owners[e.client_id] = owner
            if gone:
                self.states.pop(e.client_id, None)
                self._renewed.pop(e.client_id, None)
            else:
                self.states[e.client_id] = e.state
                self._renewed[e.client_id] = now
            if e.client_id not in changed:
                changed.append(e.client_id)
        return changed

    def encode(self, client_ids: Iterable[int]) -> bytes:
        """Encode the current entries of ``client_ids`` (``null`` for a removed state) as an awareness update."""
        return encode_awareness_update(
            AwarenessEntry(c, self.clocks.get(c, 0), self.states.get(c, b"null")) for c in client_ids
        )

    def encode_all(self) -> bytes | None:
        """Encode every state known as one awareness update; None if there is none."""
        return self.encode(list(self.states)) if self.states else None

    def expire(self, now: float, timeout_s: float = AWARENESS_TIMEOUT_S) -> bytes | None:
        """
        Remove the states not renewed for ``timeout_s`` seconds up to ``now`` (``time.monotonic()``).

        A client keeps its clock, so a late copy of the old state is still ignored and a renewal
        (a higher clock) brings it back, as in y-protocols.

        Returns:
            An awareness update giving the removed states as ``null`` (for every client), or
            None if none was removed.
        """
        old = [c for c in self.states if now - self._renewed.get(c, now) >= timeout_s]
        if not old:
            return None
        for c in old:
            del self.states[c]
            self._renewed.pop(c, None)
        return encode_awareness_update(AwarenessEntry(c, self.clocks[c], b"null") for c in old)

    def remove_owner(self, owner: object) -> bytes | None:
        """
        Forget everything ``owner`` set (its connection closed).

        Returns:
            An awareness update giving its states as ``null`` (for the remaining clients), or
            None if it had no state.

        """
        ids = [c for c, o in self._owners.items() if o is owner]
        gone = [c for c in ids if c in self.states]
        update = (
            encode_awareness_update(AwarenessEntry(c, self.clocks[c], b"null") for c in gone)
            if gone
            else None
        )
        for c in ids:
            self.states.pop(c, None)
            self.clocks.pop(c, None)
            self._owners.pop(c, None)
            self._renewed.pop(c, None)
        return update


# -- I/O: one connection --------------------------------------------------------------


class _Closing(Exception):
    """Raised inside :func:`_receive` to close the connection: ``code``, ``reason`` and whether to log it as refused."""

    def __init__(self, code: int, reason: str, *, refused: bool = True) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.refused = refused


class _Client:
    """One connected Yjs client: its bounded outgoing queue, the task draining it, its sync bookkeeping."""

    def __init__(self, conn: ServerConnection, doc_id: DocId, addr: str) -> None:
        self.conn = conn
        self.doc_id = doc_id
        self.addr = addr
        self.closing: tuple[int, str] | None = None
        """Close code and reason once this side decided to close."""
        self.step1_outstanding = 0
        """Sync step 1 messages sent and not yet answered by a step 2."""
        self.dropped_update = False
        """An update was dropped (missing dependencies) after the outstanding step 1 was sent."""
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued_bytes = 0
        self._ready = asyncio.Event()
        self._sender = asyncio.create_task(self._send_loop(), name=f"yjs-send-{doc_id}")
        self._closer: asyncio.Task[None] | None = None

    def send(self, message: bytes) -> None:
        """Queue ``message`` (one y-websocket message); close the client if its queue is full."""
        if self.closing is not None:
            return
        if self._queue and (
            self._queued_bytes + len(message) > MAX_QUEUED_BYTES or len(self._queue) >= MAX_QUEUED_MESSAGES
        ):
            queued = f"{len(self._queue) + 1} messages, {self._queued_bytes + len(message)} bytes"
            self.close(CLOSE_TRY_AGAIN, f"client too slow: {queued} queued")
            return
        self._queue.append(message)
        self._queued_bytes += len(message)
        self._ready.set()

    def send_step1(self, state_vector: bytes) -> None:
        """Queue a sync step 1 carrying ``state_vector`` (``Doc.get_state()``)."""
        self.step1_outstanding += 1
        self.dropped_update = False
        self.send(_sync_message(YSyncMessageType.SYNC_STEP1, state_vector))

    def on_update(self, update: bytes, tag: object) -> None:
        """Mesh subscription callback: queue a sync update, unless the update came from this client."""
        if tag is not self:
            self.send(create_update_message(update))

    def close(self, code: int, reason: str) -> None:
        """Drop what is queued and start the closing handshake (idempotent; does not wait)."""
        if self.closing is not None:
            return
        self.closing = (code, reason)
        self._queue.clear()
        self._queued_bytes = 0
        self._sender.cancel()  # it may be blocked on a client that does not read
        self._closer = asyncio.create_task(self._close(code, reason), name=f"yjs-close-{self.doc_id}")

    async def _close(self, code: int, reason: str) -> None:
        # websockets' close() waits without a timeout for the send buffer to drain, which a
        # client that does not read never lets happen: bound it, then drop the connection.
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self.conn.close(
                    code, reason.encode("utf-8")[:_MAX_REASON_BYTES].decode("utf-8", "ignore")
                )
        except TimeoutError:
            self.conn.transport.abort()

    async def stop(self) -> None:
        """Stop sending and wait for the closing handshake this side started, if any."""
        self._sender.cancel()
        tasks: list[asyncio.Task[None]] = [self._sender] + (
            [self._closer] if self._closer is not None else []
        )
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _send_loop(self) -> None:
        try:
            while True:
                await self._ready.wait()
                while self._queue:
                    message = self._queue.popleft()
                    self._queued_bytes -= len(message)
                    await self.conn.send(message)
                self._ready.clear()
        except ConnectionClosed:
            return  # the receive side sees it too and ends the connection
        except Exception as exc:  # a bug: never leave a client silently without updates
            log.error(
                "yjs.send_failed", doc_id=self.doc_id, client=self.addr, error=f"{type(exc).__name__}: {exc}"
            )
            self.close(CLOSE_INTERNAL, "internal error while sending")


class _Room:
    """The Yjs clients connected to one context on this daemon, and their awareness states."""

    def __init__(self) -> None:
        self.clients: set[_Client] = set()
        self.awareness = AwarenessStates()
        self.expiry: asyncio.Task[None] | None = None
        """The task removing states not renewed in time, while the room has clients."""

    async def expire_loop(self) -> None:
        """Every :data:`AWARENESS_CHECK_S`, remove the states not renewed for :data:`AWARENESS_TIMEOUT_S` and tell every client."""
        while True:
            await asyncio.sleep(AWARENESS_CHECK_S)
            gone = self.awareness.expire(time.monotonic(), AWARENESS_TIMEOUT_S)
            if gone is not None:
                self.broadcast(create_awareness_message(gone))

    def broadcast(self, message: bytes) -> None:
        for client in list(self.clients):
            client.send(message)


_rooms: weakref.WeakKeyDictionary[Mesh, dict[DocId, _Room]] = weakref.WeakKeyDictionary()
"""The Yjs clients of each context, per mesh (tests may run several meshes in one process)."""


async def serve(mesh: Mesh, conn: ServerConnection, doc_id: DocId) -> None:
    """
    Serve one Yjs client connected to ``/yjs/<doc_id>`` until it disconnects.

    Never raises for what the client sends: a malformed message, a refused update or awareness
    update, a client too slow to read, or a failing store closes this connection only (codes
    1003, 1008, 1013, 1011) and is logged (``yjs.refused``, ``yjs.store_failed``). Logs
    ``yjs.connected`` and ``yjs.disconnected`` (with ``duration_s`` and ``reason``) at INFO.

    Args:
        mesh: Read through ``open_context`` and ``subscribe_updates``; written only through
            ``apply_client_update``.
        conn: The accepted websocket (token, Host and Origin already checked by the API).
        doc_id: The context, created empty if missing.

    """
    started = time.monotonic()
    addr = _format_addr(conn.remote_address)
    try:
        doc = mesh.open_context(doc_id)
    except EntryError as exc:
        log.warning("yjs.refused", doc_id=doc_id, client=addr, reason=str(exc))
        await conn.close(CLOSE_REFUSED, "invalid context name")
        return
    except StoreError as exc:  # unloaded and not readable back (logged as context.load_failed)
        log.error("yjs.store_failed", doc_id=doc_id, client=addr, error=str(exc))
        await conn.close(CLOSE_INTERNAL, "the daemon's store failed; try again later")
        return
    rooms = _rooms.setdefault(mesh, {})
    room = rooms.setdefault(doc_id, _Room())
    if room.expiry is None:
        room.expiry = asyncio.create_task(room.expire_loop(), name=f"yjs-awareness-{doc_id}")
    client = _Client(conn, doc_id, addr)
    room.clients.add(client)
    handle = mesh.subscribe_updates(doc_id, client.on_update)
    log.info("yjs.connected", doc_id=doc_id, client=addr)
    reason = "closed"
    try:
        client.send_step1(doc.get_state())
        states = room.awareness.encode_all()
        if states is not None:
            client.send(create_awareness_message(states))
        reason = await _receive(mesh, client, room)
    except _Closing as exc:
        reason = exc.reason
        if exc.refused:
            log.warning("yjs.refused", doc_id=doc_id, client=addr, reason=exc.reason)
        client.close(exc.code, exc.reason)
    except asyncio.CancelledError:
        reason = "daemon stopping"
        raise
    finally:
        mesh.unsubscribe_updates(doc_id, handle)
        room.clients.discard(client)
        gone = room.awareness.remove_owner(client)
        if gone is not None:
            room.broadcast(create_awareness_message(gone))
        if not room.clients and rooms.get(doc_id) is room:
            del rooms[doc_id]
            if room.expiry is not None:
                room.expiry.cancel()
        await client.stop()
        if client.closing is not None and reason == "closed":
            reason = client.closing[1]  # closed by the sender side (client too slow)
        log.info(
            "yjs.disconnected",
            doc_id=doc_id,
            client=addr,
            duration_s=round(time.monotonic() - started, 3),
            reason=reason,
        )


async def _receive(mesh: Mesh, client: _Client, room: _Room) -> str:
    """
    Handle the client's messages in order until the connection ends.

    Returns:
        Why it ended, for the log.

    Raises:
        _Closing: This side must close the connection (malformed or refused input, failing store).

    """
    conn, doc_id = client.conn, client.doc_id
    try:
        async for message in conn:
            if isinstance(message, str):
                raise _Closing(CLOSE_UNSUPPORTED, "text message: the y-websocket protocol is binary")
            try:
                msg = decode_message(message)
            except DecodeError as exc:
                raise _Closing(CLOSE_UNSUPPORTED, f"malformed message: {exc}") from None
            if isinstance(msg, SyncMessage):
                await _on_sync(mesh, client, msg)
            elif isinstance(msg, AwarenessMessage):
                try:
                    changed = room.awareness.apply(msg.entries, client)
                except EntryError as exc:
                    raise _Closing(CLOSE_REFUSED, f"awareness refused: {exc}") from None
                if changed:
                    room.broadcast(create_awareness_message(room.awareness.encode(changed)))
            elif isinstance(msg, QueryAwareness):
                states = room.awareness.encode_all()
                if states is not None:
                    client.send(create_awareness_message(states))
            else:
                log.debug(
                    "yjs.message_ignored", doc_id=doc_id, client=client.addr, message_type=msg.message_type
                )
            if client.closing is not None:
                break  # closed as too slow while handling the message
    except ConnectionClosed as exc:
        return client.closing[1] if client.closing is not None else _close_reason(exc)
    if client.closing is not None:
        return client.closing[1]
    return _close_reason(None, conn)


async def _on_sync(mesh: Mesh, client: _Client, msg: SyncMessage) -> None:
    """Answer a step 1; hand a step 2 or an update to the mesh. Raises _Closing to close."""
    doc_id = client.doc_id
    if msg.sync_type == YSyncMessageType.SYNC_STEP1:
        try:
            decode_state_vector(msg.payload)
        except InvalidUpdate as exc:
            raise _Closing(CLOSE_UNSUPPORTED, f"malformed state vector: {exc}") from None
        doc = mesh.open_context(doc_id)  # again: a rebuild may have replaced the document
        try:
            answer = doc.get_update(msg.payload)
        except BaseException as exc:
            _reraise_fatal(exc)
            raise _Closing(CLOSE_UNSUPPORTED, f"state vector refused: {type(exc).__name__}: {exc}") from None
        client.send(_sync_message(YSyncMessageType.SYNC_STEP2, answer))
        return
    is_step2 = msg.sync_type == YSyncMessageType.SYNC_STEP2
    if is_step2 and client.step1_outstanding:
        client.step1_outstanding -= 1
        if client.step1_outstanding == 0 and client.dropped_update:
            # An update was dropped after the step 1 this answers was sent: ask again, so the
            # answer is computed after the client made that update.
            client.send_step1(mesh.open_context(doc_id).get_state())
    if msg.payload == EMPTY_UPDATE:
        return
    try:
        await mesh.apply_client_update(doc_id, msg.payload, tag=client)
    except UpdateNotReady:
        log.debug("yjs.missing_dependencies", doc_id=doc_id, client=client.addr, step2=is_step2)
        if is_step2:
            return  # never answer a step 2 with a step 1: a client holding pending structs would loop
        if client.step1_outstanding:
            client.dropped_update = True  # asked again when the outstanding step 1 is answered
        else:
            client.send_step1(mesh.open_context(doc_id).get_state())
    except ContextRebuilding as exc:
        raise _Closing(CLOSE_TRY_AGAIN, str(exc), refused=False) from None
    except EntryError as exc:
        raise _Closing(CLOSE_REFUSED, str(exc)) from None
    except StoreError as exc:
        if mesh.store_failing is not None and "is failing" in str(exc):
            raise _Closing(CLOSE_TRY_AGAIN, "the daemon's store is failing; try again later", refused=False) from None
        log.error("yjs.store_failed", doc_id=doc_id, client=client.addr, error=str(exc))
        raise _Closing(CLOSE_INTERNAL, "the daemon's store failed; try again later", refused=False) from None


def _close_reason(exc: ConnectionClosed | None, conn: ServerConnection | None = None) -> str:
    """Describe how the websocket closed: who sent the first close frame, its code and reason, or a lost connection."""
    if exc is not None:
        rcvd, sent, rcvd_first = exc.rcvd, exc.sent, exc.rcvd_then_sent
    elif conn is not None:
        rcvd, sent, rcvd_first = (
            conn.protocol.close_rcvd,
            conn.protocol.close_sent,
            conn.protocol.close_rcvd_then_sent,
        )
    else:
        return "connection lost"
    if rcvd is not None and (sent is None or rcvd_first):
        return f"closed by client ({rcvd.code}{' ' + rcvd.reason if rcvd.reason else ''})"
    if sent is not None:
        return f"closed by daemon ({sent.code}{' ' + sent.reason if sent.reason else ''})"
    return "connection lost"


def _format_addr(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


def _reraise_fatal(exc: BaseException) -> None:
    """Re-raise what must never be swallowed; pycrdt panics (BaseException) are not among them."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit, asyncio.CancelledError, GeneratorExit)):
        raise exc
