"""
The Yjs endpoint: y-protocols decoding (pure), awareness rules (pure), and :func:`ctxsync.yjs.serve`
in process over real websockets on loopback, in front of a real :class:`~ctxsync.mesh.Mesh`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pycrdt
import pytest
import websockets
from pycrdt import Doc, Map, Text, create_awareness_message, create_sync_message, create_update_message
from structlog.testing import capture_logs
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from ctxsync import yjs
from ctxsync.errors import DecodeError, EntryError
from ctxsync.mesh import Mesh
from ctxsync.types import DocId
from ctxsync.yjs import (
    AwarenessEntry,
    AwarenessMessage,
    AwarenessStates,
    QueryAwareness,
    SyncMessage,
    UnknownMessage,
    decode_awareness_update,
    decode_message,
    encode_awareness_update,
)
from tests.helpers import MS, varuint, wait_until
from tests.meshnet import NetNode

T = 5000 * MS

# -- pure: messages --------------------------------------------------------------------


def test_decodes_the_sync_messages_pycrdt_writes() -> None:
    """Step 1, step 2 and update messages written by pycrdt decode to their payloads."""
    doc: Doc[Any] = Doc()
    doc["t"] = Text("hi")
    step1 = decode_message(create_sync_message(doc))
    assert step1 == SyncMessage(pycrdt.YSyncMessageType.SYNC_STEP1, doc.get_state())
    reply = pycrdt.handle_sync_message(create_sync_message(Doc())[1:], doc)
    assert reply is not None
    assert decode_message(reply) == SyncMessage(pycrdt.YSyncMessageType.SYNC_STEP2, doc.get_update(b"\x00"))
    update = doc.get_update()
    assert decode_message(create_update_message(update)) == SyncMessage(
        pycrdt.YSyncMessageType.SYNC_UPDATE, update
    )


def test_decodes_awareness_query_and_unknown_messages() -> None:
    """Awareness, query-awareness and messages of other types (auth, custom) decode as such."""
    body = encode_awareness_update([AwarenessEntry(7, 1, b'{"a":1}')])
    assert decode_message(create_awareness_message(body)) == AwarenessMessage(
        (AwarenessEntry(7, 1, b'{"a":1}'),)
    )
    assert decode_message(varuint(3)) == QueryAwareness()
    assert decode_message(varuint(2) + b"\x00anything") == UnknownMessage(2)
    assert decode_message(varuint(300)) == UnknownMessage(300)


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"\x80",  # truncated varuint
        b"\xff" * 9 + b"\x01",  # longer than lib0 allows
        b"\xff\xff\xff\xff\xff\xff\xff\x7f",  # over 2**53 - 1
        varuint(0),  # sync without a sync type
        varuint(0) + varuint(3) + varuint(0),  # unknown sync type
        varuint(0) + varuint(2) + varuint(5) + b"abc",  # payload shorter than claimed
        varuint(0) + varuint(2) + varuint(2) + b"\x00\x00" + b"x",  # trailing bytes
        varuint(0) + varuint(2) + b"\xff\xff\xff\xff\x0f",  # a 4 GiB payload claimed by 5 bytes
        varuint(3) + b"\x00",  # query awareness with a body
        varuint(1) + varuint(4) + varuint(1) + varuint(1) + varuint(1) + b"{",  # state not JSON
        varuint(1) + varuint(3) + varuint(1) + varuint(1) + varuint(1),  # truncated entry
        varuint(1) + varuint(2) + varuint(1000) + b"\x00",  # count beyond the bytes left
        varuint(1)
        + varuint(5)
        + varuint(1)
        + varuint(1)
        + varuint(1)
        + varuint(2)
        + b"\xff\xfe",  # not UTF-8
    ],
)
def test_malformed_messages_raise_decode_error(message: bytes) -> None:
    """Every truncated, overlong or inconsistent message raises DecodeError."""
    with pytest.raises(DecodeError):
        decode_message(message)


def test_a_huge_varuint_fails_at_once() -> None:
    """A megabyte of continuation bytes is refused after a few bytes, not in quadratic time."""
    started = time.perf_counter()
    with pytest.raises(DecodeError):
        decode_message(b"\xff" * 2**20)
    assert time.perf_counter() - started < 50 * MS


def test_awareness_update_too_large_is_refused() -> None:
    """An awareness update over MAX_AWARENESS_BYTES raises DecodeError."""
    state = b'"' + b"x" * yjs.MAX_AWARENESS_BYTES + b'"'
    with pytest.raises(DecodeError):
        decode_awareness_update(encode_awareness_update([AwarenessEntry(1, 1, state)]))


def test_awareness_updates_interoperate_with_pycrdt() -> None:
    """pycrdt.Awareness reads what we encode (non-ASCII included), and we read what it encodes."""
    doc: Doc[Any] = Doc()
    theirs = pycrdt.Awareness(doc)
    theirs.set_local_state({"user": "ana"})
    entries = decode_awareness_update(theirs.encode_awareness_update([doc.client_id]))
    assert [(e.client_id, e.state) for e in entries] == [(doc.client_id, b'{"user":"ana"}')]

    other: pycrdt.Awareness = pycrdt.Awareness(Doc())
    ours = encode_awareness_update([AwarenessEntry(42, 3, '{"user":"élise ✓"}'.encode())])
    other.apply_awareness_update(ours, "test")
    assert other.states[42] == {"user": "élise ✓"}
    assert decode_awareness_update(ours) == (AwarenessEntry(42, 3, '{"user":"élise ✓"}'.encode()),)


# -- pure: awareness rules ------------------------------------------------------------------


def test_awareness_states_follow_y_protocols_clock_rules() -> None:
    """A higher clock wins, an equal clock is ignored unless it removes, and removals are reported."""
    aw = AwarenessStates()
    one, two = object(), object()
    assert aw.apply([AwarenessEntry(1, 1, b'"a"')], one) == [1]
    assert aw.apply([AwarenessEntry(1, 1, b'"stale"')], two) == []
    assert aw.apply([AwarenessEntry(1, 2, b'"a"')], one) == [1]  # renewed: still reported
    assert aw.apply([AwarenessEntry(9, 5, b"null")], one) == []  # unknown and gone: nothing
    assert aw.apply([AwarenessEntry(2, 1, b'{"b":2}')], two) == [2]
    assert aw.states == {1: b'"a"', 2: b'{"b":2}'}
    full = aw.encode_all()
    assert full is not None and set(decode_awareness_update(full)) == {
        AwarenessEntry(1, 2, b'"a"'),
        AwarenessEntry(2, 1, b'{"b":2}'),
    }
    assert aw.apply([AwarenessEntry(2, 1, b"null")], two) == [2]  # same clock, null: removed
    assert decode_awareness_update(aw.encode([2])) == (AwarenessEntry(2, 1, b"null"),)
    gone = aw.remove_owner(one)
    assert gone is not None and decode_awareness_update(gone) == (AwarenessEntry(1, 2, b"null"),)
    assert aw.states == {} and aw.encode_all() is None
    assert aw.remove_owner(two) is None


def test_awareness_states_not_renewed_in_time_expire() -> None:
    """expire(): states older than the timeout go (as null, with their clock); renewed ones stay; a renewal brings one back."""
    aw = AwarenessStates()
    owner = object()
    aw.apply([AwarenessEntry(1, 4, b'"old"'), AwarenessEntry(2, 1, b'"b"')], owner, now=100.0)
    aw.apply([AwarenessEntry(2, 2, b'"b"')], owner, now=120.0)  # 2 renews
    assert aw.expire(129.9, 30.0) is None
    gone = aw.expire(130.0, 30.0)
    assert gone is not None and decode_awareness_update(gone) == (AwarenessEntry(1, 4, b"null"),)
    assert aw.states == {2: b'"b"'} and aw.expire(130.0, 30.0) is None
    assert aw.apply([AwarenessEntry(1, 4, b'"old"')], owner, now=131.0) == []  # a late copy: same clock, ignored
    assert aw.apply([AwarenessEntry(1, 5, b'"back"')], owner, now=131.0) == [1]
    assert aw.states == {1: b'"back"', 2: b'"b"'}
    assert aw.remove_owner(owner) is not None and aw.expire(10_000.0, 30.0) is None


def test_awareness_states_are_bounded() -> None:
    """An update that would keep more than max_clients states is refused whole."""
    aw = AwarenessStates(max_clients=2)
    aw.apply([AwarenessEntry(1, 1, b"1")], "x")
    with pytest.raises(EntryError):
        aw.apply([AwarenessEntry(2, 1, b"2"), AwarenessEntry(3, 1, b"3")], "x")
    assert aw.states == {1: b"1"}


# -- serve() in process: a real mesh behind a real websockets server --------------------------


@contextlib.asynccontextmanager
async def endpoint(
    tmp_path: Path, *, send_buffer_bytes: int | None = None
) -> AsyncIterator[tuple[Mesh, str]]:
    """A mesh (real store in tmp_path) served at ws://127.0.0.1:PORT/yjs/CONTEXT; yields it and the URL prefix."""
    node = NetNode(tmp_path, "solo")
    mesh = await node.open([])

    async def handler(conn: ServerConnection) -> None:
        assert conn.request is not None
        if send_buffer_bytes is not None:  # so that a client which does not read blocks the server soon
            conn.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes
            )
        await yjs.serve(mesh, conn, DocId(conn.request.path.rsplit("/", 1)[1]))

    try:
        async with websockets.serve(handler, "127.0.0.1", 0, compression=None, max_size=None) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            yield mesh, f"ws://127.0.0.1:{port}/yjs/"
    finally:
        await node.close()


async def recv_sync(ws: ClientConnection) -> SyncMessage:
    """The next sync message ``ws`` receives (awareness is skipped)."""
    while True:
        message = await asyncio.wait_for(ws.recv(), T)
        assert isinstance(message, bytes)
        decoded = decode_message(message)
        if isinstance(decoded, SyncMessage):
            return decoded


def sync(sync_type: pycrdt.YSyncMessageType, payload: bytes) -> bytes:
    return varuint(0) + varuint(sync_type) + varuint(len(payload)) + payload


async def handshake(ws: ClientConnection, doc: Doc[Any]) -> None:
    """Answer the server's step 1 with the missing part of ``doc``, and sync ``doc`` from it (step 1 → 2)."""
    step1 = await recv_sync(ws)
    assert step1.sync_type == pycrdt.YSyncMessageType.SYNC_STEP1
    await ws.send(sync(pycrdt.YSyncMessageType.SYNC_STEP2, doc.get_update(step1.payload)))
    await ws.send(create_sync_message(doc))
    step2 = await recv_sync(ws)
    assert step2.sync_type == pycrdt.YSyncMessageType.SYNC_STEP2
    doc.apply_update(step2.payload)


async def test_updates_reach_other_clients_but_never_echo(tmp_path: Path) -> None:
    """A client's update reaches the other client and the mesh; mesh writes reach both; nobody gets its own back."""
    async with endpoint(tmp_path) as (mesh, base):
        with capture_logs() as logs:
            async with websockets.connect(base + "ctx") as one, websockets.connect(base + "ctx") as two:
                doc_one: Doc[Any] = Doc()
                doc_two: Doc[Any] = Doc()
                await handshake(one, doc_one)
                await handshake(two, doc_two)

                doc_one["t"] = text = Text()
                events: list[bytes] = []
                sub = doc_one.observe(lambda e: events.append(e.update))
                text += "typed in one"
                doc_one.unobserve(sub)
                await one.send(create_update_message(events[0]))
                got = await recv_sync(two)
                assert got.sync_type == pycrdt.YSyncMessageType.SYNC_UPDATE
                doc_two.apply_update(got.payload)
                assert str(doc_two.get("t", type=Text)) == "typed in one"
                assert str(mesh.open_context(DocId("ctx")).get("t", type=Text)) == "typed in one"

                await mesh.write(DocId("ctx"), [("k", "1")])
                for ws, doc in ((one, doc_one), (two, doc_two)):
                    doc.apply_update(
                        (await recv_sync(ws)).payload
                    )  # one's first message is the write, not its echo
                    assert len(doc.get("entries", type=Map)) == 1
            await wait_until(lambda: sum(e["event"] == "yjs.disconnected" for e in logs) == 2, T)
        connected = [e for e in logs if e["event"] == "yjs.connected"]
        disconnected = [e for e in logs if e["event"] == "yjs.disconnected"]
        assert len(connected) == 2 and all(e["doc_id"] == "ctx" and e["client"] for e in connected)
        assert len(disconnected) == 2
        assert all(e["reason"].startswith("closed by client") and e["duration_s"] >= 0 for e in disconnected)


async def test_update_with_missing_dependencies_is_dropped_and_the_client_asked(tmp_path: Path) -> None:
    """An update building on what the server lacks does not close the client: the server asks again by step 1."""
    async with endpoint(tmp_path) as (mesh, base):
        doc: Doc[Any] = Doc()
        doc["t"] = text = Text("abc")
        events: list[bytes] = []
        sub = doc.observe(lambda e: events.append(e.update))
        text += "def"
        doc.unobserve(sub)
        async with websockets.connect(base + "gap") as ws:
            step1 = await recv_sync(ws)
            await ws.send(sync(pycrdt.YSyncMessageType.SYNC_STEP2, b"\x00\x00"))  # pretend to have nothing
            await ws.send(create_update_message(events[0]))  # builds on "abc", which the server lacks
            again = await recv_sync(ws)
            assert again.sync_type == pycrdt.YSyncMessageType.SYNC_STEP1 and again.payload == step1.payload
            await ws.send(sync(pycrdt.YSyncMessageType.SYNC_STEP2, doc.get_update(again.payload)))
            await wait_until(lambda: str(mesh.open_context(DocId("gap")).get("t", type=Text)) == "abcdef", T)


async def test_refused_update_closes_with_1008_and_is_logged(tmp_path: Path) -> None:
    """A malformed update closes the connection (1008), logs yjs.refused, and leaves the context as it was."""
    async with endpoint(tmp_path) as (mesh, base):
        await mesh.write(DocId("c"), [("k", '"v"')])
        state = mesh.open_context(DocId("c")).get_state()
        with capture_logs() as logs:
            async with websockets.connect(base + "c") as ws:
                await ws.send(sync(pycrdt.YSyncMessageType.SYNC_UPDATE, b"\x01\x01\xff\xff\x03\x00\x07"))
                with pytest.raises(ConnectionClosed) as exc_info:
                    while True:
                        await asyncio.wait_for(ws.recv(), T)
        assert exc_info.value.rcvd is not None and exc_info.value.rcvd.code == 1008
        refused = [e for e in logs if e["event"] == "yjs.refused"]
        assert len(refused) == 1 and refused[0]["doc_id"] == "c" and "update refused" in refused[0]["reason"]
        assert mesh.open_context(DocId("c")).get_state() == state
        assert mesh.get(DocId("c"), "k").value == '"v"'


async def test_a_client_too_slow_to_read_is_closed_with_1013(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a client does not read, its queue overflows and it is closed (1013) instead of buffered without bound."""
    monkeypatch.setattr(yjs, "MAX_QUEUED_BYTES", 256 * 1024)
    async with endpoint(tmp_path, send_buffer_bytes=65_536) as (_mesh, base):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65_536)  # before connecting: a small window
        sock.connect(("127.0.0.1", int(base.split(":")[2].split("/")[0])))
        with capture_logs() as logs:
            async with websockets.connect(base + "big", sock=sock, max_queue=1, max_size=None) as slow:
                async with websockets.connect(base + "big", max_size=None) as writer:
                    doc: Doc[Any] = Doc()
                    await handshake(writer, doc)
                    doc["t"] = text = Text()
                    events: list[bytes] = []
                    sub = doc.observe(lambda e: events.append(e.update))
                    for i in range(64):
                        text += f"{i:04d}" * 16_384  # 64 KiB per update: 4 MiB in all
                    doc.unobserve(sub)
                    for update in events:
                        await writer.send(create_update_message(update))
                    await writer.send(create_sync_message(doc))  # answered once every update is applied
                    while (await recv_sync(writer)).sync_type != pycrdt.YSyncMessageType.SYNC_STEP2:
                        pass
                received = 0
                with pytest.raises(ConnectionClosed) as exc_info:
                    while True:
                        await asyncio.wait_for(slow.recv(), T)
                        received += 1
            await wait_until(lambda: any("too slow" in e.get("reason", "") for e in logs), T)
        assert exc_info.value.rcvd is not None and exc_info.value.rcvd.code == 1013
        assert "too slow" in exc_info.value.rcvd.reason
        assert received < 64  # what was queued when it overflowed was dropped
        slow_logs = [e for e in logs if e["event"] == "yjs.disconnected" and "too slow" in e["reason"]]
        assert len(slow_logs) == 1


async def test_awareness_of_a_client_that_stops_renewing_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connected client whose state is not renewed within the (shortened) timeout: every client is told it is gone."""
    monkeypatch.setattr(yjs, "AWARENESS_TIMEOUT_S", 0.6)
    monkeypatch.setattr(yjs, "AWARENESS_CHECK_S", 0.05)
    async with endpoint(tmp_path) as (_mesh, base):
        async with websockets.connect(base + "ctx") as one, websockets.connect(base + "ctx") as two:
            await handshake(one, Doc())
            await handshake(two, Doc())
            stale = encode_awareness_update([AwarenessEntry(77, 1, b'{"user":"gone quiet"}')])
            await one.send(varuint(1) + varuint(len(stale)) + stale)
            renewed_at = time.monotonic()
            assert await next_awareness_states(two) == {77: b'{"user":"gone quiet"}'}
            assert await next_awareness_states(two) == {77: b"null"}  # one stays connected, but silent
            assert time.monotonic() - renewed_at >= 0.55
            assert await next_awareness_states(one) == {77: b'{"user":"gone quiet"}'}  # its own, echoed
            assert await next_awareness_states(one) == {77: b"null"}


async def next_awareness_states(ws: ClientConnection) -> dict[int, bytes]:
    """Client id -> state (JSON text) of the next awareness message ``ws`` receives; sync messages are skipped."""
    while True:
        message = await asyncio.wait_for(ws.recv(), T)
        assert isinstance(message, bytes)
        decoded = decode_message(message)
        if isinstance(decoded, AwarenessMessage):
            return {e.client_id: e.state for e in decoded.entries}
