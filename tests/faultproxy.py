"""
A TCP fault proxy for integration tests: put it between two daemons and break the link.

:class:`FaultProxy` listens on ``127.0.0.1`` (an OS-chosen port) and forwards every accepted
connection to one loopback ``target``. It runs its own asyncio event loop in a background
thread, so synchronous tests drive it directly; every mode can be changed at any time from
any thread and takes effect before the setter returns.

Modes (they combine):

* pass-through (the default);
* :attr:`FaultProxy.delay_s`: latency added to every chunk, in each direction, in seconds
  (a pipeline: chunks keep flowing, each ``delay_s`` late, so throughput is not divided);
* :attr:`FaultProxy.bandwidth_bytes_per_s`: a cap per direction, shared by all connections;
* :meth:`FaultProxy.blackhole` / :meth:`FaultProxy.heal`: stop forwarding in both directions
  without closing anything (no FIN, no RST reaches either side, and the proxy stops reading,
  so TCP flow control backs up as on a stalled path). New connections are still accepted, but
  nothing is forwarded for them until :meth:`heal`;
* :meth:`FaultProxy.refuse`: reset every *new* connection at once (a peer that is down);
* :meth:`FaultProxy.reset_all`: abort every live connection with an RST on both sides;
* :meth:`FaultProxy.cut_after`: forward ``n`` more bytes in one direction, then reset that
  connection (one shot).

Counters (read any time): :attr:`bytes_c2s`, :attr:`bytes_s2c` (bytes written onward, client to
server and server to client), :attr:`connections_accepted`, :attr:`accept_times` (monotonic
seconds), :attr:`resets` (connections this proxy aborted), :attr:`cuts`.

"client" is the side that connected to the proxy, "server" is ``target``. Memory is bounded:
at most ``queue_chunks`` chunks of ``chunk_bytes`` are held per direction and connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

C2S = "c2s"
"""Direction: from the connecting client to the target server."""
S2C = "s2c"
"""Direction: from the target server back to the client."""

_SLICE_BYTES = 16384
"""Pacing granularity of the bandwidth cap, in bytes."""
_LINGER_TIMEOUT_S = 10.0
"""After one direction ends (EOF), the longest wait for the other before closing, in seconds."""
_CONNECT_TIMEOUT_S = 5.0
"""Limit of the upstream TCP connect, in seconds."""
_CALL_TIMEOUT_S = 10.0
"""Limit of one control call from the test thread into the proxy loop, in seconds."""


def _rst(writer: asyncio.StreamWriter | None) -> None:
    """Abort ``writer``'s connection with an RST (SO_LINGER 0, then close)."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's stream and, once connected, the server's."""

    client_r: asyncio.StreamReader
    client_w: asyncio.StreamWriter
    server_r: asyncio.StreamReader | None = None
    server_w: asyncio.StreamWriter | None = None
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    ended: set[str] = field(default_factory=set)
    closed: bool = False
    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    """Cleared while this connection alone is blackholed (``blackhole(new_connections=False)``)."""


class FaultProxy:
    """
    Forward ``127.0.0.1:<port>`` to ``target`` and inject faults on demand.

    Args:
        target: ``(host, port)`` to forward to; must be a loopback address.
        chunk_bytes: Largest read from a socket, in bytes.
        queue_chunks: Chunks held per direction and connection before the proxy stops
            reading (backpressure), so at most ``chunk_bytes * queue_chunks`` bytes each way.
        rcvbuf_bytes: If set, SO_RCVBUF of the proxy's sockets, in bytes (fixed, no kernel
            autotuning), so that a stalled proxy pushes back on the senders sooner.

    Use as a context manager (``with FaultProxy(target=(host, port)) as proxy: proxy.port``),
    or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        chunk_bytes: int = 65536,
        queue_chunks: int = 16,
        rcvbuf_bytes: int | None = None,
    ) -> None:
        if not ipaddress.ip_address(target[0]).is_loopback:
            raise ValueError(f"FaultProxy forwards to loopback only, not {target[0]!r}")
        self.target = (target[0], int(target[1]))
        self.chunk_bytes = chunk_bytes
        self.queue_chunks = queue_chunks
        self.rcvbuf_bytes = rcvbuf_bytes
        self.port = 0
        """The port the proxy listens on (127.0.0.1), known after :meth:`start`."""
        # Counters: written on the loop thread only; plain ints, safe to read anywhere.
        self.bytes_c2s = 0
        """Bytes forwarded client -> server."""
        self.bytes_s2c = 0
        """Bytes forwarded server -> client."""
        self.connections_accepted = 0
        """Connections accepted (refused and blackholed ones included)."""
        self.accept_times: list[float] = []
        """``time.monotonic()`` of every accept, in seconds."""
        self.resets = 0
        """Connections this proxy aborted with an RST (reset_all, cut_after, refuse, upstream down)."""
        self.cuts = 0
        """Times a :meth:`cut_after` budget ran out and its connection was reset."""
        # Modes: changed on the loop thread only (through _call).
        self._delay_s = 0.0
        self._bandwidth: float | None = None
        self._refusing = False
        self._cut: tuple[str, int, str] | None = None
        self._next_send = {C2S: 0.0, S2C: 0.0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the loop thread and the listener; return once :attr:`port` is bound."""
        assert self._thread is None, "already started"
        loop = asyncio.new_event_loop()
        self._loop = loop
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run_loop, args=(loop, ready), name="faultproxy", daemon=True
        )
        self._thread.start()
        if not ready.wait(_CALL_TIMEOUT_S):
            raise RuntimeError("fault proxy loop did not start")
        fut = asyncio.run_coroutine_threadsafe(self._open(), loop)
        self.port = fut.result(_CALL_TIMEOUT_S)

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()

    async def _open(self) -> int:
        self._flowing = asyncio.Event()
        self._flowing.set()
        sock = self._socket()
        sock.bind(("127.0.0.1", 0))
        self._server = await asyncio.start_server(self._on_accept, sock=sock)
        return int(self._server.sockets[0].getsockname()[1])

    def _socket(self) -> socket.socket:
        """A non-blocking TCP socket, with SO_RCVBUF set if asked (before connect/listen)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if self.rcvbuf_bytes is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf_bytes)
        return sock

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = self._socket()
        try:
            await asyncio.get_running_loop().sock_connect(sock, self.target)
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, limit=self.chunk_bytes)

    def stop(self) -> None:
        """Close the listener and every connection, stop the loop and join its thread (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(_CALL_TIMEOUT_S)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(_CALL_TIMEOUT_S)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            self._abort(link, rst=False)
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_CALL_TIMEOUT_S / 2)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), _CALL_TIMEOUT_S / 2)
        # Let the aborted transports run their connection_lost callbacks.
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    # -- control from the test thread --------------------------------------------------

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the proxy loop and return its result (thread-safe, bounded wait)."""
        loop = self._loop
        assert loop is not None, "the proxy is not running"

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(_CALL_TIMEOUT_S)

    @property
    def delay_s(self) -> float:
        """Latency added to every chunk in each direction, in seconds (0: none)."""
        return self._delay_s

    @delay_s.setter
    def delay_s(self, value: float) -> None:
        if value < 0:
            raise ValueError("delay_s must be >= 0")
        self._call(lambda: setattr(self, "_delay_s", float(value)))

    @property
    def bandwidth_bytes_per_s(self) -> float | None:
        """Cap of each direction, in bytes per second, shared by all connections (None: no cap)."""
        return self._bandwidth

    @bandwidth_bytes_per_s.setter
    def bandwidth_bytes_per_s(self, value: float | None) -> None:
        if value is not None and value <= 0:
            raise ValueError("bandwidth_bytes_per_s must be > 0 or None")
        self._call(lambda: setattr(self, "_bandwidth", None if value is None else float(value)))

    @property
    def blackholed(self) -> bool:
        """True between :meth:`blackhole` and :meth:`heal`."""
        return self._flowing is not None and not self._flowing.is_set()

    @property
    def live_connections(self) -> int:
        """Connections currently held open by the proxy."""
        return len(self._links)

    def blackhole(self, *, new_connections: bool = True) -> None:
        """
        Stop forwarding in both directions, closing nothing: no FIN and no RST reach either
        side, and the proxy stops reading (at most the chunks already read are held).

        Args:
            new_connections: True (the default): the whole path is dead; new connections are
                still accepted but held, unforwarded, until :meth:`heal`. False: only the
                connections open now go silent (half-open connections, as after a NAT or
                Wi-Fi change); new ones are forwarded normally.
        """

        def go() -> None:
            assert self._flowing is not None
            if new_connections:
                self._flowing.clear()
            for link in self._links:
                link.flowing.clear()

        self._call(go)

    def refuse(self) -> None:
        """Reset every *new* connection as soon as it is accepted, until :meth:`heal`."""
        self._call(lambda: setattr(self, "_refusing", True))

    def heal(self) -> None:
        """End :meth:`blackhole` and :meth:`refuse`: what was held flows on, new connections are served."""

        def go() -> None:
            assert self._flowing is not None
            self._refusing = False
            self._flowing.set()
            for link in self._links:
                link.flowing.set()

        self._call(go)

    def reset_all(self) -> int:
        """Abort every live connection with an RST to both sides; return how many."""

        def go() -> int:
            links = list(self._links)
            for link in links:
                self._abort(link, rst=True)
            return len(links)

        return self._call(go)

    def cut_after(self, n_bytes: int, direction: str = S2C, *, then: str = "reset") -> None:
        """
        Forward ``n_bytes`` more bytes in ``direction`` (counted over all connections), then
        reset the connection that carried the last of them (RST both sides), or, with
        ``then="blackhole"``, call :meth:`blackhole` (the exact byte count is then held, not
        lost). One shot: :attr:`cuts` counts the cuts done.

        Args:
            n_bytes: Bytes still forwarded before the cut (>= 0).
            direction: :data:`S2C` (server to client, the default) or :data:`C2S`.
            then: ``"reset"`` or ``"blackhole"``.
        """
        if n_bytes < 0 or direction not in (C2S, S2C) or then not in ("reset", "blackhole"):
            raise ValueError("cut_after(n_bytes >= 0, direction 's2c' or 'c2s', then 'reset' or 'blackhole')")
        self._call(lambda: setattr(self, "_cut", (direction, int(n_bytes), then)))

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of the counters and modes."""

        def go() -> dict[str, Any]:
            return {
                "bytes_c2s": self.bytes_c2s,
                "bytes_s2c": self.bytes_s2c,
                "connections_accepted": self.connections_accepted,
                "live_connections": len(self._links),
                "resets": self.resets,
                "cuts": self.cuts,
                "delay_s": self._delay_s,
                "bandwidth_bytes_per_s": self._bandwidth,
                "blackholed": self.blackholed,
                "refusing": self._refusing,
            }

        return self._call(go)

    # -- the loop side -----------------------------------------------------------------

    def _spawn(self, coro: Any, link: _Link | None = None) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if link is not None:
            link.tasks.add(task)
            task.add_done_callback(link.tasks.discard)
        return task

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_accepted += 1
        self.accept_times.append(time.monotonic())
        link = _Link(reader, writer)
        link.flowing.set()
        if self._refusing:
            self.resets += 1
            _rst(writer)
            return
        self._links.add(link)
        self._spawn(self._serve(link), link)

    async def _serve(self, link: _Link) -> None:
        assert self._flowing is not None
        await self._flowing.wait()  # accepted during a blackhole: forward nothing until heal
        try:
            server_r, server_w = await asyncio.wait_for(self._connect_upstream(), _CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError):
            self._abort(link, rst=True)  # target down: the client sees a reset, as on a refusal
            return
        if link.closed:  # reset while connecting
            _rst(server_w)
            return
        link.server_r, link.server_w = server_r, server_w
        for direction, src, dst in ((C2S, link.client_r, server_w), (S2C, server_r, link.client_w)):
            queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(self.queue_chunks)
            self._spawn(self._read_side(link, direction, src, queue), link)
            self._spawn(self._write_side(link, direction, queue, dst), link)

    async def _read_side(
        self,
        link: _Link,
        direction: str,
        src: asyncio.StreamReader,
        queue: asyncio.Queue[tuple[float, bytes] | None],
    ) -> None:
        assert self._flowing is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._gate(link)
                data = await src.read(self.chunk_bytes)
                if not data:
                    await queue.put(None)  # EOF, forwarded in order (and not while blackholed)
                    return
                await queue.put((loop.time() + self._delay_s, data))
        except Exception:  # OSError mostly; anything else must not leave the link half alive
            await self._gate(link)  # a reset does not cross a blackhole either
            self._abort(link, rst=True)

    async def _write_side(
        self,
        link: _Link,
        direction: str,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        dst: asyncio.StreamWriter,
    ) -> None:
        assert self._flowing is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                item = await queue.get()
                if item is None:
                    await self._gate(link)
                    if dst.can_write_eof():
                        dst.write_eof()
                    self._spawn(self._half_closed(link, direction), link)
                    return
                due, data = item
                wait_s = due - loop.time()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                for start in range(0, len(data), _SLICE_BYTES):
                    piece = data[start : start + _SLICE_BYTES]
                    await self._pace(direction, len(piece))
                    await self._gate(link)
                    if self._cut is not None and self._cut[0] == direction and len(piece) >= self._cut[1]:
                        cut, self._cut = self._cut, None
                        if cut[2] == "blackhole":
                            assert self._flowing is not None
                            self._flowing.clear()
                            self.cuts += 1
                            piece, rest = piece[: cut[1]], piece[cut[1] :]
                            self._count(direction, len(piece))
                            dst.write(piece)
                            await self._gate(link)  # held until heal, then sent on
                            self._count(direction, len(rest))
                            dst.write(rest)
                            await dst.drain()
                            continue
                        piece = piece[: cut[1]]
                        self._count(direction, len(piece))
                        dst.write(piece)
                        dst.transport.set_write_buffer_limits(0)
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(dst.drain(), 1.0)
                        self.cuts += 1
                        self._abort(link, rst=True)
                        return
                    if self._cut is not None and self._cut[0] == direction:
                        self._cut = (direction, self._cut[1] - len(piece), self._cut[2])
                    self._count(direction, len(piece))
                    dst.write(piece)
                    await dst.drain()
        except Exception:  # OSError mostly; anything else must not leave the link half alive
            await self._gate(link)
            self._abort(link, rst=True)

    async def _gate(self, link: _Link) -> None:
        """Return once neither a global nor this connection's blackhole is on."""
        assert self._flowing is not None
        while not (self._flowing.is_set() and link.flowing.is_set()):
            await self._flowing.wait()
            await link.flowing.wait()

    def _count(self, direction: str, n: int) -> None:
        if direction == C2S:
            self.bytes_c2s += n
        else:
            self.bytes_s2c += n

    async def _pace(self, direction: str, n: int) -> None:
        """Wait for the bandwidth cap to allow ``n`` more bytes in ``direction``."""
        rate = self._bandwidth
        if rate is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, self._next_send[direction])
        self._next_send[direction] = start + n / rate
        if start > now:
            await asyncio.sleep(start - now)

    async def _half_closed(self, link: _Link, direction: str) -> None:
        """One direction ended; close the link when both have, or after a bounded wait."""
        link.ended.add(direction)
        if len(link.ended) == 2:
            self._abort(link, rst=False)
            return
        await asyncio.sleep(_LINGER_TIMEOUT_S)
        self._abort(link, rst=False)

    def _abort(self, link: _Link, *, rst: bool) -> None:
        """Close both sides of ``link`` (with an RST when ``rst``) and cancel its tasks."""
        if link.closed:
            return
        link.closed = True
        self._links.discard(link)
        if rst:
            self.resets += 1
            _rst(link.client_w)
            _rst(link.server_w)
        else:
            link.client_w.close()
            if link.server_w is not None:
                link.server_w.close()
        current = asyncio.current_task()
        for t in list(link.tasks):
            if t is not current:
                t.cancel()
