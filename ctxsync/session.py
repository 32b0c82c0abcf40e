"""
One task group per connected peer: frames between a :class:`~ctxsync.transport.Channel`
and a :class:`~ctxsync.protocol.PeerProtocol`.

:class:`PeerSession` is the thin I/O driver around the sans-I/O protocol (websockets'
``asyncio/connection.py`` around ``protocol.py``). It reads frames and hands complete
messages up to a :class:`SessionHandler` (implemented by the mesh); it queues what the
mesh wants sent and writes it from a single writer task, so sends never block the caller.

Batching: updates queued for one context while the writer is busy travel together in the
next frame; the first one goes out at once. Backpressure: when a peer reads slower than
updates arrive and the queue passes ``max_queue_bytes``, the queued updates are dropped and
the context is marked for resync; the writer then sends the peer a single update computed
from the peer's last known state vector instead (the handler computes it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

import structlog

from ctxsync.codec import Ack, Goodbye, Hello, Message, SyncStep2, SyncUpdate
from ctxsync.errors import (
    CtxSyncError,
    HandshakeRejected,
    InvalidState,
    PeerDisconnected,
    RemoteProtocolError,
)
from ctxsync.protocol import PeerProtocol
from ctxsync.transport import Channel
from ctxsync.types import DocId, NodeId, SessionId

log = structlog.get_logger("ctxsync.session")

HELLO_TIMEOUT_S = 10.0
ACK_DELAY_S = 0.02
"""An ACK leaves this long (seconds) after the first message it covers: a burst gets one ACK."""


class SessionHandler(Protocol):
    """What a session calls upward (implemented by :class:`ctxsync.mesh.Mesh`)."""

    def on_session_open(self, session: PeerSession) -> None:
        """Hello exchanged: the session may carry sync messages. Queue sync step 1s here."""

    def on_message(self, session: PeerSession, message: Message) -> None:
        """
        Handle a SyncStep1, SyncStep2 or SyncUpdate from the peer.

        Raises:
            RemoteProtocolError: The content is unacceptable; the session is closed.
        """

    def resync_update(self, session: PeerSession, doc_id: DocId) -> bytes | None:
        """Return the update the peer needs after its queue overflowed, or None to skip."""

    def on_session_closed(self, session: PeerSession, reason: str) -> None:
        """The session ended (any cause). Called once."""


@dataclass(slots=True)
class SessionStats:
    """Counters of one session. Units in the names."""

    sent_bytes: int = 0
    received_bytes: int = 0
    sent_frames: int = 0
    received_frames: int = 0
    sent_updates: int = 0
    received_updates: int = 0
    queue_overflows: int = 0


class PeerSession:
    """
    A live, authenticated connection to one peer.

    Args:
        channel: The connection (its ``peer_id`` is the TLS-verified node id).
        protocol: A fresh :class:`PeerProtocol` for it.
        handler: Receives messages and lifecycle calls.
        max_queue_bytes: Bound of queued, unsent updates, in bytes, before the peer is
            resynced instead (backpressure).
    """

    def __init__(
        self,
        channel: Channel,
        protocol: PeerProtocol,
        handler: SessionHandler,
        *,
        max_queue_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.channel = channel
        self.protocol = protocol
        self.handler = handler
        self.peer_id: NodeId = channel.peer_id
        self.session_id = SessionId(uuid.uuid4().hex[:12])
        self.max_queue_bytes = max_queue_bytes
        self.stats = SessionStats()
        self.opened_at = time.monotonic()
        """``time.monotonic()`` when the connection was made, in seconds."""
        self.is_open = False
        """True between the Hello exchange and the close."""
        self.remote_state_vectors: dict[DocId, bytes] = {}
        self.lineage_reported: dict[DocId, str] = {}
        """Per context, the differing peer lineage already logged (once per session)."""
        """Last state vector the peer sent per context (its sync step 1)."""
        self.synced: dict[DocId, bool] = {}
        """Per context: True once our sync step 1 was answered by the peer's step 2."""
        self.step1_sent_at: dict[DocId, float] = {}
        """Per context: ``time.monotonic()`` when our step 1 was queued."""
        self._outbox: list[tuple[str, DocId | None, list[bytes], int]] = []
        """Queued messages: (kind, doc_id, payload, origin_ms of the oldest update in it)."""
        self._sent_messages = 0
        """STEP2/UPDATE messages sent on this connection (what the peer's ACK counts)."""
        self._unacked: collections.deque[tuple[int, DocId, int, int, float]] = collections.deque()
        """Sent, not yet acknowledged: (message number, doc_id, updates, bytes, monotonic send time)."""
        self._received_messages = 0
        self._processed_at = 0.0
        self._ack_queued = False
        self.ack_lag_ms: dict[DocId, float] = {}
        """Per context, the last acknowledgement lag: our send to the peer's ACK covering it (ms)."""
        self._queued_bytes = 0
        self._resync: set[DocId] = set()
        self._wakeup = asyncio.Event()
        self._closed = asyncio.Event()
        self.close_reason = ""

    # -- queueing (called by the mesh; never blocks) ------------------------------------

    def send_step1(self, doc_id: DocId, state_vector: bytes, lineage: str = "") -> None:
        """Queue sync step 1 for ``doc_id`` (``lineage``: this node's lineage id of it, empty if it has none)."""
        self.step1_sent_at[doc_id] = time.monotonic()
        self.synced[doc_id] = False
        self._queue("step1", doc_id, [state_vector, lineage.encode()], 0)

    def send_step2(self, doc_id: DocId, update: bytes) -> None:
        """Queue sync step 2 (the update the peer's state vector misses)."""
        self._queue("step2", doc_id, [update], 0)

    def send_update(self, doc_id: DocId, update: bytes, origin_ms: int = 0) -> None:
        """
        Queue one live update; consecutive ones of a context share a frame.

        Args:
            origin_ms: When the update was committed on the node that made it (Unix ms; 0 if
                unknown); a frame carries the oldest of its updates'.
        """
        if doc_id in self._resync or self._closed.is_set():
            return  # the resync will carry it / nobody will send it
        if self._queued_bytes + len(update) > self.max_queue_bytes:
            self._overflow(doc_id)
            return
        last = self._outbox[-1] if self._outbox else None
        if last is not None and last[0] == "update" and last[1] == doc_id:
            last[2].append(update)
            if origin_ms and (not last[3] or origin_ms < last[3]):
                self._outbox[-1] = (last[0], last[1], last[2], origin_ms)
            self._queued_bytes += len(update)
            self._wakeup.set()
            return
        self._queue("update", doc_id, [update], origin_ms)

    def request_resync(self, doc_id: DocId) -> None:
        """Queue a sync step 2 of everything the peer's last state vector for ``doc_id`` misses, computed when it is sent (``resync_update``)."""
        if doc_id in self._resync or self._closed.is_set():
            return
        self._resync.add(doc_id)
        self._queue("resync", doc_id, [], 0)

    def behind(self, doc_id: DocId) -> tuple[int, int]:
        """
        How far the peer is behind this side for ``doc_id``: ``(updates, bytes)`` queued or sent
        and not yet acknowledged (a step 2 counts as one update).
        """
        updates = size = 0
        for _, d, n, b, _ in self._unacked:
            if d == doc_id:
                updates, size = updates + n, size + b
        for kind, queued_doc, payload, _ in self._outbox:
            if queued_doc == doc_id and kind in ("update", "step2"):
                updates, size = updates + len(payload), size + sum(len(p) for p in payload)
        return updates, size

    def _queue(self, kind: str, doc_id: DocId | None, payload: list[bytes], origin_ms: int) -> None:
        if self._closed.is_set():
            return
        self._outbox.append((kind, doc_id, payload, origin_ms))
        self._queued_bytes += sum(len(p) for p in payload)
        self._wakeup.set()

    def _overflow(self, doc_id: DocId) -> None:
        self.stats.queue_overflows += 1
        kept = []
        for item in self._outbox:
            if item[0] == "update" and item[1] == doc_id:
                self._queued_bytes -= sum(len(p) for p in item[2])
            else:
                kept.append(item)
        self._outbox = kept
        self.request_resync(doc_id)
        log.warning("peer.queue_overflow", peer_id=self.peer_id, doc_id=doc_id, session_id=self.session_id)

    @property
    def queued_bytes(self) -> int:
        """Bytes of messages queued and not yet written."""
        return self._queued_bytes

    # -- running -----------------------------------------------------------------------

    async def run(self) -> str:
        """
        Run the session until it ends: Hello exchange, then read and write concurrently.

        Returns:
            Why it ended (for ``peer.disconnected``).
        """
        reason = "closed"
        try:
            self.protocol.start()
            await self._write_frames(self.protocol.frames_to_send())
            hello = asyncio.ensure_future(asyncio.wait_for(self._await_hello(), HELLO_TIMEOUT_S))
            closed = asyncio.ensure_future(self._closed.wait())
            try:
                await asyncio.wait({hello, closed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
                if not hello.done():
                    hello.cancel()
            if self._closed.is_set():
                return self.close_reason or reason  # the finally clause reports it
            hello.result()  # re-raise what the handshake raised
            self.is_open = True
            self.handler.on_session_open(self)
            async with asyncio.TaskGroup() as tg:
                writer = tg.create_task(self._writer())
                reader = tg.create_task(self._reader())
                closer = tg.create_task(self._closed.wait())
                done, _ = await asyncio.wait({writer, reader, closer}, return_when=asyncio.FIRST_COMPLETED)
                for task in (writer, reader, closer):
                    task.cancel()
                for finished in done:
                    if not finished.cancelled() and finished.exception() is None:
                        result = finished.result()
                        if isinstance(result, str):
                            reason = result
        except* RemoteProtocolError as eg:
            exc = eg.exceptions[0]
            reason = f"protocol error: {exc}"
            log.warning(
                "peer.protocol_error",
                peer_id=self.peer_id,
                session_id=self.session_id,
                reason=str(exc),
                error=type(exc).__name__,
            )
            await self._say_goodbye("protocol error")
        except* HandshakeRejected as eg:
            reason = f"rejected: {eg.exceptions[0]}"
            log.warning(
                "peer.rejected", peer_id=self.peer_id, reason=str(eg.exceptions[0]), stage="hello", session_id=self.session_id
            )
        except* PeerDisconnected as eg:
            reason = str(eg.exceptions[0])
        except* TimeoutError:
            reason = "no Hello within timeout"
            log.warning("peer.rejected", peer_id=self.peer_id, reason=reason, stage="hello", session_id=self.session_id)
        finally:
            if self.close_reason:
                reason = self.close_reason
            self._closed.set()
            self.is_open = False
            await self.channel.close(reason)
            self.handler.on_session_closed(self, reason)
        return reason

    async def close(self, reason: str) -> None:
        """Say Goodbye (after what is queued) and end :meth:`run`."""
        if self._closed.is_set() or self.close_reason:
            return
        self.close_reason = reason
        if not self.is_open:  # no writer yet: nothing queued goes out before the Hello
            await self._say_goodbye(reason)
            self._closed.set()
            return
        self._outbox.append(("goodbye", None, [], 0))
        self._wakeup.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), 2.0)
        self._closed.set()

    async def _say_goodbye(self, reason: str) -> None:
        with contextlib.suppress(CtxSyncError, OSError, asyncio.TimeoutError):
            self.protocol.send_goodbye(reason)
            await asyncio.wait_for(self._write_frames(self.protocol.frames_to_send()), 2.0)

    async def _await_hello(self) -> None:
        while True:
            frame = await self.channel.recv()
            self._count_received(frame)
            self.protocol.receive_frame(frame)
            events = self.protocol.events_received()
            if any(isinstance(e, Hello) for e in events):
                return

    async def _reader(self) -> str:
        while True:
            frame = await self.channel.recv()
            self._count_received(frame)
            self.protocol.receive_frame(frame)
            for msg in self.protocol.events_received():
                if isinstance(msg, Goodbye):
                    return f"peer said goodbye: {msg.reason}"
                if isinstance(msg, Ack):
                    self._on_ack(msg.received, msg.held_us)
                    continue
                self.handler.on_message(self, msg)
                if isinstance(msg, (SyncStep2, SyncUpdate)):
                    self._received()

    def _count_received(self, frame: bytes) -> None:
        self.stats.received_frames += 1
        self.stats.received_bytes += len(frame)

    async def _writer(self) -> str:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            items, self._outbox = self._outbox, []
            self._queued_bytes = 0
            for kind, doc_id, payload, origin_ms in items:
                if kind == "goodbye":
                    await self._say_goodbye(self.close_reason)
                    return self.close_reason
                if kind == "ack":
                    self._ack_queued = False
                    held_us = max(0, int((time.monotonic() - self._processed_at) * 1_000_000))
                    self.protocol.send_ack(self._received_messages, held_us)
                    await self._write_frames(self.protocol.frames_to_send())
                    continue
                assert doc_id is not None
                if kind == "step1":
                    self.protocol.send_step1(doc_id, payload[0], payload[1].decode())
                elif kind == "step2":
                    self.protocol.send_step2(doc_id, payload[0])
                    self._sent(doc_id, 1, 1, len(payload[0]))
                elif kind == "update":
                    messages = self.protocol.send_updates(doc_id, payload, origin_ms)
                    self.stats.sent_updates += len(payload)
                    self._sent(doc_id, messages, len(payload), sum(len(p) for p in payload))
                elif kind == "resync":
                    self._resync.discard(doc_id)
                    update = self.handler.resync_update(self, doc_id)
                    if update is not None:
                        self.protocol.send_step2(doc_id, update)
                        self._sent(doc_id, 1, 1, len(update))
                await self._write_frames(self.protocol.frames_to_send())

    def _sent(self, doc_id: DocId, messages: int, updates: int, size: int) -> None:
        self._sent_messages += messages
        self._unacked.append((self._sent_messages, doc_id, updates, size, time.monotonic()))

    def _on_ack(self, received: int, held_us: int = 0) -> None:
        """The peer has processed ``received`` of our STEP2/UPDATE messages: settle what it covers."""
        # An ACK only feeds figures (lag, behind), never correctness: one that counts more than
        # was sent (a buggy peer) settles everything rather than ending the session.
        now = time.monotonic()
        while self._unacked and self._unacked[0][0] <= received:
            _, doc_id, _, _, sent_at = self._unacked.popleft()
            # The peer held the ACK for held_us after processing the last message it covers.
            self.ack_lag_ms[doc_id] = round(max(0.0, (now - sent_at) * 1000 - held_us / 1000), 3)

    def _received(self) -> None:
        """
        Count one processed STEP2/UPDATE message and make sure an ACK follows within
        :data:`ACK_DELAY_S` (one ACK covers every message processed until it leaves).
        """
        self._received_messages += 1
        self._processed_at = time.monotonic()
        if not self._ack_queued:
            self._ack_queued = True
            asyncio.get_running_loop().call_later(ACK_DELAY_S, self._queue, "ack", None, [], 0)

    async def _write_frames(self, frames: list[bytes]) -> None:
        for frame in frames:
            await self.channel.send(frame)
            self.stats.sent_frames += 1
            self.stats.sent_bytes += len(frame)

    def __repr__(self) -> str:
        return f"<PeerSession {self.session_id} peer={self.peer_id[:7]} open={self.is_open}>"


__all__ = ["InvalidState", "PeerSession", "SessionHandler", "SessionStats"]
