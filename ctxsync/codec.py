"""
Wire messages between peers, as frozen dataclasses, and their encoding to frames.

A frame is one binary websocket message. Every frame starts with a message type (a
lib0 ``varuint``, as in y-protocols); the fields follow, each a ``varuint``, a
``varbytes`` (``varuint`` length + bytes) or a ``varstring`` (UTF-8 ``varbytes``):

=========  ===============================================================
type       fields
=========  ===============================================================
0 HELLO    varuint protocol_version, varstring node_id, varstring name
1 STEP1    varstring doc_id, varbytes state_vector, varstring lineage (protocol 2)
2 STEP2    varstring doc_id, varbytes update
3 UPDATE   varstring doc_id, varuint count, count x varbytes update,
           varuint origin_ms (protocol 2)
4 CHUNK    varuint final (0/1), varbytes part of one encoded STEP2/UPDATE frame
5 GOODBYE  varstring reason
6 ACK      varuint received, varuint held_us (protocol 2)
=========  ===============================================================

``origin_ms`` is when the oldest update of the frame was committed on the node that made it
(Unix time, milliseconds; 0 when unknown): the receiver's replication lag. ``received`` counts
the STEP2 and UPDATE messages (after CHUNK reassembly) the sender of the ACK has processed on
this connection: the receiver of the ACK learns what its peer has applied (acknowledgement lag,
updates and bytes behind) without synchronised clocks. ACKs are coalesced, so ``held_us`` says
how long after processing the last of those messages the ACK was sent (microseconds), to be
taken off the measured lag.

``state_vector`` and ``update`` are Yjs v1 encodings, exactly as pycrdt's
``Doc.get_state()`` and ``Doc.get_update()`` produce them (the same bytes y-protocols
carries in its sync step 1 / 2 / update messages). A message larger than one frame
travels as consecutive CHUNK frames (see :func:`encode_chunked`). docs/protocol.md
describes the whole exchange.

Pure: no I/O, no asyncio. Every malformed input raises :class:`~ctxsync.errors.DecodeError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeAlias

from ctxsync.errors import DecodeError, LocalProtocolError
from ctxsync.types import DocId, is_valid_doc_id


MAX_LINEAGE_CHARS = 64
"""Longest lineage id in a STEP1 frame, in characters."""


class MessageType(IntEnum):
    """First ``varuint`` of every frame."""

    HELLO = 0
    SYNC_STEP1 = 1
    SYNC_STEP2 = 2
    SYNC_UPDATE = 3
    CHUNK = 4
    GOODBYE = 5
    ACK = 6


@dataclass(frozen=True, slots=True)
class Hello:
    """First message each side sends: who it is and which protocol it speaks."""

    protocol_version: int
    node_id: str
    name: str


@dataclass(frozen=True, slots=True)
class SyncStep1:
    """Sync step 1: "this is what I have" for one context."""

    doc_id: DocId
    state_vector: bytes
    """Encoded Yjs state vector (``Doc.get_state()``)."""
    lineage: str = ""
    """The sender's lineage id of the context (at most :data:`MAX_LINEAGE_CHARS`); empty when
    the sender does not have the context (it asks for it)."""


@dataclass(frozen=True, slots=True)
class SyncStep2:
    """Sync step 2: the update the receiver's state vector was missing."""

    doc_id: DocId
    update: bytes
    """Yjs v1 update (``Doc.get_update(state_vector)``)."""


@dataclass(frozen=True, slots=True)
class SyncUpdate:
    """Live updates of one context, in the order they were applied on the sender."""

    doc_id: DocId
    updates: tuple[bytes, ...]
    """Yjs v1 updates; the receiver applies them in one transaction."""
    origin_ms: int = 0
    """When the oldest of them was committed on the node that made it, Unix ms; 0 if unknown."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """One slice of an encoded STEP2 or UPDATE frame too large for one frame."""

    final: bool
    data: bytes


@dataclass(frozen=True, slots=True)
class Goodbye:
    """The sender is closing the session on purpose (shutdown, peer removed)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Ack:
    """The sender has processed this many STEP2/UPDATE messages of the connection."""

    received: int
    held_us: int = 0
    """Microseconds between processing the last of them and sending this ACK."""


Message: TypeAlias = Hello | SyncStep1 | SyncStep2 | SyncUpdate | Chunk | Goodbye | Ack

MAX_NAME_CHARS = 256
MAX_REASON_CHARS = 1024
MAX_UPDATES_PER_FRAME = 1 << 20


# -- lib0 primitives -------------------------------------------------------------


def _varuint(n: int, out: bytearray) -> None:
    if n < 0:
        raise LocalProtocolError(f"cannot encode negative varuint {n}")
    while n > 0x7F:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    out.append(n)


def _varbytes(b: bytes, out: bytearray) -> None:
    _varuint(len(b), out)
    out += b


def _varstring(s: str, out: bytearray) -> None:
    _varbytes(s.encode("utf-8"), out)


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = memoryview(buf)
        self.pos = 0

    def varuint(self) -> int:
        n = 0
        shift = 0
        while True:
            if self.pos >= len(self.buf):
                raise DecodeError("truncated varuint")
            b = self.buf[self.pos]
            self.pos += 1
            n |= (b & 0x7F) << shift
            if b < 0x80:
                if n >= 1 << 64:
                    raise DecodeError("varuint larger than 64 bits")
                return n
            shift += 7
            if shift > 63:
                raise DecodeError("varuint longer than 64 bits")

    def varbytes(self) -> bytes:
        n = self.varuint()
        # Check the claimed length against what is there before touching memory.
        if n > len(self.buf) - self.pos:
            raise DecodeError(f"length {n} exceeds the {len(self.buf) - self.pos} bytes left")
        b = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return b

    def varstring(self, limit: int) -> str:
        b = self.varbytes()
        try:
            s = b.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("string is not valid UTF-8") from exc
        if len(s) > limit:
            raise DecodeError(f"string longer than {limit} characters")
        return s

    def doc_id(self) -> DocId:
        s = self.varstring(256)
        if not is_valid_doc_id(s):
            raise DecodeError(f"invalid context name {s[:64]!r}")
        return DocId(s)

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise DecodeError(f"{len(self.buf) - self.pos} trailing bytes")


# -- messages --------------------------------------------------------------------


def encode(message: Message) -> bytes:
    """
    Encode one message as one frame.

    Args:
        message: Any :data:`Message`.

    Returns:
        The frame (bytes), which may be larger than the peer's frame limit: callers that
        send STEP2/UPDATE use :func:`encode_chunked`.

    Raises:
        LocalProtocolError: If a field cannot be encoded (a bug in the caller).
    """
    out = bytearray()
    match message:
        case Hello(version, node_id, name):
            _varuint(MessageType.HELLO, out)
            _varuint(version, out)
            _varstring(node_id, out)
            _varstring(name, out)
        case SyncStep1(doc_id, state_vector, lineage):
            _varuint(MessageType.SYNC_STEP1, out)
            _varstring(doc_id, out)
            _varbytes(state_vector, out)
            _varstring(lineage, out)
        case SyncStep2(doc_id, update):
            _varuint(MessageType.SYNC_STEP2, out)
            _varstring(doc_id, out)
            _varbytes(update, out)
        case SyncUpdate(doc_id, updates, origin_ms):
            _varuint(MessageType.SYNC_UPDATE, out)
            _varstring(doc_id, out)
            _varuint(len(updates), out)
            for u in updates:
                _varbytes(u, out)
            _varuint(origin_ms, out)
        case Ack(received, held_us):
            _varuint(MessageType.ACK, out)
            _varuint(received, out)
            _varuint(held_us, out)
        case Chunk(final, data):
            _varuint(MessageType.CHUNK, out)
            _varuint(1 if final else 0, out)
            _varbytes(data, out)
        case Goodbye(reason):
            _varuint(MessageType.GOODBYE, out)
            _varstring(reason[:MAX_REASON_CHARS], out)
        case _:
            raise LocalProtocolError(f"cannot encode {message!r}")
    return bytes(out)


def decode(frame: bytes) -> Message:
    """
    Decode one frame.

    Args:
        frame: One binary websocket message.

    Returns:
        The message. A :class:`Chunk` is returned as is; reassembly is the protocol's job.

    Raises:
        DecodeError: If the frame is empty, truncated, has trailing bytes, an unknown type,
            a length that exceeds the frame, invalid UTF-8 or an invalid context name.
    """
    r = _Reader(frame)
    kind = r.varuint()
    msg: Message
    if kind == MessageType.HELLO:
        msg = Hello(r.varuint(), r.varstring(MAX_NAME_CHARS), r.varstring(MAX_NAME_CHARS))
    elif kind == MessageType.SYNC_STEP1:
        msg = SyncStep1(r.doc_id(), r.varbytes(), r.varstring(MAX_LINEAGE_CHARS))
    elif kind == MessageType.SYNC_STEP2:
        msg = SyncStep2(r.doc_id(), r.varbytes())
    elif kind == MessageType.SYNC_UPDATE:
        doc_id = r.doc_id()
        count = r.varuint()
        # Each update takes at least one byte (its length), so a count larger than the
        # bytes left is a lie: refuse before allocating.
        if count > len(frame) - r.pos or count > MAX_UPDATES_PER_FRAME:
            raise DecodeError(f"update count {count} exceeds the frame")
        msg = SyncUpdate(doc_id, tuple(r.varbytes() for _ in range(count)), r.varuint())
    elif kind == MessageType.ACK:
        msg = Ack(r.varuint(), r.varuint())
    elif kind == MessageType.CHUNK:
        final = r.varuint()
        if final not in (0, 1):
            raise DecodeError("chunk flag must be 0 or 1")
        msg = Chunk(bool(final), r.varbytes())
    elif kind == MessageType.GOODBYE:
        msg = Goodbye(r.varstring(MAX_REASON_CHARS))
    else:
        raise DecodeError(f"unknown message type {kind}")
    r.end()
    return msg


_CHUNK_OVERHEAD = 16  # type + flag + length prefix, generously


def encode_chunked(message: Message, max_frame_bytes: int) -> list[bytes]:
    """
    Encode a message as one frame, or as CHUNK frames when it is larger than a frame.

    Args:
        message: Usually a :class:`SyncStep2` or :class:`SyncUpdate`.
        max_frame_bytes: The peer's frame limit in bytes.

    Returns:
        Frames, each at most ``max_frame_bytes`` long, to send in order and without any
        other frame in between.
    """
    frame = encode(message)
    if len(frame) <= max_frame_bytes:
        return [frame]
    step = max_frame_bytes - _CHUNK_OVERHEAD
    if step <= 0:
        raise LocalProtocolError("max_frame_bytes too small to carry a chunk")
    parts = range(0, len(frame), step)
    last = parts[-1]
    return [encode(Chunk(i == last, frame[i : i + step])) for i in parts]


def pack_updates(
    doc_id: DocId, updates: list[bytes], max_frame_bytes: int, origin_ms: int = 0
) -> Iterator[list[bytes]]:
    """
    Group live updates of one context into as few frames as fit the frame limit.

    Args:
        doc_id: The context.
        updates: Yjs v1 updates in the order they were applied.
        max_frame_bytes: The peer's frame limit in bytes.
        origin_ms: Carried in every message (see :class:`SyncUpdate`).

    Yields:
        The frames of one message each: one frame, or the CHUNK frames of an update too
        large to fit a frame on its own.
    """
    budget = max_frame_bytes - 32 - len(doc_id.encode())
    batch: list[bytes] = []
    size = 0
    for u in updates:
        cost = len(u) + 5
        if batch and size + cost > budget:
            yield [encode(SyncUpdate(doc_id, tuple(batch), origin_ms))]
            batch, size = [], 0
        if cost > budget:
            yield encode_chunked(SyncUpdate(doc_id, (u,), origin_ms), max_frame_bytes)
            continue
        batch.append(u)
        size += cost
    if batch:
        yield [encode(SyncUpdate(doc_id, tuple(batch), origin_ms))]
