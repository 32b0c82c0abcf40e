"""
Sans-I/O peer protocol: the handshake and message framing of one peer session.

:class:`PeerProtocol` turns received frames into messages (checking each against the
state table, reassembling CHUNK frames under a size cap) and messages to send into frames
(splitting what does not fit one frame). It owns no socket, no task and no document: the
session feeds it frames and drains the frames it produces, like websockets'
``Protocol.receive_data`` / ``data_to_send`` (see ``src/websockets/protocol.py``).

State table (h11 ``_state.py`` style): anything a peer sends that is not in
:data:`TRANSITIONS` for the current state is a :class:`~ctxsync.errors.RemoteProtocolError`.

Pure: imports no asyncio, websockets, sqlite3, psutil or structlog.
"""

from __future__ import annotations

from enum import Enum

from ctxsync.codec import (
    Ack,
    Chunk,
    Goodbye,
    Hello,
    Message,
    MessageType,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    decode,
    encode,
    encode_chunked,
    pack_updates,
)
from ctxsync.errors import (
    DecodeError,
    HandshakeRejected,
    InvalidState,
    LocalProtocolError,
    RemoteProtocolError,
    UnsupportedVersion,
)
from ctxsync.types import PROTOCOL_VERSION, DocId, NodeId


class State(Enum):
    """Where a session is in its life."""

    HANDSHAKE = "handshake"
    """Waiting for the peer's Hello."""
    OPEN = "open"
    """Hello exchanged: sync messages flow both ways."""
    CLOSED = "closed"
    """Goodbye received or sent; nothing more is accepted."""


TRANSITIONS: dict[State, dict[MessageType, State]] = {
    State.HANDSHAKE: {MessageType.HELLO: State.OPEN},
    State.OPEN: {
        MessageType.SYNC_STEP1: State.OPEN,
        MessageType.SYNC_STEP2: State.OPEN,
        MessageType.SYNC_UPDATE: State.OPEN,
        MessageType.CHUNK: State.OPEN,
        MessageType.ACK: State.OPEN,
        MessageType.GOODBYE: State.CLOSED,
    },
    State.CLOSED: {},
}
"""``{state: {message type received: next state}}``; everything else is refused."""

_TYPE_OF: dict[type, MessageType] = {
    Hello: MessageType.HELLO,
    SyncStep1: MessageType.SYNC_STEP1,
    SyncStep2: MessageType.SYNC_STEP2,
    SyncUpdate: MessageType.SYNC_UPDATE,
    Chunk: MessageType.CHUNK,
    Goodbye: MessageType.GOODBYE,
    Ack: MessageType.ACK,
}


class PeerProtocol:
    """
    One side of a peer session, without I/O.

    Args:
        node_id: This node's id, sent in Hello.
        name: This node's human name, sent in Hello.
        expected_peer: The node id the TLS handshake authenticated; the peer's Hello must
            claim the same id.
        max_frame_bytes: Largest frame sent, in bytes (the peer's receive limit).
        max_message_bytes: Largest reassembled multi-frame message accepted, in bytes.

    Usage: call :meth:`start`, then send :meth:`frames_to_send`. For every frame
    received call :meth:`receive_frame`, then handle :meth:`events_received` and send
    :meth:`frames_to_send`.
    """

    def __init__(
        self,
        node_id: NodeId,
        name: str,
        *,
        expected_peer: NodeId,
        max_frame_bytes: int,
        max_message_bytes: int,
    ) -> None:
        self.node_id = node_id
        self.name = name
        self.expected_peer = expected_peer
        self.max_frame_bytes = max_frame_bytes
        self.max_message_bytes = max_message_bytes
        self.state = State.HANDSHAKE
        """Receive-side state (see :data:`TRANSITIONS`)."""
        self.peer_name: str | None = None
        """The peer's name from its Hello."""
        self.closing = False
        """True once this side said Goodbye: nothing more may be sent."""
        self._partial = bytearray()
        self._partial_active = False
        self._events: list[Message] = []
        self._out: list[bytes] = []

    # -- sending ---------------------------------------------------------------------

    def start(self) -> None:
        """Queue this side's Hello. After calling this method, send :meth:`frames_to_send`."""
        self._out.append(encode(Hello(PROTOCOL_VERSION, self.node_id, self.name)))

    def _check_can_send(self) -> None:
        if self.closing:
            raise InvalidState("session is closing: cannot send")

    def send_step1(self, doc_id: DocId, state_vector: bytes, lineage: str = "") -> None:
        """Queue sync step 1 (``state_vector`` from ``Doc.get_state()``, the context's ``lineage``) for ``doc_id``."""
        self._check_can_send()
        self._out.append(encode(SyncStep1(doc_id, state_vector, lineage)))

    def send_step2(self, doc_id: DocId, update: bytes) -> None:
        """Queue sync step 2, split into CHUNK frames if it exceeds one frame."""
        self._check_can_send()
        self._out.extend(encode_chunked(SyncStep2(doc_id, update), self.max_frame_bytes))

    def send_updates(self, doc_id: DocId, updates: list[bytes], origin_ms: int = 0) -> int:
        """
        Queue live updates of ``doc_id``, packed into as few frames as fit.

        Returns:
            How many UPDATE messages they took (what the peer's :class:`Ack` counts).
        """
        self._check_can_send()
        messages = 0
        for frames in pack_updates(doc_id, updates, self.max_frame_bytes, origin_ms):
            self._out.extend(frames)
            messages += 1
        return messages

    def send_ack(self, received: int, held_us: int = 0) -> None:
        """Queue an ACK: this side has processed ``received`` STEP2/UPDATE messages, the last ``held_us`` µs ago."""
        self._check_can_send()
        self._out.append(encode(Ack(received, held_us)))

    def send_goodbye(self, reason: str) -> None:
        """Queue Goodbye; afterwards nothing more can be sent."""
        if not self.closing:
            self._out.append(encode(Goodbye(reason)))
            self.closing = True

    def frames_to_send(self) -> list[bytes]:
        """Return and forget the frames queued so far, in order. Each is at most ``max_frame_bytes``."""
        out, self._out = self._out, []
        return out

    # -- receiving -------------------------------------------------------------------

    def receive_frame(self, frame: bytes) -> None:
        """
        Take one frame from the peer.

        After calling this method, handle :meth:`events_received`.

        Args:
            frame: One binary websocket message.

        Raises:
            RemoteProtocolError: The frame is malformed or not allowed now (including
                :class:`DecodeError`, :class:`UnsupportedVersion`). Close the session.
            HandshakeRejected: The peer's Hello claims another node id than its certificate.
        """
        try:
            msg = decode(frame)
            self._receive(msg)
        except LocalProtocolError as exc:  # h11: an error on peer input is the peer's
            raise RemoteProtocolError(str(exc)) from exc

    def _receive(self, msg: Message) -> None:
        kind = _TYPE_OF[type(msg)]
        allowed = TRANSITIONS[self.state]
        if kind not in allowed:
            raise RemoteProtocolError(f"{kind.name} not allowed in state {self.state.value}")
        if self._partial_active and kind != MessageType.CHUNK:
            raise RemoteProtocolError(f"{kind.name} in the middle of a chunked message")
        if isinstance(msg, Hello):
            if msg.protocol_version != PROTOCOL_VERSION:
                raise UnsupportedVersion(msg.protocol_version)
            if msg.node_id != self.expected_peer:
                raise HandshakeRejected(
                    f"Hello claims node id {msg.node_id!r} but the certificate is "
                    f"{self.expected_peer}",
                    peer_id=self.expected_peer,
                )
            self.peer_name = msg.name
        self.state = allowed[kind]
        if isinstance(msg, Chunk):
            self._receive_chunk(msg)
        else:
            self._events.append(msg)

    def _receive_chunk(self, chunk: Chunk) -> None:
        if len(self._partial) + len(chunk.data) > self.max_message_bytes:
            raise RemoteProtocolError(
                f"chunked message exceeds max_message_bytes ({self.max_message_bytes})"
            )
        self._partial += chunk.data
        self._partial_active = True
        if not chunk.final:
            return
        whole = bytes(self._partial)
        self._partial = bytearray()
        self._partial_active = False
        inner = decode(whole)
        if not isinstance(inner, (SyncStep2, SyncUpdate)):
            raise DecodeError(f"a chunked message must be STEP2 or UPDATE, not {type(inner).__name__}")
        self._events.append(inner)

    def events_received(self) -> list[Message]:
        """Return and forget the complete messages received so far (never a Chunk)."""
        events, self._events = self._events, []
        return events
