"""
Python client of the local API (:mod:`ctxsync.api`), used by the CLI and by applications.

Example::

    async with Client.for_home("~/.ctxsync") as c:
        await c.set("tasks", "build", '{"status": "ok"}')   # returns once durable
        print(await c.get("tasks", "build"))                 # {"key": ..., "value": {...}, ...}
        async for change in c.watch("tasks"):
            print(change)

Imports only websockets and the standard library, so short-lived CLI calls start fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import tomllib
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from ctxsync.config import format_hostport, parse_hostport
from ctxsync.errors import ApiError, ConfigError, NotFound

TOKEN_FILE = "api.token"


class Client:
    """
    A connection to one daemon's local API.

    Args:
        url: ``ws://host:port/`` of the API listener.
        token: The API token (contents of the home's ``api.token``).
        open_timeout: Connection timeout in seconds.

    Raises (from every request):
        ApiError: The daemon is not running (``code="unavailable"``), refused the token
            (``"unauthorized"``) or the request (``"bad_request"``, ``"store_error"``, ...).
        NotFound: No such context or key (also an ``ApiError`` code ``"not_found"``).
    """

    def __init__(self, url: str, token: str, *, open_timeout: float = 5.0) -> None:
        self.url = url
        self.token = token
        self.open_timeout = open_timeout
        self._conn: ClientConnection | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._streams: dict[int, asyncio.Queue[dict[str, Any] | None]] = {}
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    def for_home(cls, home: str | Path, *, env: Mapping[str, str] | None = None, **kwargs: Any) -> Client:
        """
        Build a client from a home directory's config.toml (``node.api``) and ``api.token``.

        ``env`` may carry ``CTXSYNC_API`` (``HOST:PORT``), which overrides ``node.api`` as it
        does for the daemon.
        """
        home = Path(home).expanduser()
        try:
            cfg = tomllib.loads((home / "config.toml").read_text())
            api = (env or {}).get("CTXSYNC_API") or cfg["node"]["api"]
            token = (home / TOKEN_FILE).read_text().strip()
        except FileNotFoundError as exc:
            raise ApiError(f"{home} is not a ctxsync home ({exc.filename} missing): run `ctxsync init`", code="no_home") from None
        except (KeyError, TypeError, tomllib.TOMLDecodeError) as exc:
            raise ApiError(f"{home / 'config.toml'}: cannot read node.api ({exc})", code="bad_config") from None
        try:
            host, port = parse_hostport(str(api), key="node.api", path=str(home / "config.toml"))
        except ConfigError as exc:
            raise ApiError(str(exc), code="bad_config") from None
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return cls(f"ws://{format_hostport(host, port)}/", token, **kwargs)

    async def __aenter__(self) -> Client:
        try:
            self._conn = await connect(
                self.url,
                additional_headers={"Authorization": f"Bearer {self.token}"},
                compression=None,
                proxy=None,
                open_timeout=self.open_timeout,
                max_size=None,
                ping_interval=None,
                user_agent_header=None,
            )
        except InvalidStatus as exc:
            code = exc.response.status_code
            raise ApiError(
                f"the daemon refused the connection (HTTP {code}): check the API token",
                code="unauthorized" if code == 401 else "forbidden",
            ) from None
        except (OSError, TimeoutError) as exc:
            raise ApiError(f"cannot reach the daemon at {self.url} ({exc}): is `ctxsync run` running?", code="unavailable") from None
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        if self._conn:
            await self._conn.close()

    async def _read(self) -> None:
        assert self._conn is not None
        try:
            async for raw in self._conn:
                msg = json.loads(raw)
                rid = msg.get("id")
                if "event" in msg:
                    q = self._streams.get(rid)
                    if q is not None:
                        q.put_nowait(msg)
                    continue
                fut = self._waiting.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except ConnectionClosed:
            pass
        finally:
            err = ApiError("the daemon closed the connection", code="unavailable")
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(err)
            for q in self._streams.values():
                q.put_nowait(None)

    async def _send(self, op: str, fields: dict[str, Any]) -> tuple[int, asyncio.Future[Any]]:
        if self._conn is None:
            raise ApiError("client is not connected: use `async with`", code="unavailable")
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            await self._conn.send(json.dumps({"id": rid, "op": op, **fields}))
        except ConnectionClosed:
            raise ApiError("the daemon closed the connection", code="unavailable") from None
        return rid, fut

    @staticmethod
    def _result(msg: dict[str, Any]) -> Any:
        if msg.get("ok"):
            return msg.get("result")
        err = msg.get("error") or {}
        code, message = err.get("code", "error"), err.get("message", "request failed")
        if code == "not_found":
            raise NotFound(message)
        raise ApiError(message, code=code)

    async def request(self, op: str, **fields: Any) -> Any:
        """Send one request and return its ``result``."""
        _, fut = await self._send(op, fields)
        return self._result(await fut)

    # -- convenience -----------------------------------------------------------------

    async def set(self, context: str, key: str, value_json: str) -> int:
        """Set one entry (``value_json`` is JSON text); return the context version once durable."""
        return int((await self.request("set", context=context, items=[[key, value_json]]))["version"])

    async def set_many(self, context: str, items: list[tuple[str, str | None]]) -> int:
        """Set/delete many entries in one durable transaction; return the version."""
        return int((await self.request("set", context=context, items=[list(i) for i in items]))["version"])

    async def delete(self, context: str, key: str) -> bool:
        """Delete an entry; return False if it was absent."""
        return bool((await self.request("set", context=context, items=[[key, None]]))["changed"])

    async def get(self, context: str, key: str, *, conflicts: bool = False) -> dict[str, Any]:
        """Return ``{"key", "value", "writer", "t"[, "conflicts"]}``; NotFound if absent."""
        return dict(await self.request("get", context=context, key=key, conflicts=conflicts))

    async def get_all(self, context: str, prefix: str = "") -> dict[str, Any]:
        """Return the whole context as ``{key: value}``; NotFound for an unknown context."""
        return dict(await self.request("get", context=context, prefix=prefix))

    async def keys(self, context: str, prefix: str = "") -> list[str]:
        """Return the sorted keys of a context."""
        return list(await self.request("keys", context=context, prefix=prefix))

    async def status(self) -> dict[str, Any]:
        """Return the daemon's status object (see docs/operations.md)."""
        return dict(await self.request("status"))

    async def invite(
        self, *, contexts: list[str] | None = None, read_only: bool = False, ttl_s: float = 300.0, addr: str | None = None
    ) -> dict[str, Any]:
        """
        Open a pairing invite on the daemon (``ctxsync invite``).

        Args:
            contexts: Contexts the joiner will share (``None`` or ``["*"]``: all).
            read_only: Refuse the joiner's updates.
            ttl_s: Lifetime of the invite, in seconds (1..86400).
            addr: Host the joiner should dial (default: the sync listener's address).

        Returns:
            ``{"token": str, "expires_at": ISO 8601 UTC, "node_id": str, "addr": "HOST:PORT"}``.
        """
        req: dict[str, Any] = {"contexts": contexts or ["*"], "read_only": read_only, "ttl_s": ttl_s}
        if addr is not None:
            req["addr"] = addr
        return dict(await self.request("invite", **req))

    async def reload_peers(self) -> int:
        """Ask the daemon to re-read peers.toml; return its peer count."""
        return int((await self.request("reload_peers"))["peers"])

    async def watch(
        self, context: str | None, prefix: str = "", *, on_ready: Callable[[], None] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """
        Yield one dict per change (``context, key, value, deleted, origin, version``) until the daemon stops.

        ``on_ready`` is called once the daemon has confirmed the subscription: no change
        made after that call is missed.
        """
        rid, fut = await self._send("watch", {"context": context, "prefix": prefix})
        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._streams[rid] = q
        try:
            self._result(await fut)
            if on_ready is not None:
                on_ready()
            while True:
                msg = await q.get()
                if msg is None or msg.get("event") == "end":
                    return
                if msg.get("event") == "overflow":
                    raise ApiError("watch fell behind and was dropped by the daemon", code="overflow")
                msg.pop("id", None)
                msg.pop("event", None)
                yield msg
        finally:
            self._streams.pop(rid, None)
