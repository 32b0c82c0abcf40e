"""
Peer transport: websockets over mutual TLS 1.3, yielding :class:`Channel` objects.

Owns everything websockets- and socket-specific, and nothing else: it knows no CRDT, no
protocol message and no key beyond the TLS contexts it is given. Errors from websockets
and the OS are translated once, here, into :mod:`ctxsync.errors` (httpcore's
``map_exceptions``).

Server side, the trusted certificates can change while the listener runs: the listening
context's ``sni_callback`` swaps in the *current* context (built by the caller from the
live peer list) for every new handshake. Handshakes that fail (an unpaired node, a
revoked one) are logged as ``peer.rejected``: asyncio reports failed TLS handshakes only
in debug mode, so the listening context's ``sslobject_class`` does it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol

import structlog
import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.connection import Connection
from websockets.asyncio.server import Server, ServerConnection, serve

from ctxsync.crypto import peer_cert_node_id
from ctxsync.errors import CryptoError, HandshakeRejected, PeerDisconnected, PeerUnreachable
from ctxsync.types import TLS_SERVER_NAME, NodeId

log = structlog.get_logger("ctxsync.transport")


class Channel(Protocol):
    """A bidirectional, authenticated stream of frames with one peer."""

    peer_id: NodeId
    """Node id of the peer's verified certificate."""
    remote_address: str
    """``host:port`` of the other end, for logs."""
    dialed: bool
    """True if this node opened the connection."""

    async def send(self, frame: bytes) -> None:
        """Send one frame. Raises PeerDisconnected."""

    async def recv(self) -> bytes:
        """Receive one frame. Raises PeerDisconnected (also on a text message)."""

    async def close(self, reason: str = "") -> None:
        """Close the connection; idempotent."""

    def rtt_s(self) -> float:
        """Latest round-trip time from websocket keepalive pings, in seconds (0 before the first)."""


@contextlib.contextmanager
def map_exceptions(peer_id: str | None) -> Iterator[None]:
    """Translate websockets and OS errors raised inside the block into ctxsync errors."""
    try:
        yield
    except websockets.exceptions.ConnectionClosed as exc:
        reason = exc.rcvd.reason if exc.rcvd else (exc.sent.reason if exc.sent else "")
        code = exc.rcvd.code if exc.rcvd else (exc.sent.code if exc.sent else 1006)
        detail = f"{code} {reason}".strip()
        raise PeerDisconnected(f"connection closed ({detail})", peer_id=peer_id) from exc
    except (OSError, websockets.exceptions.InvalidHandshake, TimeoutError) as exc:
        raise PeerUnreachable(f"{type(exc).__name__}: {exc}", peer_id=peer_id) from exc


class WebsocketChannel:
    """
    A :class:`Channel` over a websockets connection (client or server side).

    Args:
        conn: The open connection.
        peer_id: The verified node id of the other end.
        dialed: True if this node opened the connection.
        stall_timeout: A send that makes no progress (the socket's write buffer does not
            shrink) for this many seconds, twice in a row, aborts the connection. websockets'
            keepalive cannot see a dead link while a large send fills the buffer, because its
            pings queue behind the data.
    """

    def __init__(self, conn: Connection, peer_id: NodeId, *, dialed: bool, stall_timeout: float = 10.0) -> None:
        self._conn = conn
        self.peer_id = peer_id
        self.dialed = dialed
        self.stall_timeout = stall_timeout
        addr = conn.remote_address
        self.remote_address = f"{addr[0]}:{addr[1]}" if addr else "?"

    async def send(self, frame: bytes) -> None:
        """
        Send one binary message. It is written to the socket before this returns or first
        suspends; it suspends only while the write buffer is above its high-water mark.

        Raises:
            PeerDisconnected: The connection closed, or the send stalled (see ``stall_timeout``).
            PeerUnreachable: An OS error.
        """
        # A timer, not a task per send: a task would put the write one event loop turn later.
        loop = asyncio.get_running_loop()
        stalled = False
        timer: asyncio.TimerHandle  # the current check, re-armed by check_progress

        def check_progress(last: int | None) -> None:
            """Abort the connection if its write buffer did not shrink since the last check."""
            nonlocal timer, stalled
            size = self._conn.transport.get_write_buffer_size()
            if last is not None and size >= last:
                stalled = True
                self._conn.transport.abort()  # the pending send then ends (ConnectionClosed or not)
                return
            timer = loop.call_later(self.stall_timeout, check_progress, size)

        timer = loop.call_later(self.stall_timeout, check_progress, None)
        try:
            with map_exceptions(self.peer_id):
                await self._conn.send(frame)
        except PeerDisconnected:
            if not stalled:
                raise
        finally:
            timer.cancel()
        if stalled:
            raise PeerDisconnected(f"send stalled: no progress for {2 * self.stall_timeout:g} s", peer_id=self.peer_id)

    async def recv(self) -> bytes:
        with map_exceptions(self.peer_id):
            data = await self._conn.recv()
        if isinstance(data, str):
            raise PeerDisconnected("peer sent a text message", peer_id=self.peer_id)
        return data

    async def close(self, reason: str = "") -> None:
        try:
            await asyncio.wait_for(self._conn.close(1000, reason[:120]), 2.0)
        except Exception:  # a dead or stalled link: drop it without the closing handshake
            self._conn.transport.abort()

    def rtt_s(self) -> float:
        return float(self._conn.latency)


def _ssl_object(conn: Connection) -> ssl.SSLObject:
    obj = conn.transport.get_extra_info("ssl_object")
    if obj is None:
        raise HandshakeRejected("connection is not TLS")
    return obj  # type: ignore[no-any-return]


class _AuditedSSLObject(ssl.SSLObject):
    """SSLObject that logs a failed server-side handshake as ``peer.rejected``."""

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            log.warning(
                "peer.rejected",
                reason=getattr(exc, "verify_message", None) or exc.reason or str(exc),
                stage="tls",
            )
            raise


def listening_context(current: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """
    Build the listener's TLS context, which defers each handshake to ``current()``.

    Args:
        current: Returns the server context to use now (own certificate + the pinned
            certificates of the peers paired at this moment).

    Returns:
        A context to pass to :func:`listen`. Its ``sni_callback`` swaps in ``current()``
        for every connection, so peers added or removed take effect on the next handshake.
    """
    base = current()

    def on_sni(obj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        obj.context = current()

    base.sni_callback = on_sni
    base.sslobject_class = _AuditedSSLObject
    return base


async def listen(
    on_channel: Callable[[WebsocketChannel], Awaitable[None]],
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext,
    max_frame_bytes: int,
    ping_interval: float,
    ping_timeout: float,
) -> Server:
    """
    Start the peer listener.

    Args:
        on_channel: Called in a new task for every authenticated connection; the
            connection closes when it returns.
        host: Address to bind.
        port: Port to bind (0 picks a free one).
        ssl_context: From :func:`listening_context`.
        max_frame_bytes: Largest incoming frame, in bytes.
        ping_interval: Keepalive ping period, in seconds.
        ping_timeout: Close when a pong is this late, in seconds.

    Returns:
        The websockets server: use as an async context manager, or ``close()`` it.

    Raises:
        PeerUnreachable: If the address cannot be bound (wraps the OSError).
    """

    async def handler(conn: ServerConnection) -> None:
        try:
            peer_id = peer_cert_node_id(_ssl_object(conn))
        except (CryptoError, HandshakeRejected) as exc:
            log.warning("peer.rejected", reason=str(exc), stage="identity")
            return
        await on_channel(WebsocketChannel(conn, peer_id, dialed=False, stall_timeout=ping_timeout))

    with map_exceptions(None):
        return await serve(
            handler,
            host,
            port,
            ssl=ssl_context,
            compression=None,
            max_size=max_frame_bytes,
            max_queue=64,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            close_timeout=2,
            server_header=None,
        )


async def dial(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext,
    expected_peer: NodeId,
    max_frame_bytes: int,
    ping_interval: float,
    ping_timeout: float,
    open_timeout: float = 10.0,
) -> WebsocketChannel:
    """
    Open a connection to a peer's listener.

    Args:
        host: Peer address.
        port: Peer port.
        ssl_context: Client context pinning exactly the peer's certificate.
        expected_peer: Node id the certificate must hash to.
        max_frame_bytes: Largest incoming frame, in bytes.
        ping_interval: Keepalive ping period, in seconds.
        ping_timeout: Close when a pong is this late, in seconds.
        open_timeout: Limit for TCP + TLS + websocket handshakes, in seconds.

    Raises:
        PeerUnreachable: Connection refused, timed out, or TLS failed (retry with backoff).
        HandshakeRejected: The peer's certificate is not the one expected.
    """
    hostpart = f"[{host}]" if ":" in host else host
    with map_exceptions(expected_peer):
        conn: ClientConnection = await connect(
            f"wss://{hostpart}:{port}/",
            ssl=ssl_context,
            server_hostname=TLS_SERVER_NAME,
            compression=None,
            proxy=None,
            max_size=max_frame_bytes,
            max_queue=64,
            open_timeout=open_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            close_timeout=2,
            user_agent_header=None,
        )
    try:
        peer_id = peer_cert_node_id(_ssl_object(conn))
    except CryptoError as exc:
        await conn.close()
        raise HandshakeRejected(str(exc), peer_id=expected_peer) from exc
    if peer_id != expected_peer:
        await conn.close()
        raise HandshakeRejected(f"peer presented {peer_id}, expected {expected_peer}", peer_id=expected_peer)
    return WebsocketChannel(conn, peer_id, dialed=True, stall_timeout=ping_timeout)
