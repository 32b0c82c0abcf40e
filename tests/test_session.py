"""Tests of ctxsync.session: PeerSession over in-memory channels (channel_pair)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import structlog
from pycrdt import Doc, Map, TransactionEvent

from ctxsync.codec import Goodbye, Hello, Message, SyncStep1, SyncStep2, SyncUpdate, decode, encode
from ctxsync.errors import RemoteProtocolError
from ctxsync.protocol import PeerProtocol
from ctxsync.session import PeerSession
from ctxsync.types import ENTRIES_ROOT, PROTOCOL_VERSION, DocId, NodeId
from tests.helpers import MS, NODE_A, NODE_B, MemoryChannel, channel_pair, wait_until

D = DocId("notes")
E = DocId("other")
KIB = 1024
TIMEOUT = 2000 * MS
"""Bound of every test; each normally takes a few milliseconds."""
WAIT = 500 * MS


class RecordingHandler:
    """A SessionHandler that records every call; ``on_open`` and ``on_msg`` hooks act like the mesh."""

    def __init__(
        self,
        *,
        resync: bytes | None = b"\x00\x00",
        on_open: Callable[[PeerSession], None] | None = None,
        on_msg: Callable[[PeerSession, Message], None] | None = None,
    ) -> None:
        self.opened: list[PeerSession] = []
        self.open_was_open: list[bool] = []
        self.messages: list[Message] = []
        self.resyncs: list[DocId] = []
        self.closed: list[str] = []
        self._resync = resync
        self._on_open = on_open
        self._on_msg = on_msg

    def on_session_open(self, session: PeerSession) -> None:
        self.opened.append(session)
        self.open_was_open.append(session.is_open)
        if self._on_open:
            self._on_open(session)

    def on_message(self, session: PeerSession, message: Message) -> None:
        self.messages.append(message)
        if self._on_msg:
            self._on_msg(session, message)

    def resync_update(self, session: PeerSession, doc_id: DocId) -> bytes | None:
        self.resyncs.append(doc_id)
        return self._resync

    def on_session_closed(self, session: PeerSession, reason: str) -> None:
        self.closed.append(reason)


def protocol(me: NodeId, peer: NodeId, *, max_frame_bytes: int = 64 * KIB) -> PeerProtocol:
    return PeerProtocol(
        me, f"name-{me[0]}", expected_peer=peer, max_frame_bytes=max_frame_bytes, max_message_bytes=1 << 24
    )


@dataclass
class Side:
    """One running session and what it is made of."""

    session: PeerSession
    handler: RecordingHandler
    channel: MemoryChannel
    task: asyncio.Task[str]


@dataclass
class RawSide:
    """The other end driven by hand: a channel and a protocol to decode what arrives."""

    channel: MemoryChannel
    protocol: PeerProtocol

    async def hello(self) -> None:
        """Send this side's Hello and read the session's."""
        self.protocol.start()
        for frame in self.protocol.frames_to_send():
            await self.channel.send(frame)
        self.protocol.receive_frame(await self.channel.recv())
        assert isinstance(self.protocol.events_received()[0], Hello)


class Sessions:
    """Starts sessions in the test's loop; the fixture cancels whatever is left running."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[str]] = []

    def run(self, channel: MemoryChannel, handler: RecordingHandler, **kw: Any) -> Side:
        me = NODE_A if channel.peer_id == NODE_B else NODE_B
        session = PeerSession(channel, protocol(me, channel.peer_id), handler, **kw)
        task = asyncio.create_task(session.run())
        self.tasks.append(task)
        return Side(session, handler, channel, task)

    async def pair(
        self, ha: RecordingHandler | None = None, hb: RecordingHandler | None = None, **kw: Any
    ) -> tuple[Side, Side]:
        """Two sessions (A dials B), both open."""
        ca, cb = channel_pair(NODE_A, NODE_B)
        a = self.run(ca, ha or RecordingHandler(), **kw)
        b = self.run(cb, hb or RecordingHandler(), **kw)
        await wait_until(lambda: a.session.is_open and b.session.is_open, WAIT)
        return a, b

    async def half(self, *, maxsize: int = 0, **kw: Any) -> tuple[Side, RawSide]:
        """Session A against a hand-driven B, after the Hello exchange."""
        ca, cb = channel_pair(NODE_A, NODE_B, maxsize=maxsize)
        a = self.run(ca, RecordingHandler(), **kw)
        raw = RawSide(cb, protocol(NODE_B, NODE_A))
        await raw.hello()
        await wait_until(lambda: a.session.is_open, WAIT)
        return a, raw


@pytest.fixture
async def sessions() -> AsyncIterator[Sessions]:
    s = Sessions()
    yield s
    for t in s.tasks:
        t.cancel()
    await asyncio.gather(*s.tasks, return_exceptions=True)


def real_updates(n: int) -> list[bytes]:
    """``n`` consecutive updates of a real pycrdt document."""
    doc: Doc[Any] = Doc()
    m = doc.get(ENTRIES_ROOT, type=Map)
    updates: list[bytes] = []

    def record(event: TransactionEvent) -> None:
        updates.append(event.update)

    doc.observe(record)
    for i in range(n):
        m[f"k{i}"] = i
    return updates


# -- opening ----------------------------------------------------------------------------


async def test_both_sides_open(sessions: Sessions) -> None:
    """After the Hello exchange each handler gets on_session_open once, with the session open."""
    async with asyncio.timeout(TIMEOUT):
        a, b = await sessions.pair()
        assert a.handler.opened == [a.session]
        assert b.handler.opened == [b.session]
        assert a.handler.open_was_open == b.handler.open_was_open == [True]
        assert (a.session.peer_id, b.session.peer_id) == (NODE_B, NODE_A)
        assert (a.session.protocol.peer_name, b.session.protocol.peer_name) == ("name-B", "name-A")
        assert a.handler.closed == b.handler.closed == []
        assert a.session.session_id != b.session.session_id


async def test_messages_queued_in_on_session_open_are_sent(sessions: Sessions) -> None:
    """Step 1s queued by on_session_open reach the peer, as the mesh relies on."""
    async with asyncio.timeout(TIMEOUT):
        ha = RecordingHandler(on_open=lambda s: s.send_step1(D, b"\x00"))
        hb = RecordingHandler(on_open=lambda s: s.send_step1(E, b"\x00"))
        a, b = await sessions.pair(ha, hb)
        await wait_until(lambda: bool(a.handler.messages and b.handler.messages), WAIT)
        assert a.handler.messages == [SyncStep1(E, b"\x00")]
        assert b.handler.messages == [SyncStep1(D, b"\x00")]
        assert a.session.synced == {D: False}
        assert D in a.session.step1_sent_at


# -- messages -----------------------------------------------------------------------------


async def test_messages_arrive_in_order(sessions: Sessions) -> None:
    """Messages queued by one side reach the other's on_message in the same order."""
    async with asyncio.timeout(TIMEOUT):
        a, b = await sessions.pair()
        doc: Doc[Any] = Doc()
        doc.get(ENTRIES_ROOT, type=Map)["k"] = "v"
        u1, u2, u3 = real_updates(3)
        a.session.send_step1(D, doc.get_state())
        a.session.send_step2(D, doc.get_update())
        a.session.send_update(E, u1)
        a.session.send_update(D, u2)
        a.session.send_update(E, u3)
        a.session.send_step1(E, b"\x00")
        expected = [
            SyncStep1(D, doc.get_state()),
            SyncStep2(D, doc.get_update()),
            SyncUpdate(E, (u1,)),
            SyncUpdate(D, (u2,)),
            SyncUpdate(E, (u3,)),
            SyncStep1(E, b"\x00"),
        ]
        await wait_until(lambda: len(b.handler.messages) >= len(expected), WAIT)
        assert b.handler.messages == expected
        assert a.session.stats.sent_updates == 3
        assert b.session.stats.received_frames == a.session.stats.sent_frames
        assert b.session.stats.received_bytes == a.session.stats.sent_bytes


async def test_both_directions_at_once(sessions: Sessions) -> None:
    """Both sides send at the same time and each receives everything, in order."""
    async with asyncio.timeout(TIMEOUT):
        a, b = await sessions.pair()
        for i in range(20):
            a.session.send_step1(DocId(f"a{i}"), b"\x00")
            b.session.send_step1(DocId(f"b{i}"), b"\x00")
        await wait_until(lambda: len(a.handler.messages) == len(b.handler.messages) == 20, WAIT)
        assert b.handler.messages == [SyncStep1(DocId(f"a{i}"), b"\x00") for i in range(20)]
        assert a.handler.messages == [SyncStep1(DocId(f"b{i}"), b"\x00") for i in range(20)]


async def test_queued_updates_of_one_context_share_a_frame(sessions: Sessions) -> None:
    """Updates of one context queued while the writer is busy travel together, and apply."""
    async with asyncio.timeout(TIMEOUT):
        a, b = await sessions.pair()
        updates = real_updates(10)
        frames_before = a.session.stats.sent_frames
        for u in updates:
            a.session.send_update(D, u)
        await wait_until(lambda: len(b.handler.messages) > 0, WAIT)
        assert b.handler.messages == [SyncUpdate(D, tuple(updates))]
        assert a.session.stats.sent_frames == frames_before + 1
        assert a.session.stats.sent_updates == 10
        doc: Doc[Any] = Doc()
        for u in b.handler.messages[0].updates:  # type: ignore[union-attr]
            doc.apply_update(u)
        assert doc.get(ENTRIES_ROOT, type=Map).to_py() == {f"k{i}": i for i in range(10)}


async def test_large_step2_crosses_in_chunks(sessions: Sessions) -> None:
    """A step 2 larger than a frame reaches the handler whole."""
    async with asyncio.timeout(TIMEOUT):
        a, b = await sessions.pair()
        update = bytes(range(256)) * 1000  # 256 KB, four times the 64 KiB frame
        a.session.send_step2(D, update)
        await wait_until(lambda: len(b.handler.messages) > 0, WAIT)
        assert b.handler.messages == [SyncStep2(D, update)]
        assert a.session.stats.sent_frames >= 1 + len(update) // (64 * KIB)


# -- closing ----------------------------------------------------------------------------


async def test_close_ends_both_sessions(sessions: Sessions) -> None:
    """close() on one side ends run() on both, each calling on_session_closed once with a reason."""
    async with asyncio.timeout(TIMEOUT):
        a, b = await sessions.pair()
        await a.session.close("node stopping")
        assert await a.task == "node stopping"
        assert await b.task == "peer said goodbye: node stopping"
        assert a.handler.closed == ["node stopping"]
        assert b.handler.closed == ["peer said goodbye: node stopping"]
        assert not a.session.is_open and not b.session.is_open
        assert a.channel.close_reasons[0] == "node stopping"
        await a.session.close("again")  # idempotent once closed
        assert a.handler.closed == ["node stopping"]


async def test_channel_drop_ends_both_sessions(sessions: Sessions) -> None:
    """A dropped connection ends run() on both sides with a disconnection reason."""
    async with asyncio.timeout(TIMEOUT):
        a, b = await sessions.pair()
        await a.channel.close("cable cut")
        ra, rb = await a.task, await b.task
        assert "cable cut" in ra and "cable cut" in rb
        assert a.handler.closed == [ra]
        assert b.handler.closed == [rb]


async def test_cancelled_run_still_reports_the_close(sessions: Sessions) -> None:
    """Cancelling run() closes the channel and calls on_session_closed once."""
    async with asyncio.timeout(TIMEOUT):
        a, b = await sessions.pair()
        a.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await a.task
        assert len(a.handler.closed) == 1
        await b.task
        assert len(b.handler.closed) == 1


async def test_close_during_handshake_ends_run(sessions: Sessions) -> None:
    """close() before the peer's Hello ends run() at once, without opening the session."""
    async with asyncio.timeout(TIMEOUT):
        ca, cb = channel_pair(NODE_A, NODE_B)
        a = sessions.run(ca, RecordingHandler())
        await wait_until(lambda: a.channel.unread == 1, WAIT)  # A's Hello sent, B silent
        await a.session.close("peer removed")
        await wait_until(a.task.done, 200 * MS)
        assert a.task.result() == "peer removed"
        assert a.handler.opened == []
        assert a.handler.closed == ["peer removed"]


async def test_close_with_updates_queued_sends_them_then_goodbye(sessions: Sessions) -> None:
    """close() right after queueing updates sends them, then Goodbye, and run() returns the reason."""
    async with asyncio.timeout(TIMEOUT):
        a, b = await sessions.pair()
        (u,) = real_updates(1)
        a.session.send_update(D, u)
        await a.session.close("node stopping")
        results = await asyncio.gather(a.task, b.task, return_exceptions=True)
        assert list(results) == ["node stopping", "peer said goodbye: node stopping"]
        assert b.handler.messages == [SyncUpdate(D, (u,))]


async def test_close_during_a_chunked_message_does_not_split_it(sessions: Sessions) -> None:
    """Goodbye from close() never lands between the chunks of a message being written."""
    async with asyncio.timeout(TIMEOUT):
        a, raw = await sessions.half(maxsize=1)
        update = b"\x01" * (5 * 64 * KIB)  # six frames
        a.session.send_step2(D, update)
        # The writer has queued one chunk and is blocked on the next: the peer does not read.
        await wait_until(lambda: a.channel.unread == 1 and a.session.queued_bytes == 0, WAIT)
        closing = asyncio.create_task(a.session.close("node stopping"))
        events: list[Message] = []
        try:
            while True:
                raw.protocol.receive_frame(await raw.channel.recv())
                events += raw.protocol.events_received()
                if events and isinstance(events[-1], Goodbye):
                    break
        finally:
            await asyncio.gather(closing, return_exceptions=True)
        assert events == [SyncStep2(D, update), Goodbye("node stopping")]


# -- protocol errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        (b"\xff\xff\xff", "DecodeError"),
        (b"", "DecodeError"),
        (encode(Hello(PROTOCOL_VERSION, NODE_B, "again")), "RemoteProtocolError"),
        (encode(SyncStep1(D, b"\x00")) + b"\x00", "DecodeError"),
    ],
    ids=["garbage", "empty", "second-hello", "trailing"],
)
async def test_garbage_after_hello_is_a_protocol_error(sessions: Sessions, frame: bytes, error: str) -> None:
    """An invalid frame after the Hello ends run() with a protocol error, logged and said Goodbye to."""
    async with asyncio.timeout(TIMEOUT):
        with structlog.testing.capture_logs() as logs:
            a, raw = await sessions.half()
            await raw.channel.send(frame)
            reason = await a.task
        assert reason.startswith("protocol error")
        assert a.handler.closed == [reason]
        assert a.handler.messages == []
        errors = [e for e in logs if e["event"] == "peer.protocol_error"]
        assert len(errors) == 1
        assert errors[0]["log_level"] == "warning"
        assert errors[0]["peer_id"] == NODE_B
        assert errors[0]["session_id"] == a.session.session_id
        assert errors[0]["error"] == error
        assert errors[0]["reason"]
        # The session said Goodbye before closing the connection.
        assert decode(await raw.channel.recv()) == Goodbye("protocol error")


async def test_handler_refusing_content_is_a_protocol_error(sessions: Sessions) -> None:
    """A RemoteProtocolError raised by on_message ends the session as a protocol error."""

    def refuse(session: PeerSession, message: Message) -> None:
        raise RemoteProtocolError("update does not apply")

    async with asyncio.timeout(TIMEOUT):
        with structlog.testing.capture_logs() as logs:
            a, b = await sessions.pair(hb=RecordingHandler(on_msg=refuse))
            a.session.send_step1(D, b"\x00")
            rb, ra = await b.task, await a.task
        assert rb == "protocol error: update does not apply"
        assert ra == "peer said goodbye: protocol error"
        assert [e["event"] for e in logs].count("peer.protocol_error") == 1


async def test_hello_with_wrong_node_id_is_rejected(sessions: Sessions) -> None:
    """A Hello claiming another node id ends the session as rejected, without opening it."""
    async with asyncio.timeout(TIMEOUT):
        ca, cb = channel_pair(NODE_A, NODE_B)
        with structlog.testing.capture_logs() as logs:
            a = sessions.run(ca, RecordingHandler())
            await cb.send(encode(Hello(PROTOCOL_VERSION, NodeId("C" * 63), "mallory")))
            reason = await a.task
        assert reason.startswith("rejected")
        assert a.handler.opened == []
        assert a.handler.closed == [reason]
        assert [e for e in logs if e["event"] == "peer.rejected"][0]["stage"] == "hello"


async def test_hello_with_wrong_version_is_a_protocol_error(sessions: Sessions) -> None:
    """A Hello with another protocol version ends the session as a protocol error."""
    async with asyncio.timeout(TIMEOUT):
        ca, cb = channel_pair(NODE_A, NODE_B)
        with structlog.testing.capture_logs() as logs:
            a = sessions.run(ca, RecordingHandler())
            await cb.send(encode(Hello(PROTOCOL_VERSION + 1, NODE_B, "future")))
            reason = await a.task
        assert reason == f"protocol error: unsupported protocol version {PROTOCOL_VERSION + 1}"
        assert a.handler.opened == []
        assert [e["error"] for e in logs if e["event"] == "peer.protocol_error"] == ["UnsupportedVersion"]


# -- backpressure -----------------------------------------------------------------------


async def test_slow_peer_overflows_into_a_resync(sessions: Sessions) -> None:
    """Updates to a peer that does not read stay bounded, then travel as one resync step 2."""
    limit = 1000
    async with asyncio.timeout(TIMEOUT):
        with structlog.testing.capture_logs() as logs:
            a, raw = await sessions.half(maxsize=1, max_queue_bytes=limit)
            s, h = a.session, a.handler
            # Fill the link: u0 waits in the channel, u1 blocks the writer in send().
            u0, u1 = b"\x00" * 100, b"\x01" * 100
            s.send_update(D, u0)
            await wait_until(lambda: a.channel.unread == 1 and s.queued_bytes == 0, WAIT)
            s.send_update(D, u1)
            await wait_until(lambda: s.queued_bytes == 0, WAIT)
            # Now nothing leaves: updates pile up to the bound, then overflow.
            s.send_update(E, b"\x0e" * 100)  # another context, kept
            for i in range(30):
                s.send_update(D, bytes([i]) * 100)
                assert s.queued_bytes <= limit
            assert s.stats.queue_overflows == 1
            assert h.resyncs == []  # the writer has not got there yet
            assert s.queued_bytes == 100  # only E's update: D's were dropped for the resync

            # The peer starts reading: the writer drains and asks the handler for the resync.
            events: list[Message] = []

            async def read() -> None:
                while True:
                    raw.protocol.receive_frame(await raw.channel.recv())
                    events.extend(raw.protocol.events_received())

            reader = asyncio.create_task(read())
            try:
                await wait_until(lambda: len(events) == 4, WAIT)
            finally:
                reader.cancel()
            assert h.resyncs == [D]
            assert events == [
                SyncUpdate(D, (u0,)),
                SyncUpdate(D, (u1,)),
                SyncUpdate(E, (b"\x0e" * 100,)),
                SyncStep2(D, b"\x00\x00"),
            ]
            assert s.queued_bytes == 0
        overflows = [e for e in logs if e["event"] == "peer.queue_overflow"]
        assert [(e["doc_id"], e["peer_id"]) for e in overflows] == [(D, NODE_B)]


async def test_updates_after_the_resync_flow_again(sessions: Sessions) -> None:
    """Once the resync is written, later updates of that context are sent normally."""
    async with asyncio.timeout(TIMEOUT):
        a, b = await sessions.pair(max_queue_bytes=150)
        s = a.session
        for i in range(5):  # queued synchronously: the third one overflows
            s.send_update(D, bytes([i]) * 100)
        assert s.stats.queue_overflows >= 1
        await wait_until(lambda: a.handler.resyncs == [D], WAIT)
        await wait_until(lambda: any(isinstance(m, SyncStep2) for m in b.handler.messages), WAIT)
        s.send_update(D, b"\x09" * 10)
        await wait_until(lambda: b.handler.messages[-1] == SyncUpdate(D, (b"\x09" * 10,)), WAIT)


async def test_resync_can_be_skipped(sessions: Sessions) -> None:
    """When resync_update returns None, nothing is sent for the overflowed context."""
    async with asyncio.timeout(TIMEOUT):
        a, b = await sessions.pair(ha=RecordingHandler(resync=None), max_queue_bytes=150)
        for i in range(5):
            a.session.send_update(D, bytes([i]) * 100)
        a.session.send_step1(E, b"\x00")  # a marker after the resync
        await wait_until(lambda: SyncStep1(E, b"\x00") in b.handler.messages, WAIT)
        assert a.handler.resyncs == [D]
        assert not any(isinstance(m, SyncStep2) for m in b.handler.messages)
