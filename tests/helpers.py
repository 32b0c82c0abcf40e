"""
Shared test helpers: one timeout unit, polling waits, and fake links between two peers.

* :data:`MS`, :func:`wait_until`, :func:`wait_until_sync`: wait for a condition, never for
  a fixed time (websockets ``tests/utils.py``).
* :class:`PeerPair`: two sans-I/O :class:`~ctxsync.protocol.PeerProtocol` objects joined by
  a fake link and driven step by step (h11 ``tests/helpers.py::ConnectionPair``).
* :func:`channel_pair`: two in-memory :class:`~ctxsync.transport.Channel` objects joined by
  asyncio queues (pycrdt-websocket ``tests/utils.py::connected_websockets``).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ctxsync.codec import Message
from ctxsync.errors import PeerDisconnected
from ctxsync.protocol import PeerProtocol
from ctxsync.types import NodeId

T = TypeVar("T")

MS = 0.001 * float(os.environ.get("CTXSYNC_TESTS_TIMEOUT_FACTOR", "1"))
"""One timeout unit, in seconds; scale every timeout with ``CTXSYNC_TESTS_TIMEOUT_FACTOR``."""

NODE_A = NodeId("-".join(["A" * 7] * 8))
"""Fake node id of side "a" (the protocol only compares node ids as strings)."""
NODE_B = NodeId("-".join(["B" * 7] * 8))
"""Fake node id of side "b"."""


def varuint(n: int) -> bytes:
    """lib0 varuint, written independently of the code under test (for hand-built frames and updates)."""
    out = bytearray()
    while True:
        if n < 0x80:
            out.append(n)
            return bytes(out)
        out.append(0x80 | (n & 0x7F))
        n >>= 7


def _describe(predicate: Callable[[], bool]) -> str:
    try:
        return inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return repr(predicate)


async def wait_until(predicate: Callable[[], bool], timeout: float, *, interval: float = 0.005) -> None:
    """
    Poll ``predicate`` until it returns true.

    Args:
        predicate: Checked at once, then every ``interval`` seconds.
        timeout: Give up after this many seconds (use a multiple of :data:`MS`).
        interval: Polling period, in seconds.

    Raises:
        AssertionError: If ``predicate`` is still false after ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() >= deadline:
            raise AssertionError(f"not true within {timeout:.3f} s: {_describe(predicate)}")
        await asyncio.sleep(interval)


def wait_until_sync(predicate: Callable[[], bool], timeout: float, *, interval: float = 0.02) -> None:
    """Blocking :func:`wait_until`, for tests that drive subprocesses."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true within {timeout:.3f} s: {_describe(predicate)}")
        time.sleep(interval)


# -- sans-I/O: two protocols and a fake link -------------------------------------------


class PeerPair:
    """
    Two :class:`PeerProtocol` objects, ``a`` (node :data:`NODE_A`) and ``b`` (node
    :data:`NODE_B`), each expecting the other, joined by a fake link.

    Queue messages with ``pair.a.send_...()`` / ``pair.b.send_...()``, then :meth:`pump`.
    """

    def __init__(self, *, max_frame_bytes: int = 1 << 20, max_message_bytes: int = 1 << 26) -> None:
        limits = {"max_frame_bytes": max_frame_bytes, "max_message_bytes": max_message_bytes}
        self.a = PeerProtocol(NODE_A, "alpha", expected_peer=NODE_B, **limits)
        self.b = PeerProtocol(NODE_B, "beta", expected_peer=NODE_A, **limits)
        self.sent: dict[str, list[bytes]] = {"a": [], "b": []}
        """Frames each side sent during the last :meth:`pump`, in order."""

    def side(self, name: str) -> PeerProtocol:
        """Return protocol ``"a"`` or ``"b"``."""
        return {"a": self.a, "b": self.b}[name]

    def pump(self) -> dict[str, list[Message]]:
        """
        Deliver the frames of each side to the other until neither has any left.

        Returns:
            ``{"a": [...], "b": [...]}``: the events each side received, in order.

        Raises:
            Whatever ``receive_frame`` raises; the frames after the failing one are lost.
        """
        self.sent = {"a": [], "b": []}
        received: dict[str, list[Message]] = {"a": [], "b": []}
        moved = True
        while moved:
            moved = False
            for src, dst in (("a", "b"), ("b", "a")):
                frames = self.side(src).frames_to_send()
                moved = moved or bool(frames)
                self.sent[src] += frames
                for frame in frames:
                    self.side(dst).receive_frame(frame)
                    received[dst] += self.side(dst).events_received()
        return received

    def open(self) -> dict[str, list[Message]]:
        """Exchange Hellos (both sides end OPEN) and return the events received."""
        self.a.start()
        self.b.start()
        return self.pump()


# -- asyncio: two in-memory channels ----------------------------------------------------


class _Link:
    """State shared by the two ends: closing either end closes both."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.reason = ""


class MemoryChannel:
    """
    One end of :func:`channel_pair`; implements :class:`ctxsync.transport.Channel`.

    Frames queued before a close are still received; after them, ``recv()`` raises
    :class:`PeerDisconnected` on both ends, and so does ``send()``.
    """

    def __init__(
        self,
        peer_id: str,
        link: _Link,
        inbox: asyncio.Queue[bytes],
        outbox: asyncio.Queue[bytes],
        *,
        dialed: bool,
    ) -> None:
        self.peer_id = NodeId(peer_id)
        self.remote_address = f"memory:{peer_id[:7]}"
        self.dialed = dialed
        self.close_reasons: list[str] = []
        """Reason of every ``close()`` call on this end."""
        self._link = link
        self._inbox = inbox
        self._outbox = outbox

    @property
    def unread(self) -> int:
        """Frames this end sent that the other end has not received yet."""
        return self._outbox.qsize()

    def _disconnected(self) -> PeerDisconnected:
        return PeerDisconnected(f"connection closed ({self._link.reason})", peer_id=self.peer_id)

    async def _until_closed(self, aw: Awaitable[T]) -> T:
        """Await ``aw``, or raise PeerDisconnected if the link closes first."""
        task = asyncio.ensure_future(aw)
        closed = asyncio.ensure_future(self._link.closed.wait())
        try:
            await asyncio.wait({task, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled():
            return task.result()
        raise self._disconnected()

    async def send(self, frame: bytes) -> None:
        """Queue ``frame`` for the other end; block while its queue is full (when bounded)."""
        if self._link.closed.is_set():
            raise self._disconnected()
        if not self._outbox.full():
            self._outbox.put_nowait(frame)
            return
        await self._until_closed(self._outbox.put(frame))

    async def recv(self) -> bytes:
        """Return the next frame from the other end."""
        if not self._inbox.empty():
            return self._inbox.get_nowait()
        if self._link.closed.is_set():
            raise self._disconnected()
        try:
            return await self._until_closed(self._inbox.get())
        except PeerDisconnected:
            if not self._inbox.empty():  # arrived together with the close
                return self._inbox.get_nowait()
            raise

    async def close(self, reason: str = "") -> None:
        """Close both ends; idempotent."""
        self.close_reasons.append(reason)
        if not self._link.closed.is_set():
            self._link.reason = reason
            self._link.closed.set()

    def rtt_s(self) -> float:
        """No pings in memory: always 0."""
        return 0.0


def channel_pair(peer_a: str, peer_b: str, *, maxsize: int = 0) -> tuple[MemoryChannel, MemoryChannel]:
    """
    Connect node ``peer_a`` and node ``peer_b`` in memory (call inside a running loop).

    Args:
        peer_a: Node id of the first node.
        peer_b: Node id of the second node.
        maxsize: Frames buffered per direction before ``send()`` blocks (0: unbounded).

    Returns:
        ``(channel held by peer_a, channel held by peer_b)``. Each ``peer_id`` is the *other*
        node's id, as a real channel's; the first one is the dialer.
    """
    link = _Link()
    a_to_b: asyncio.Queue[bytes] = asyncio.Queue(maxsize)
    b_to_a: asyncio.Queue[bytes] = asyncio.Queue(maxsize)
    return (
        MemoryChannel(peer_b, link, b_to_a, a_to_b, dialed=True),
        MemoryChannel(peer_a, link, a_to_b, b_to_a, dialed=False),
    )


SAMPLE_BOB = "IR7EYQY-BOB"
SAMPLE_CAROL = "K2PZQ4M-CAROL"


def sample_status() -> dict[str, Any]:
    """A realistic daemon status object (a fresh copy): two peers (bob connected, carol not), two contexts."""
    return {
        "node_id": "IAR6I7S-ALICE",
        "name": "alice",
        "version": "0.1.0",
        "listen": "127.0.0.1:47101",
        "contexts": {"tasks": {"entries": 2, "tombstones": 1, "version": 4}, "notes": {"entries": 0, "version": 1}},
        "peers": [
            {
                "node_id": SAMPLE_BOB,
                "name": "bob",
                "addr": "127.0.0.1:47111",
                "connected": True,
                "rtt_ms": 5.0,
                "rtt_p50_ms": 4.0,
                "rtt_p90_ms": 9.5,
                "rtt_p99_ms": 20.0,
                "sent_bytes": 217,
                "received_bytes": 416,
                "sent_updates": 1,
                "received_updates": 3,
                "queued_bytes": 0,
                "queued_frames": 0,
                "reconnects": 0,
                "protocol_errors": 0,
                "last_error": None,
                "contexts": {
                    "tasks": {
                        "in_sync": True,
                        "updates_behind": 0,
                        "bytes_behind": 0,
                        "replication_lag_ms": 12.5,
                        "ack_lag_ms": 7.0,
                        "out_of_sync_s": 0.0,
                    },
                    "notes": {
                        "in_sync": False,
                        "updates_behind": 3,
                        "bytes_behind": 120,
                        "replication_lag_ms": None,
                        "ack_lag_ms": None,
                        "out_of_sync_s": 4.0,
                    },
                },
            },
            {
                "node_id": SAMPLE_CAROL,
                "name": "carol",
                "addr": None,
                "connected": False,
                "rtt_ms": None,
                "rtt_p50_ms": None,
                "rtt_p90_ms": None,
                "rtt_p99_ms": None,
                "sent_bytes": 0,
                "received_bytes": 0,
                "sent_updates": 0,
                "received_updates": 0,
                "queued_bytes": 2048,
                "queued_frames": 2,
                "reconnects": 4,
                "protocol_errors": 1,
                "last_error": "Connect call failed",
                "contexts": {
                    "tasks": {
                        "in_sync": False,
                        "updates_behind": None,
                        "bytes_behind": None,
                        "replication_lag_ms": None,
                        "ack_lag_ms": None,
                        "out_of_sync_s": 75.0,
                    },
                },
            },
        ],
        "process": {
            "rss_bytes": 49_799_168,
            "cpu_percent": 1.5,
            "num_fds": 16,
            "num_threads": 2,
            "uptime_s": 9.7,
        },
        "node": {
            "updates_in_per_s": 0.5,
            "updates_out_per_s": 0.1,
            "updates_in_total": 40,
            "updates_out_total": 7,
            "loop_lag_ms": 0.8,
            "loop_stalls_total": 2,
            "last_loop_stall_s": 6.25,
            "contexts_loaded": 3,
            "context_loads_total": 11,
            "context_unloads_total": 12,
        },
        "store": {
            "path": "/home/me/.ctxsync/store.db",
            "size_bytes": 131_440,
            "commits": 4,
            "appends": 4,
            "compactions": 0,
            "compaction_failures": 0,
            "last_compaction_error": None,
            "failing": False,
        },
        "alerts": [],
    }
