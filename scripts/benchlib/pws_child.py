"""
Child processes of the pycrdt-websocket side of ``scripts/bench``.

Run as ``python -m benchlib.pws_child server PORT`` or ``python -m benchlib.pws_child client URL``.
A child reads one JSON command per line on stdin and writes one JSON event per line on stdout.
Timestamps are ``time.monotonic()`` (CLOCK_MONOTONIC, system-wide on Linux), so the driver can
compare them across processes.

* ``server``: a :class:`pycrdt.websocket.WebsocketServer` with ``auto_clean_rooms=False`` (a
  room keeps its document when its last client leaves), served by ``websockets`` with
  compression off and every other ``websockets`` setting at its default (``max_size`` 1 MiB).
  It answers ``count`` (``room``, ``root``) with the number of keys of that map in that room.
* ``client``: one ``pycrdt.Doc`` kept for the life of the process, synced through
  :class:`pycrdt.Provider` (what pycrdt-websocket's docs call the WebsocketProvider) over a
  ``websockets`` connection, compression off. The document's roots are the :data:`ROOTS` maps,
  one per workload.

Client commands (``{"op": ...}``):

* ``connect`` (``max_size``: int or null, default websockets' 1 MiB): open the websocket and
  start the provider; answers ``connected`` with ``t`` (before the dial). ``closed`` is emitted
  if the connection later drops (``code``, ``reason``).
* ``disconnect``: stop the provider, close the websocket; answers ``disconnected``.
* ``watch`` (``root``): emit ``seen`` (``key``, ``t``) for every key added to that map.
* ``expect`` (``root``, ``n``): emit ``reached`` (``root``, ``t``) once that map has had ``n``
  keys added since the process started.
* ``write`` (``root``, ``key``, ``value``): one transaction; answers ``wrote`` with ``t`` taken
  just before it.
* ``write_many`` (``root``, ``prefix``, ``n``, ``batch``): ``n`` keys, ``batch`` keys per
  transaction, as fast as possible (yielding to the event loop every 64 transactions so the
  provider sends while writing); answers ``wrote_many`` with ``t0`` (first write) and ``t1``.
* ``count`` (``root``): answers ``count`` with the number of keys added to that map.
* ``quit``: exit.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from typing import Any

from websockets.exceptions import ConnectionClosed

ROOTS = ("lat", "tput", "catchup", "big")


def emit(**ev: Any) -> None:
    sys.stdout.write(json.dumps(ev) + "\n")
    sys.stdout.flush()


def stdin_queue(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[dict[str, Any] | None]:
    """Lines of stdin as parsed commands on an asyncio queue (None at EOF), read by a thread."""
    q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def reader() -> None:
        for line in sys.stdin:
            if line.strip():
                loop.call_soon_threadsafe(q.put_nowait, json.loads(line))
        loop.call_soon_threadsafe(q.put_nowait, None)

    threading.Thread(target=reader, daemon=True).start()
    return q


class WsChannel:
    """A ``websockets`` connection as a pycrdt ``Channel`` (like pycrdt-websocket's HttpxWebsocket)."""

    def __init__(self, ws: Any, path: str) -> None:
        self._ws = ws
        self._path = path

    @property
    def path(self) -> str:
        return self._path

    def __aiter__(self) -> WsChannel:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.recv()
        except ConnectionClosed:
            raise StopAsyncIteration() from None

    async def send(self, message: bytes) -> None:
        await self._ws.send(message)

    async def recv(self) -> bytes:
        msg = await self._ws.recv()
        return msg if isinstance(msg, bytes) else msg.encode()


async def run_server(port: int) -> None:
    import logging

    from pycrdt import Map
    from pycrdt.websocket import WebsocketServer, exception_logger
    from websockets.asyncio.server import serve

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    server = WebsocketServer(auto_clean_rooms=False, exception_handler=exception_logger)

    async def handler(ws: Any) -> None:
        await server.serve(WsChannel(ws, ws.request.path))

    commands = stdin_queue(asyncio.get_running_loop())
    async with server, serve(handler, "127.0.0.1", port, compression=None):
        emit(ev="ready")
        while (cmd := await commands.get()) is not None and cmd.get("op") != "quit":
            if cmd.get("op") == "count":
                room = server.rooms.get(cmd["room"])
                n = len(room.ydoc.get(cmd["root"], type=Map)) if room is not None else 0
                emit(ev="count", n=n)


class ClientRole:
    def __init__(self, url: str) -> None:
        from pycrdt import Doc, Map

        self.url = url
        self.doc = Doc()
        self.maps = {name: self.doc.get(name, type=Map) for name in ROOTS}
        self.added = dict.fromkeys(ROOTS, 0)
        self.watching: set[str] = set()
        self.expect: dict[str, int] = {}
        self.task: asyncio.Task[None] | None = None
        self.ws: Any = None
        for name, m in self.maps.items():
            m.observe(self._observer(name))

    def _observer(self, root: str) -> Any:
        def callback(event: Any) -> None:
            self._on_change(root, event)

        return callback

    def _on_change(self, root: str, event: Any) -> None:
        t = time.monotonic()
        added = [k for k, ch in event.keys.items() if ch.get("action") == "add"]
        self.added[root] += len(added)
        if root in self.watching:
            for k in added:
                emit(ev="seen", key=k, t=t)
        n = self.expect.get(root)
        if n is not None and self.added[root] >= n:
            del self.expect[root]
            emit(ev="reached", root=root, t=t)

    async def connect(self, max_size: int | None | str) -> None:
        from pycrdt import Provider
        from websockets.asyncio.client import connect

        t = time.monotonic()
        kwargs: dict[str, Any] = {"compression": None}
        if max_size != "default":
            kwargs["max_size"] = max_size
        ws = await connect(self.url, **kwargs)
        self.ws = ws
        emit(ev="connected", t=t)

        async def run() -> None:
            try:
                async with Provider(self.doc, WsChannel(ws, self.url)):
                    await ws.wait_closed()
            except Exception as exc:  # noqa: BLE001 - report, the driver decides
                emit(ev="provider_error", error=repr(exc))
            if ws is self.ws:
                await ws.wait_closed()
                exc = ws.protocol.close_exc
                sent = exc.sent if isinstance(exc, ConnectionClosed) else None
                emit(
                    ev="closed",
                    code=sent.code if sent else ws.close_code,
                    reason=sent.reason if sent else ws.close_reason,
                )

        self.task = asyncio.create_task(run())

    async def disconnect(self) -> None:
        ws, task = self.ws, self.task
        self.ws, self.task = None, None
        if ws is not None:
            await ws.close()
        if task is not None:
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: BLE001
                pass
        emit(ev="disconnected")

    async def write_many(self, root: str, prefix: str, n: int, batch: int) -> None:
        m = self.maps[root]
        t0 = time.monotonic()
        i = tx = 0
        while i < n:
            with self.doc.transaction():
                for j in range(i, min(i + batch, n)):
                    m[f"{prefix}{j:07d}"] = j
            i += batch
            tx += 1
            if tx % 64 == 0:
                await asyncio.sleep(0)
        emit(ev="wrote_many", t0=t0, t1=time.monotonic())

    async def serve(self) -> None:
        commands = stdin_queue(asyncio.get_running_loop())
        emit(ev="ready")
        while (cmd := await commands.get()) is not None:
            op = cmd["op"]
            if op == "quit":
                break
            if op == "connect":
                await self.connect(cmd.get("max_size", "default"))
            elif op == "disconnect":
                await self.disconnect()
            elif op == "watch":
                self.watching.add(cmd["root"])
                emit(ev="ok")
            elif op == "expect":
                if self.added[cmd["root"]] >= cmd["n"]:
                    emit(ev="reached", root=cmd["root"], t=time.monotonic())
                else:
                    self.expect[cmd["root"]] = cmd["n"]
                emit(ev="ok")
            elif op == "write":
                t = time.monotonic()
                with self.doc.transaction():
                    self.maps[cmd["root"]][cmd["key"]] = cmd["value"]
                emit(ev="wrote", t=t)
            elif op == "write_many":
                await self.write_many(cmd["root"], cmd["prefix"], cmd["n"], cmd["batch"])
            elif op == "count":
                emit(ev="count", n=self.added[cmd["root"]])
            else:
                emit(ev="error", error=f"unknown op {op!r}")
        if self.ws is not None:
            await self.disconnect()


def main(argv: list[str]) -> None:
    role = argv[0]
    if role == "server":
        asyncio.run(run_server(int(argv[1])))
    elif role == "client":
        asyncio.run(ClientRole(argv[1]).serve())
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
