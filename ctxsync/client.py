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
        self,
        context: str | None,
        prefix: str = "",
        *,
        glob: str | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """
        Yield one dict per change (``context, key, value, deleted, origin, version, previous``)
        until the daemon stops.

        Args:
            context: Only this context (``None``: all).
            prefix: Only keys starting with it.
            glob: Only keys matching this shell pattern (``fnmatch``: ``*``, ``?``, ``[seq]``).
            on_ready: Called once the daemon has confirmed the subscription: no change made
                after that call is missed.

        Raises:
            ApiError: ``code="overflow"`` if the watcher fell more than 10,000 changes behind.
        """
        async for batch in self._watch(context, prefix, glob, 0, on_ready):
            for change in batch:
                yield change

    async def watch_batches(
        self,
        context: str | None,
        prefix: str = "",
        *,
        glob: str | None = None,
        batch_ms: int = 100,
        on_ready: Callable[[], None] | None = None,
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """
        As :meth:`watch`, but yield lists: the changes of up to ``batch_ms`` milliseconds after
        the first one of each batch (at most 1,000 per list).
        """
        async for batch in self._watch(context, prefix, glob, batch_ms, on_ready):
            yield batch

    async def _watch(
        self, context: str | None, prefix: str, glob: str | None, batch_ms: int, on_ready: Callable[[], None] | None
    ) -> AsyncIterator[list[dict[str, Any]]]:
        fields: dict[str, Any] = {"context": context, "prefix": prefix, "batch_ms": batch_ms}
        if glob is not None:
            fields["glob"] = glob
        rid, fut = await self._send("watch", fields)
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
                if msg.get("event") == "changes":
                    yield list(msg.get("changes", []))
                    continue
                msg.pop("id", None)
                msg.pop("event", None)
                yield [msg]
        finally:
            self._streams.pop(rid, None)

    # -- history, changes, conflicts ---------------------------------------------------

    async def history(
        self, context: str, *, key: str | None = None, since: int | None = None, limit: int = 100
    ) -> dict[str, Any]:
        """
        A context's recorded changes, oldest first: the newest ``limit`` ones, or (with
        ``since``) the oldest ``limit`` after that version.

        Returns:
            ``{"context", "version", "history_from", "records": [{"version", "t_ms", "time",
            "origin", "key", "value", "previous", "deleted", "hlc"}]}``.
        """
        fields: dict[str, Any] = {"context": context, "limit": limit}
        if key is not None:
            fields["key"] = key
        if since is not None:
            fields["since"] = since
        return dict(await self.request("history", **fields))

    async def changes(self, context: str, since: int = 0, *, limit: int = 1000) -> dict[str, Any]:
        """
        Pull the changes after version ``since`` (a cursor that never skips one): whole
        versions only, at most about ``limit`` records.

        Returns:
            ``{"context", "since", "next", "version", "history_from", "truncated", "missed",
            "changes": [...]}``; pass ``next`` as the next ``since``. ``truncated`` is true when
            changes after ``since`` have already left the bounded history (``missed`` gives
            the versions lost): read the whole context again then.
        """
        return dict(await self.request("changes", context=context, since=since, limit=limit))

    async def resolve(self, context: str, key: str, value_json: str) -> dict[str, Any]:
        """
        Settle a conflict on ``key`` by writing ``value_json`` over every concurrent value.

        Returns:
            ``{"version", "replaced"}``. Raises ApiError ``bad_request`` if there is no conflict.
        """
        return dict(await self.request("resolve", context=context, key=key, value=value_json))

    async def strategy(self, context: str) -> dict[str, Any]:
        """Return the context's conflict strategy: ``{"name", "priority"}``."""
        return dict(await self.request("strategy", context=context))

    async def set_strategy(self, context: str, name: str, priority: list[str] | None = None) -> dict[str, Any]:
        """Set the strategy (``latest-wins`` or ``origin-priority`` with node ids, most preferred first)."""
        return dict(await self.request("strategy", context=context, name=name, priority=priority or []))

    # -- snapshots and restore ---------------------------------------------------------

    async def snapshot(self, context: str, *, label: str | None = None, meta: Any = None) -> dict[str, Any]:
        """Take a named snapshot; return ``{"id", "context", "time", "version", "label", "meta", ...}``."""
        return dict(await self.request("snapshot_create", context=context, label=label, meta=meta))

    async def snapshots(self, context: str | None = None) -> list[dict[str, Any]]:
        """List the snapshots (of one context, or all), oldest first."""
        return list(await self.request("snapshot_list", context=context))

    async def snapshot_show(self, snapshot_id: str) -> dict[str, Any]:
        """One snapshot with ``"content"``: the context as it was, ``{key: value}``."""
        return dict(await self.request("snapshot_show", snapshot=snapshot_id))

    async def snapshot_diff(self, snapshot_id: str, other_id: str | None = None) -> dict[str, Any]:
        """``{"added", "removed", "changed": {key: {"from", "to"}}}`` from a snapshot to another, or to now."""
        return dict(await self.request("snapshot_diff", snapshot=snapshot_id, other=other_id))

    async def snapshot_delete(self, snapshot_id: str) -> None:
        """Delete a snapshot (NotFound if there is none)."""
        await self.request("snapshot_delete", snapshot=snapshot_id)

    async def restore(self, context: str, snapshot_id: str) -> dict[str, Any]:
        """Make the context equal to a snapshot as one write: ``{"version", "changed", "recovery_point"}``."""
        return dict(await self.request("restore", context=context, snapshot=snapshot_id))

    async def adopt(self, context: str, peer: str) -> dict[str, Any]:
        """Take a peer's lineage of a context after a lineage mismatch (drops this node's own content)."""
        return dict(await self.request("adopt", context=context, peer=peer))

    # -- webhooks ----------------------------------------------------------------------

    async def webhook_add(self, context: str, url: str, *, prefix: str = "", secret: str | None = None) -> dict[str, Any]:
        """Register a webhook; the result carries its ``id`` and ``secret`` (shown only here)."""
        return dict(await self.request("webhook_add", context=context, url=url, prefix=prefix, secret=secret))

    async def webhooks(self) -> list[dict[str, Any]]:
        """List the webhooks and their delivery state."""
        return list(await self.request("webhook_list"))

    async def webhook_remove(self, webhook_id: str) -> None:
        """Remove a webhook and its dead letters (NotFound if there is none)."""
        await self.request("webhook_remove", webhook=webhook_id)

    async def webhook_failures(self, webhook_id: str | None = None) -> list[dict[str, Any]]:
        """The dead-letter list: batches not delivered after the last retry."""
        return list(await self.request("webhook_failures", webhook=webhook_id))
