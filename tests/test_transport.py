"""WebsocketChannel.send over a real loopback websocket: stall detection and no stray timers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve

from ctxsync.errors import PeerDisconnected
from ctxsync.transport import WebsocketChannel
from ctxsync.types import NodeId

from tests.helpers import wait_until

STALL_S = 0.2


async def _never_reads(conn: ServerConnection) -> None:
    await conn.wait_closed()  # reads no message: websockets stops reading the socket once its queue is full


async def _echo_count(conn: ServerConnection) -> None:
    async for _ in conn:
        pass


@pytest.fixture
async def silent_peer() -> AsyncIterator[ClientConnection]:
    """A client connection to a server that stops reading after one queued message."""
    async with serve(
        _never_reads, "127.0.0.1", 0, max_size=None, max_queue=1, compression=None, close_timeout=0.5
    ) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", max_size=None, compression=None, close_timeout=0.5) as conn:
            yield conn


async def test_a_send_that_makes_no_progress_aborts_the_connection(silent_peer: ClientConnection) -> None:
    channel = WebsocketChannel(silent_peer, NodeId("peer"), dialed=True, stall_timeout=STALL_S)
    frame = b"x" * (1 << 20)

    async def fill() -> None:
        for _ in range(2_000):  # bounded: loopback buffers hold a few dozen MiB at most
            await channel.send(frame)

    with pytest.raises(PeerDisconnected, match="send stalled"):
        await asyncio.wait_for(fill(), 30)
    assert silent_peer.transport.is_closing()


async def test_finished_sends_leave_no_timer_that_could_abort_later() -> None:
    async with serve(_echo_count, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None) as conn:
            channel = WebsocketChannel(conn, NodeId("peer"), dialed=True, stall_timeout=0.05)
            for i in range(20):
                await channel.send(b"frame %d" % i)
            loop = asyncio.get_running_loop()
            quiet_until = loop.time() + 0.3  # six stall periods with nothing queued
            await wait_until(lambda: loop.time() >= quiet_until, timeout=5)
            assert not conn.transport.is_closing()
            await channel.send(b"still open")
