"""
Python client of the local API (:mod:`ctxsync.api`), used by the CLI and by applications.

:class:`Client` is the async client; :class:`SyncClient` wraps it for blocking scripts.
docs/client.md describes both, with the exact shape of every result.

Example::

    async with Client.for_home("~/.ctxsync") as c:
        await c.set("tasks", "build", '{"status": "ok"}')   # returns once durable
        print(await c.get("tasks", "build"))                 # {"key": ..., "value": {...}, ...}
        async for change in c.watch("tasks"):
            print(change)

    with SyncClient.for_home("~/.ctxsync") as c:             # no event loop needed
        c.set_value("tasks", "build", {"status": "ok"})
        print(c.get_value("tasks", "build"))                 # {'status': 'ok'}

Imports only websockets and the standard library (plus ``ctxsync.config`` and
``ctxsync.errors``), so short-lived CLI calls start fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import tomllib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from ctxsync.config import format_hostport, parse_hostport
from ctxsync.errors import ApiError, ConfigError, EntryError, InvalidState, NotFound

__all__ = ["TOKEN_FILE", "Client", "SyncClient"]

TOKEN_FILE = "api.token"
"""Name of the file in a home that holds the API token."""

_T = TypeVar("_T")

_BATCH = 1024
"""Most requests the client puts in one batch message (the daemon takes up to 4,096)."""


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
        self._outbox: list[tuple[int, str]] = []
        self._flusher: asyncio.Task[None] | None = None

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
            raise ApiError(
                f"{home} is not a ctxsync home ({exc.filename} missing): run `ctxsync init`", code="no_home"
            ) from None
        except (KeyError, TypeError, tomllib.TOMLDecodeError) as exc:
            raise ApiError(
                f"{home / 'config.toml'}: cannot read node.api ({exc})", code="bad_config"
            ) from None
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
            if code == 401:
                raise ApiError(
                    f"the daemon at {self.url} refused the API token (HTTP 401): use the token of its home's {TOKEN_FILE}",
                    code="unauthorized",
                ) from None
            raise ApiError(
                f"the daemon at {self.url} refused the connection (HTTP {code}): "
                "connect to a loopback address, without an Origin header",
                code="forbidden",
            ) from None
        except (OSError, TimeoutError) as exc:
            reason = str(exc) or "timed out"
            raise ApiError(
                f"cannot reach the daemon at {self.url} ({reason}): is it running? Start it with `ctxsync run`",
                code="unavailable",
            ) from None
        except InvalidHandshake as exc:
            raise ApiError(
                f"{self.url} did not answer as a ctxsync API ({exc}): check node.api or CTXSYNC_API, "
                "and start the daemon with `ctxsync run`",
                code="unavailable",
            ) from None
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._flusher:
            self._flusher.cancel()
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
                parsed = json.loads(raw)
                for msg in parsed if isinstance(parsed, list) else (parsed,):  # a batch's answers
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
            err = ApiError("the daemon closed the connection (did it stop?)", code="unavailable")
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
        text = _request_text(rid, op, fields)
        if op == "watch":  # a stream cannot be batched
            try:
                await self._conn.send(text)
            except ConnectionClosed:
                self._waiting.pop(rid, None)
                raise ApiError("the daemon closed the connection (did it stop?)", code="unavailable") from None
            return rid, fut
        self._outbox.append((rid, text))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return rid, fut

    async def _flush(self) -> None:
        """
        Send the queued requests: the ones made in the same event loop turn go as one batch
        message (a JSON array, answered by an array), which saves a frame, a send and a
        wake-up per request on both sides when a program pipelines many.
        """
        assert self._conn is not None
        try:
            while self._outbox:
                sending, self._outbox = self._outbox[:_BATCH], self._outbox[_BATCH:]
                text = sending[0][1] if len(sending) == 1 else "[" + ",".join(t for _, t in sending) + "]"
                try:
                    await self._conn.send(text)
                except ConnectionClosed:
                    err = ApiError("the daemon closed the connection (did it stop?)", code="unavailable")
                    for rid, _ in [*sending, *self._outbox]:
                        fut = self._waiting.pop(rid, None)
                        if fut is not None and not fut.done():
                            fut.set_exception(err)
                    self._outbox.clear()
        finally:
            self._flusher = None

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

    async def set_value(self, context: str, key: str, value: Any) -> int:
        """
        Set one entry to a Python value, encoded with ``json.dumps``; return the version once durable.

        Raises:
            EntryError: ``value`` cannot be encoded as JSON (a set, NaN, ...); nothing was sent.
        """
        return await self.set(context, key, _dumps(key, value))

    async def set_values(self, context: str, values: Mapping[str, Any]) -> int:
        """
        Set many entries from Python values in one durable transaction; return the version.

        ``None`` is stored as JSON ``null``, not deleted: use :meth:`set_many` to delete keys
        in the same transaction.

        Raises:
            EntryError: A value cannot be encoded as JSON; nothing was sent.
        """
        return await self.set_many(context, [(k, _dumps(k, v)) for k, v in values.items()])

    async def get_value(self, context: str, key: str, default: Any = None) -> Any:
        """Return an entry's value, parsed from JSON, or ``default`` if the key or context is absent."""
        try:
            entry = await self.get(context, key)
        except NotFound:
            return default
        return entry["value"]

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
        self,
        *,
        contexts: list[str] | None = None,
        read_only: bool = False,
        ttl_s: float = 300.0,
        addr: str | None = None,
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
    ) -> AsyncGenerator[dict[str, Any], None]:
        """
        Yield one dict per change (``context, key, value, deleted, origin, version, previous``)
        until the daemon stops.

        Args:
            context: Only this context (``None``: all).
            prefix: Only keys starting with it.
            glob: Only keys matching this shell pattern (``fnmatch``: ``*``, ``?``, ``[seq]``).
            on_ready: Called once the daemon has confirmed the subscription: no change made
                after that call is missed.

        Closing the iterator (``break``, ``aclose()``, cancelling the task) stops it here and
        sends ``unwatch``, so the daemon ends the subscription; changes already on their way are
        dropped on arrival.

        Raises:
            ApiError: ``code="overflow"`` if the watcher fell more than 10,000 changes behind.
        """
        async with contextlib.aclosing(self._watch(context, prefix, glob, 0, on_ready)) as batches:
            async for batch in batches:
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
    ) -> AsyncGenerator[list[dict[str, Any]], None]:
        """
        As :meth:`watch`, but yield lists: the changes of up to ``batch_ms`` milliseconds after
        the first one of each batch (at most 1,000 per list).
        """
        async with contextlib.aclosing(self._watch(context, prefix, glob, batch_ms, on_ready)) as batches:
            async for batch in batches:
                yield batch

    async def _watch(
        self,
        context: str | None,
        prefix: str,
        glob: str | None,
        batch_ms: int,
        on_ready: Callable[[], None] | None,
    ) -> AsyncGenerator[list[dict[str, Any]], None]:
        fields: dict[str, Any] = {"context": context, "prefix": prefix, "batch_ms": batch_ms}
        if glob is not None:
            fields["glob"] = glob
        rid, fut = await self._send("watch", fields)
        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._streams[rid] = q
        running = False  # the daemon's side of the watch, as far as this client knows
        try:
            self._result(await fut)
            running = True
            if on_ready is not None:
                on_ready()
            while True:
                msg = await q.get()
                if msg is None or msg.get("event") == "end":
                    running = False
                    return
                if msg.get("event") == "overflow":
                    running = False
                    raise ApiError("watch fell behind and was dropped by the daemon", code="overflow")
                if msg.get("event") == "changes":
                    yield list(msg.get("changes", []))
                    continue
                msg.pop("id", None)
                msg.pop("event", None)
                yield [msg]
        finally:
            self._streams.pop(rid, None)
            if running:  # closed early: tell the daemon (no wait for its answer; _send does not block)
                with contextlib.suppress(ApiError):
                    _, done = await self._send("unwatch", {"watch": rid})
                    done.add_done_callback(lambda f: f.cancelled() or f.exception())

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

    async def set_strategy(
        self, context: str, name: str, priority: list[str] | None = None
    ) -> dict[str, Any]:
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

    async def webhook_add(
        self, context: str, url: str, *, prefix: str = "", secret: str | None = None
    ) -> dict[str, Any]:
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


def _request_text(rid: int, op: str, fields: dict[str, Any]) -> str:
    """
    A request as JSON text: ``{"id": rid, "op": op, **fields}``.

    A ``set`` of string keys and values (JSON text, or ``None`` to delete) is put together from
    its strings, each escaped by the stdlib's C string encoder, as ``json.dumps`` would escape
    it: 1.3 µs against 5.0 for ``json.dumps`` of the dict, which a program pipelining writes pays
    per request. Anything else, malformed sets included (the daemon answers those with
    ``bad_request``), goes through ``json.dumps``.
    """
    if op == "set" and len(fields) == 2:
        context, items = fields.get("context"), fields.get("items")
        if type(context) is str and type(items) is list and all(_is_set_item(it) for it in items):
            return '{"id":%d,"op":"set","context":%s,"items":[%s]}' % (  # noqa: UP031  (the fastest here)
                rid,
                _encode_str(context),
                ",".join(["[" + _encode_str(k) + "," + ("null" if v is None else _encode_str(v)) + "]" for k, v in items]),
            )
    return json.dumps({"id": rid, "op": op, **fields})


def _is_set_item(item: object) -> bool:
    """Whether ``item`` is ``[key, value_json_or_None]`` with a string key (what the fast path encodes)."""
    return type(item) is list and len(item) == 2 and type(item[0]) is str and (item[1] is None or type(item[1]) is str)


_encode_str: Callable[[str], str] = json.encoder.encode_basestring_ascii
"""A string as a JSON string literal, non-ASCII escaped: what ``json.dumps(s)`` returns (in C)."""


def _dumps(key: str, value: Any) -> str:
    """``value`` as compact JSON text, for the ``*_value(s)`` methods."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise EntryError(f"value of {key!r} cannot be encoded as JSON: {exc}") from exc


class SyncClient:
    """
    A blocking wrapper of :class:`Client`, for scripts.

    It runs its own event loop in a background thread and forwards each call to a
    :class:`Client` on that loop, with ``asyncio.run_coroutine_threadsafe``. Every method of
    :class:`Client` is here, with the same arguments, results and errors; the watches are
    plain iterators. Use it with ``with``::

        with SyncClient.for_home("~/.ctxsync") as c:
            c.set("tasks", "build", '{"status": "ok"}')
            for change in c.watch("tasks", timeout_s=10.0):
                print(change["key"], change["value"])

    Because its loop is its own, it also works when called from a thread whose event loop is
    running, but each call then blocks that loop until the daemon answers: inside async code,
    use :class:`Client`. Methods may be called from several threads at once. They must not be
    called from an ``on_ready`` callback, which runs on the wrapper's own loop
    (:class:`~ctxsync.errors.InvalidState`).

    Args:
        url: ``ws://host:port/`` of the API listener.
        token: The API token (contents of the home's ``api.token``).
        open_timeout: Connection timeout in seconds.
    """

    def __init__(self, url: str, token: str, *, open_timeout: float = 5.0) -> None:
        self._client = Client(url, token, open_timeout=open_timeout)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Open watches and the pull running on each, if any (touched on the loop's thread only).
        self._watches: dict[AsyncGenerator[Any, None], asyncio.Task[Any] | None] = {}

    @property
    def url(self) -> str:
        """``ws://host:port/`` of the API listener."""
        return self._client.url

    @classmethod
    def for_home(cls, home: str | Path, *, env: Mapping[str, str] | None = None, **kwargs: Any) -> SyncClient:
        """As :meth:`Client.for_home`."""
        c = Client.for_home(home, env=env, **kwargs)
        return cls(c.url, c.token, open_timeout=c.open_timeout)

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> SyncClient:
        if self._loop is not None:
            raise InvalidState("this SyncClient is already open")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="ctxsync-client", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            self._run(self._client.__aenter__())
        except BaseException:
            self._shutdown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        """Close the open watches and the connection, stop the loop and join its thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if threading.current_thread() is thread:
            raise InvalidState("a SyncClient cannot be closed from its own loop (from on_ready?)")
        self._loop = self._thread = None

        async def drain() -> None:
            try:
                for agen in list(self._watches):
                    with contextlib.suppress(Exception):
                        await self._close_watch(agen)
                await self._client.__aexit__()
            finally:
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await loop.shutdown_asyncgens()
                await loop.shutdown_default_executor()

        try:
            asyncio.run_coroutine_threadsafe(drain(), loop).result()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on the wrapper's loop and block until it is done."""
        loop = self._loop
        if loop is None:
            coro.close()
            raise ApiError("client is not connected: use `with SyncClient...`", code="unavailable")
        if threading.current_thread() is self._thread:
            coro.close()
            raise InvalidState(
                "a SyncClient method was called on its own loop (from on_ready?): it would wait forever"
            )
        fut = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()  # KeyboardInterrupt while waiting: stop the request too
            raise

    async def _close_watch(self, agen: AsyncGenerator[Any, None]) -> None:
        """Close a watch, after ending the pull still running on it (KeyboardInterrupt), if any."""
        task = self._watches.pop(agen, None)
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        await agen.aclose()

    def _iterate(self, agen: AsyncGenerator[_T, None], timeout_s: float | None) -> Iterator[_T]:
        """Iterate ``agen`` on the loop, at most ``timeout_s`` seconds per item; close it when done."""
        loop = self._loop

        async def pull() -> list[_T]:
            task = asyncio.current_task()
            self._watches[agen] = task
            try:
                return await asyncio.wait_for(_next_or_none(agen), timeout_s)
            finally:
                if self._watches.get(agen) is task:
                    self._watches[agen] = None

        try:
            while True:
                try:
                    items = self._run(pull())
                except TimeoutError:
                    raise TimeoutError(f"no change within {timeout_s} s") from None
                if not items:
                    return
                yield items[0]
        finally:
            if loop is not None and self._loop is loop:
                asyncio.run_coroutine_threadsafe(self._close_watch(agen), loop).result()

    # -- requests: each blocks until the daemon answers --------------------------------

    def request(self, op: str, **fields: Any) -> Any:
        """Blocking :meth:`Client.request`."""
        return self._run(self._client.request(op, **fields))

    def set(self, context: str, key: str, value_json: str) -> int:
        """Blocking :meth:`Client.set`."""
        return self._run(self._client.set(context, key, value_json))

    def set_many(self, context: str, items: list[tuple[str, str | None]]) -> int:
        """Blocking :meth:`Client.set_many`."""
        return self._run(self._client.set_many(context, items))

    def set_value(self, context: str, key: str, value: Any) -> int:
        """Blocking :meth:`Client.set_value`."""
        return self._run(self._client.set_value(context, key, value))

    def set_values(self, context: str, values: Mapping[str, Any]) -> int:
        """Blocking :meth:`Client.set_values`."""
        return self._run(self._client.set_values(context, values))

    def get_value(self, context: str, key: str, default: Any = None) -> Any:
        """Blocking :meth:`Client.get_value`."""
        return self._run(self._client.get_value(context, key, default))

    def delete(self, context: str, key: str) -> bool:
        """Blocking :meth:`Client.delete`."""
        return self._run(self._client.delete(context, key))

    def get(self, context: str, key: str, *, conflicts: bool = False) -> dict[str, Any]:
        """Blocking :meth:`Client.get`."""
        return self._run(self._client.get(context, key, conflicts=conflicts))

    def get_all(self, context: str, prefix: str = "") -> dict[str, Any]:
        """Blocking :meth:`Client.get_all`."""
        return self._run(self._client.get_all(context, prefix))

    def keys(self, context: str, prefix: str = "") -> list[str]:
        """Blocking :meth:`Client.keys`."""
        return self._run(self._client.keys(context, prefix))

    def status(self) -> dict[str, Any]:
        """Blocking :meth:`Client.status`."""
        return self._run(self._client.status())

    def invite(
        self,
        *,
        contexts: list[str] | None = None,
        read_only: bool = False,
        ttl_s: float = 300.0,
        addr: str | None = None,
    ) -> dict[str, Any]:
        """Blocking :meth:`Client.invite`."""
        return self._run(self._client.invite(contexts=contexts, read_only=read_only, ttl_s=ttl_s, addr=addr))

    def reload_peers(self) -> int:
        """Blocking :meth:`Client.reload_peers`."""
        return self._run(self._client.reload_peers())

    def history(
        self, context: str, *, key: str | None = None, since: int | None = None, limit: int = 100
    ) -> dict[str, Any]:
        """Blocking :meth:`Client.history`."""
        return self._run(self._client.history(context, key=key, since=since, limit=limit))

    def changes(self, context: str, since: int = 0, *, limit: int = 1000) -> dict[str, Any]:
        """Blocking :meth:`Client.changes`."""
        return self._run(self._client.changes(context, since, limit=limit))

    def resolve(self, context: str, key: str, value_json: str) -> dict[str, Any]:
        """Blocking :meth:`Client.resolve`."""
        return self._run(self._client.resolve(context, key, value_json))

    def strategy(self, context: str) -> dict[str, Any]:
        """Blocking :meth:`Client.strategy`."""
        return self._run(self._client.strategy(context))

    def set_strategy(self, context: str, name: str, priority: list[str] | None = None) -> dict[str, Any]:
        """Blocking :meth:`Client.set_strategy`."""
        return self._run(self._client.set_strategy(context, name, priority))

    def snapshot(self, context: str, *, label: str | None = None, meta: Any = None) -> dict[str, Any]:
        """Blocking :meth:`Client.snapshot`."""
        return self._run(self._client.snapshot(context, label=label, meta=meta))

    def snapshots(self, context: str | None = None) -> list[dict[str, Any]]:
        """Blocking :meth:`Client.snapshots`."""
        return self._run(self._client.snapshots(context))

    def snapshot_show(self, snapshot_id: str) -> dict[str, Any]:
        """Blocking :meth:`Client.snapshot_show`."""
        return self._run(self._client.snapshot_show(snapshot_id))

    def snapshot_diff(self, snapshot_id: str, other_id: str | None = None) -> dict[str, Any]:
        """Blocking :meth:`Client.snapshot_diff`."""
        return self._run(self._client.snapshot_diff(snapshot_id, other_id))

    def snapshot_delete(self, snapshot_id: str) -> None:
        """Blocking :meth:`Client.snapshot_delete`."""
        self._run(self._client.snapshot_delete(snapshot_id))

    def restore(self, context: str, snapshot_id: str) -> dict[str, Any]:
        """Blocking :meth:`Client.restore`."""
        return self._run(self._client.restore(context, snapshot_id))

    def adopt(self, context: str, peer: str) -> dict[str, Any]:
        """Blocking :meth:`Client.adopt`."""
        return self._run(self._client.adopt(context, peer))

    def webhook_add(
        self, context: str, url: str, *, prefix: str = "", secret: str | None = None
    ) -> dict[str, Any]:
        """Blocking :meth:`Client.webhook_add`."""
        return self._run(self._client.webhook_add(context, url, prefix=prefix, secret=secret))

    def webhooks(self) -> list[dict[str, Any]]:
        """Blocking :meth:`Client.webhooks`."""
        return self._run(self._client.webhooks())

    def webhook_remove(self, webhook_id: str) -> None:
        """Blocking :meth:`Client.webhook_remove`."""
        self._run(self._client.webhook_remove(webhook_id))

    def webhook_failures(self, webhook_id: str | None = None) -> list[dict[str, Any]]:
        """Blocking :meth:`Client.webhook_failures`."""
        return self._run(self._client.webhook_failures(webhook_id))

    # -- watches: plain iterators --------------------------------------------------------

    def watch(
        self,
        context: str | None,
        prefix: str = "",
        *,
        glob: str | None = None,
        on_ready: Callable[[], None] | None = None,
        timeout_s: float | None = None,
    ) -> Iterator[dict[str, Any]]:
        """
        Iterate over changes, as :meth:`Client.watch`; the iteration ends when the daemon stops.

        The watch has a connection of its own, so closing the iterator (``break`` out of the
        ``for`` loop, or ``close()``) ends the subscription on the daemon too.

        Args:
            context, prefix, glob: As :meth:`Client.watch`.
            on_ready: As :meth:`Client.watch`; it is called on the wrapper's thread, and must
                not call the wrapper.
            timeout_s: Longest wait for the next change, in seconds (``None``: no limit).

        Raises:
            TimeoutError: No change came within ``timeout_s`` seconds; the watch is closed.
            ApiError: As :meth:`Client.watch` (``code="overflow"`` if it fell behind).
        """
        yield from self._iterate(self._watch(context, prefix, glob, None, on_ready), timeout_s)

    def watch_batches(
        self,
        context: str | None,
        prefix: str = "",
        *,
        glob: str | None = None,
        batch_ms: int = 100,
        on_ready: Callable[[], None] | None = None,
        timeout_s: float | None = None,
    ) -> Iterator[list[dict[str, Any]]]:
        """As :meth:`watch`, but yield lists of changes, as :meth:`Client.watch_batches`."""
        yield from self._iterate(self._watch(context, prefix, glob, batch_ms, on_ready), timeout_s)

    async def _watch(
        self,
        context: str | None,
        prefix: str,
        glob: str | None,
        batch_ms: int | None,
        on_ready: Callable[[], None] | None,
    ) -> AsyncGenerator[Any, None]:
        """A watch on a connection of its own, which closes with it."""
        async with (
            Client(self._client.url, self._client.token, open_timeout=self._client.open_timeout) as own,
            contextlib.aclosing(own._watch(context, prefix, glob, batch_ms or 0, on_ready)) as batches,
        ):
            async for batch in batches:
                if batch_ms is not None:
                    yield batch
                    continue
                for change in batch:
                    yield change


async def _next_or_none(agen: AsyncIterator[_T]) -> list[_T]:
    """The next item of ``agen`` in a list, or ``[]`` at its end."""
    try:
        return [await anext(agen)]
    except StopAsyncIteration:
        return []
