"""
Local control API: JSON requests over a websocket on loopback, guarded by a token.

The CLI (through :class:`ctxsync.client.Client`) and applications use it. One websocket
carries many requests; each is a JSON object ``{"id": N, "op": "...", ...}`` and is answered
by ``{"id": N, "ok": true, "result": ...}`` or ``{"id": N, "ok": false, "error": {"code",
"message"}}``. Requests run concurrently, so a client may pipeline writes. ``watch`` answers
with a stream of ``{"id": N, "event": "change", ...}`` messages. docs/api.md lists the ops.

The opening handshake must carry ``Authorization: Bearer <token>`` (the token file of the
home); anything else is refused with HTTP 401 and logged as ``api.denied``. A Host header
that is not a loopback name (DNS rebinding) or any Origin header (a browser) is refused with
HTTP 403, also logged.

Entry values travel as the exact JSON text they were stored as: responses embed it raw, so
``3`` stays ``3`` and large integers keep every digit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import json.scanner
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from ctxsync import yjs
from ctxsync.alerts import AlertRule
from ctxsync.entries import Entry
from ctxsync.errors import CtxSyncError, EntryError, NotFound, StoreError
from ctxsync.entries import STRATEGIES, Strategy
from ctxsync.mesh import Change, Mesh, _Subscription
from ctxsync.recovery import Recovery, snapshot_json
from ctxsync.store import HistoryRecord
from ctxsync.types import NodeId
from ctxsync.webhooks import WebhookDispatcher
from ctxsync.types import DocId, is_valid_doc_id

log = structlog.get_logger("ctxsync.api")

_NODE_ID_RE = re.compile(r"[A-Z2-7]{7}(-[A-Z2-7]{7}){7}")
"""A node id: base32 of a SHA-256, in eight dashed groups of seven (ctxsync.crypto.node_id_from_cert)."""

YJS_PREFIX = "/yjs/"
"""Path prefix of the Yjs (y-websocket protocol) endpoint: ``/yjs/CONTEXT``."""

MAX_REQUEST_BYTES = 64 * 1024 * 1024
MAX_WATCH_BATCH = 1000
"""Most changes in one ``watch`` batch message (``batch_ms``)."""
MAX_BATCH = 4096
"""Most requests in one batch message (a JSON array of requests)."""


def _dump_raw(obj: dict[str, Any], raw: dict[str, str]) -> str:
    """JSON-encode ``obj`` and splice in ``raw`` fields whose values are JSON text already."""
    text = json.dumps(obj, separators=(",", ":"))
    if not raw:
        return text
    extra = ",".join(f"{json.dumps(k)}:{v}" for k, v in raw.items())
    return text[:-1] + ("," if len(obj) else "") + extra + "}"


def _entry_json(entry: Entry, *, conflicts: bool = False) -> str:
    parts = [f'"key":{json.dumps(entry.key)}', f'"value":{entry.value}', f'"writer":{json.dumps(entry.writer)}', f'"t":"{entry.t}"']
    if conflicts:
        losers = ",".join(
            "{" + f'"writer":{json.dumps(s.writer)},"t":"{s.t}","value":{s.value if s.value is not None else "null"},"deleted":{"true" if s.value is None else "false"}' + "}"
            for s in entry.conflicts
        )
        parts.append(f'"conflicts":[{losers}]')
    return "{" + ",".join(parts) + "}"


def _raw(value_json: str | None) -> str:
    return value_json if value_json is not None else "null"


def _change_fields(change: Change) -> str:
    return (
        f'"context":{json.dumps(change.context)},"key":{json.dumps(change.key)},"value":{_raw(change.value)},'
        f'"deleted":{"true" if change.value is None else "false"},"origin":{json.dumps(change.origin)},'
        f'"version":{change.version},"previous":{_raw(change.previous)}'
    )


def _change_json(req_id: Any, change: Change) -> str:
    return "{" + f'"id":{json.dumps(req_id)},"event":"change",' + _change_fields(change) + "}"


def _history_json(record: HistoryRecord) -> str:
    r = record.record
    t_ms = r.get("t_ms", 0)
    return _dump_raw(
        {"version": record.version, "t_ms": t_ms, "time": _iso_ms(t_ms), "origin": r.get("origin"), "key": r.get("key"),
         "deleted": r.get("value") is None, "hlc": r.get("hlc")},
        {"value": _raw(r.get("value")), "previous": _raw(r.get("previous"))},
    )  # fmt: skip


def _iso_ms(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def _entries_json(entries: dict[str, str]) -> str:
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in sorted(entries.items())) + "}"


class Api:
    """
    The local API server.

    Args:
        mesh: Read and written through its narrow public methods.
        token: The shared secret clients must present.
        status: Returns the full status object (the daemon adds process figures to the mesh's).
        reload_peers: Re-reads peers.toml and applies it; returns the new peer count.
        stop: Asks the daemon to shut down.
        invite: Opens a pairing invite (``ctxsync invite``): ``invite(contexts, read_only,
            ttl_s, addr)`` returns ``{"token", "expires_at", "node_id", "addr"}``.
        allowed_hosts: Host header names accepted besides loopback ones (the API's own
            address when ``[api] allow_remote`` puts it on the LAN).
        alert_rules: The alert rules in force (shown at 0 in ``ctxsync_alerts_active``).
        recovery: Snapshots and restore (the ``snapshot_*``, ``restore`` and ``adopt`` ops).
        webhooks: The :class:`ctxsync.webhooks.WebhookDispatcher` (the ``webhook_*`` ops).

    Besides the websocket ops, ``GET /metrics`` (same token and Host checks) answers with the
    status in the Prometheus text format (:mod:`ctxsync.exposition`).
    """

    def __init__(
        self,
        mesh: Mesh,
        *,
        token: str,
        status: Callable[[], dict[str, Any]],
        reload_peers: Callable[[], Awaitable[int]],
        stop: Callable[[], None],
        invite: Callable[[list[str], bool, float, str | None], Awaitable[dict[str, Any]]] | None = None,
        allowed_hosts: frozenset[str] = frozenset(),
        alert_rules: tuple[AlertRule, ...] = (),
        recovery: Recovery | None = None,
        webhooks: WebhookDispatcher | None = None,
    ) -> None:
        self.recovery = recovery
        self.webhooks = webhooks
        self.mesh = mesh
        self.token = token
        self.status = status
        self.reload_peers = reload_peers
        self.stop = stop
        self.invite = invite
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts)
        self.alert_rules = alert_rules
        self._watches: dict[tuple[ServerConnection, str], _Subscription] = {}
        """The running watches: (connection, JSON of the watch request's id) -> its subscription."""

    async def listen(self, host: str, port: int) -> Server:
        """Start listening on ``host:port``. Raises OSError if the address is taken."""
        return await serve(
            self._connection,
            host,
            port,
            process_request=self._check_request,
            compression=None,
            max_size=MAX_REQUEST_BYTES,
            ping_interval=None,
            server_header=None,
        )

    def _check_request(self, conn: ServerConnection, request: Request) -> Response | None:
        auths = request.headers.get_all("Authorization")
        auth = auths[0] if len(auths) == 1 else ""
        foreign = [
            h for h in request.headers.get_all("Host") if not _is_loopback_host(h) and _host_name(h) not in self.allowed_hosts
        ]
        if foreign:
            log.warning("api.denied", reason="foreign host header", host=foreign[0][:200])
            return conn.respond(HTTPStatus.FORBIDDEN, "foreign Host header refused\n")
        origins = request.headers.get_all("Origin")
        if origins:
            log.warning("api.denied", reason="browser origin", origin=origins[0][:200])
            return conn.respond(HTTPStatus.FORBIDDEN, "cross-origin requests refused\n")
        expected = f"Bearer {self.token}"
        path, _, query = request.path.partition("?")
        if path.startswith(YJS_PREFIX) and not auth:
            # What the y-websocket provider's `params` option sends: ?token=...
            tokens = urllib.parse.parse_qs(query).get("token", [])
            auth = f"Bearer {tokens[0]}" if len(tokens) == 1 else ""
        if not hmac.compare_digest(auth.encode(), expected.encode()):
            log.warning("api.denied", reason="missing token" if not auth else "wrong token")
            resp = conn.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong API token\n")
            resp.headers = Headers([*resp.headers.raw_items(), ("WWW-Authenticate", "Bearer")])
            return resp
        if path == "/metrics":
            return self._metrics(conn)
        if path.startswith(YJS_PREFIX) and not is_valid_doc_id(urllib.parse.unquote(path[len(YJS_PREFIX) :])):
            return conn.respond(HTTPStatus.NOT_FOUND, "not a valid context name: use /yjs/CONTEXT\n")
        if not path.startswith(YJS_PREFIX) and path != "/":
            return conn.respond(HTTPStatus.NOT_FOUND, "no such path: use / (the JSON API), /yjs/CONTEXT or /metrics\n")
        return None

    def _metrics(self, conn: ServerConnection) -> Response:
        """``GET /metrics``: the status in the Prometheus text format (same token as every request)."""
        from ctxsync import exposition  # prometheus-client: loaded at the first scrape, not by every daemon

        try:
            body = exposition.render(self.status(), rules=self.alert_rules)
        except Exception:
            log.exception("api.error", op="metrics")
            return conn.respond(HTTPStatus.INTERNAL_SERVER_ERROR, "cannot render metrics\n")
        resp = conn.respond(HTTPStatus.OK, body.decode("utf-8"))
        resp.headers = Headers([(k, v) for k, v in resp.headers.raw_items() if k.lower() != "content-type"])
        resp.headers["Content-Type"] = exposition.CONTENT_TYPE
        return resp

    async def _connection(self, conn: ServerConnection) -> None:
        path = conn.request.path.partition("?")[0] if conn.request is not None else "/"
        if path.startswith(YJS_PREFIX):
            await yjs.serve(self.mesh, conn, DocId(urllib.parse.unquote(path[len(YJS_PREFIX) :])))
            return
        tasks: set[asyncio.Task[None]] = set()
        try:
            async for raw in conn:
                try:
                    req = json.loads(raw)
                    if isinstance(req, list):
                        if not req or len(req) > MAX_BATCH or not all(isinstance(r, dict) for r in req):
                            raise ValueError(f"a batch must be an array of 1 to {MAX_BATCH} request objects")
                    elif not isinstance(req, dict):
                        raise ValueError("request must be a JSON object (or an array of them: a batch)")
                except ValueError as exc:
                    await conn.send(_error_json(None, "bad_request", str(exc)))
                    continue
                if isinstance(req, list):
                    coro = self._handle_batch(conn, req)
                elif req.get("op") == "set":  # applied (and sent to peers) now, answered once durable
                    coro = self._handle_set(conn, req, self._submit_set(req))
                else:
                    coro = self._handle(conn, req)
                task = asyncio.create_task(coro)
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except Exception as exc:  # connection dropped mid-request
            log.debug("api.connection_closed", reason=str(exc))
        finally:
            for t in tasks:
                t.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, conn: ServerConnection, req: dict[str, Any]) -> None:
        text = await self._answer(conn, req)
        if text is not None:
            with contextlib.suppress(Exception):
                await conn.send(text)

    def _submit_set(self, req: dict[str, Any]) -> asyncio.Future[tuple[int, int]] | str:
        """
        Start a ``set`` in this call: queue it for the group commit (:meth:`Mesh.submit_write`,
        which applies it at once when no round is committing), without waiting for a task.

        Returns:
            The write's future, or the error response if it was refused before being queued.
        """
        try:
            return self.mesh.submit_write(*_set_args(req))
        except Exception as exc:
            return self._error_text(req, exc)

    async def _handle_set(
        self, conn: ServerConnection, req: dict[str, Any], started: asyncio.Future[tuple[int, int]] | str
    ) -> None:
        """Answer a ``set`` started by :meth:`_submit_set` once it is durable (or failed)."""
        if isinstance(started, str):
            text = started
        else:
            try:
                text = _set_json(req.get("id"), *await started)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                text = self._error_text(req, exc)
        with contextlib.suppress(Exception):
            await conn.send(text)

    async def _handle_batch(self, conn: ServerConnection, reqs: list[dict[str, Any]]) -> None:
        """
        Answer a batch (a JSON array of requests in one message) with one message: the array of
        their responses, in the same order, once all are done.

        The requests run concurrently, like requests sent one by one; ``set`` requests go
        straight to the group commit (:meth:`Mesh.submit_write`) without a task each.
        Streaming ops (``watch``) cannot be batched.
        """
        answers: list[str | asyncio.Future[Any]] = []  # a response already, or what will give one
        for req in reqs:
            try:
                if req.get("op") == "set":
                    answers.append(self._submit_set(req))
                elif req.get("op") == "watch":
                    raise _BadRequest("watch streams its events: send it on its own, not in a batch")
                else:
                    answers.append(asyncio.ensure_future(self._answer(conn, req)))
            except Exception as exc:
                answers.append(self._error_text(req, exc))
        # Wait for each in turn rather than with gather(), which adds a done callback to every
        # future: one loop callback per set (a batch holds up to 1,024). The sets of one batch
        # mostly complete in the same commit round, so this waits once or twice per batch.
        pending = [a for a in answers if not isinstance(a, str)]
        try:
            for fut in pending:
                if not fut.done():
                    await asyncio.wait((fut,))
        except asyncio.CancelledError:
            for fut in pending:  # as gather() does: a set not yet in a round is withdrawn
                fut.cancel()
            raise
        texts: list[str] = []
        for req, answer in zip(reqs, answers, strict=True):
            if isinstance(answer, str):
                texts.append(answer)
            elif answer.cancelled():
                texts.append(_error_json(req.get("id"), "error", "cancelled"))
            elif (failure := answer.exception()) is not None:
                texts.append(self._error_text(req, failure))
            elif req.get("op") == "set":
                texts.append(_set_json(req.get("id"), *answer.result()))
            else:  # an op's own answer text (only watch streams, and it is refused above)
                texts.append(answer.result() or _error_json(req.get("id"), "error", "no answer"))
        with contextlib.suppress(Exception):
            await conn.send("[" + ",".join(texts) + "]")

    async def _answer(self, conn: ServerConnection, req: dict[str, Any]) -> str | None:
        """Run one request; return its response text (None when it streamed), an error response if it failed."""
        try:
            op = req.get("op")
            handler = getattr(self, f"_op_{op}", None) if isinstance(op, str) else None
            if handler is None:
                raise _BadRequest(f"unknown op {op!r}")
            text: str | None = await handler(conn, req.get("id"), req)
            return text
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return self._error_text(req, exc)

    @staticmethod
    def _error_text(req: dict[str, Any], exc: BaseException) -> str:
        """The error response to ``req`` for ``exc`` (logged when it is not one of ours: a bug)."""
        if isinstance(exc, NotFound):
            code = "not_found"
        elif isinstance(exc, StoreError):
            code = "store_error"
        elif isinstance(exc, (EntryError, _BadRequest, ValueError)):
            code = "bad_request"
        else:
            code = "error"
        if code == "error" and not isinstance(exc, CtxSyncError):
            log.error("api.error", op=req.get("op"), error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        return _error_json(req.get("id"), code, str(exc))

    @staticmethod
    def _ok(req_id: Any, result: Any = None, raw: str | None = None) -> str:
        if raw is not None:
            return '{"id":' + json.dumps(req_id) + ',"ok":true,"result":' + raw + "}"
        return json.dumps({"id": req_id, "ok": True, "result": result}, separators=(",", ":"))

    # -- ops: each returns the response text (or None when it streamed) ---------------

    async def _op_status(self, conn: ServerConnection, req_id: Any, req: dict[str, Any]) -> str:
        return self._ok(req_id, self.status())

    async def _op_get(self, conn: ServerConnection, req_id: Any, req: dict[str, Any]) -> str:
        ctx = _doc_id(req)
        key = req.get("key")
        if key is None:
            entries = self.mesh.entries(ctx, _str(req, "prefix", ""))
            obj = "{" + ",".join(f"{json.dumps(e.key)}:{e.value}" for e in entries) + "}"
            return self._ok(req_id, raw=obj)
        if not isinstance(key, str):
            raise _BadRequest("key must be a string")
        entry = self.mesh.get(ctx, key)
        return self._ok(req_id, raw=_entry_json(entry, conflicts=bool(req.get("conflicts"))))

    async def _op_keys(self, conn: ServerConnection, req_id: Any, req: dict[str, Any]) -> str:
        return self._ok(req_id, self.mesh.keys(_doc_id(req), _str(req, "prefix", "")))

    async def _op_watch(self, conn: ServerConnection, req_id: Any, req: dict[str, Any]) -> None:
        ctx = req.get("context")
        if ctx is not None and not isinstance(ctx, str):
            raise _BadRequest("context must be a string")
        glob = req.get("glob")
        if glob is not None and (not isinstance(glob, str) or not glob):
            raise _BadRequest("glob must be a non-empty shell pattern such as 'tasks/*'")
        batch_ms = req.get("batch_ms", 0)
        if isinstance(batch_ms, bool) or not isinstance(batch_ms, int) or not 0 <= batch_ms <= 60_000:
            raise _BadRequest("batch_ms must be an integer number of milliseconds from 0 to 60000")
        prefix = _str(req, "prefix", "")
        key = (conn, json.dumps(req_id))
        if key in self._watches:
            raise _BadRequest(f"a watch with id {json.dumps(req_id)} is already running on this connection")
        sub = self.mesh.subscribe(DocId(ctx) if ctx else None, prefix, glob=glob)
        self._watches[key] = sub
        try:
            await conn.send(self._ok(req_id, {"watching": ctx, "prefix": prefix, "glob": glob, "batch_ms": batch_ms}))
            while True:
                change = await sub.queue.get()
                batch = [change]
                if batch_ms and change is not None:
                    deadline = asyncio.get_running_loop().time() + batch_ms / 1000
                    while len(batch) < MAX_WATCH_BATCH and batch[-1] is not None:
                        left = deadline - asyncio.get_running_loop().time()
                        if left <= 0:
                            break
                        try:
                            batch.append(await asyncio.wait_for(sub.queue.get(), left))
                        except TimeoutError:
                            break
                changes = [c for c in batch if c is not None]
                if batch_ms and changes:
                    body = ",".join("{" + _change_fields(c) + "}" for c in changes)
                    await conn.send("{" + f'"id":{json.dumps(req_id)},"event":"changes","changes":[{body}]' + "}")
                elif changes:
                    await conn.send(_change_json(req_id, changes[0]))
                if batch[-1] is None:
                    await conn.send(json.dumps({"id": req_id, "event": "overflow" if sub.overflowed else "end"}))
                    return
        finally:
            if self._watches.get(key) is sub:
                del self._watches[key]
            self.mesh.unsubscribe(sub)

    async def _op_unwatch(self, conn: ServerConnection, req_id: Any, req: dict[str, Any]) -> str:
        """End the watch this connection started with request id ``watch``: it sends what is queued, then its ``end`` event."""
        watch_id = req.get("watch")
        sub = self._watches.pop((conn, json.dumps(watch_id)), None)
        if sub is None:
            raise NotFound(f"no watch with id {json.dumps(watch_id)} is running on this connection")
        sub.end()
        return self._ok(req_id, {"unwatched": watch_id})

    # -- history, changes, conflicts, strategy -------------------------------------------------

    async def _op_history(self, conn: ServerConnection, req_id: Any, req: dict[str, Any]) -> str:
        doc_id = _doc_id(req)
        key = req.get("key")
        if key is not None and not isinstance(key, str):
            raise _BadRequest("key must be a string")
        since = _opt_int(req, "since", minimum=0)
        limit = _opt_int(req, "limit", minimum=1) or 100
        page = await self.mesh.store.read_history(doc_id, since=since, key=key, limit=min(limit, 100_000))
        body = ",".join(_history_json(r) for r in page.records)
        head = {"context": doc_id, "version": self.mesh.version_of(doc_id), "history_from": page.history_from}
        return self._ok(req_id, raw=_dump_raw(head, {"records": f"[{body}]"}))

    async def _op_changes(self, conn: ServerConnection, req_id: Any, req: dict[str, Any]) -> str:
        """A pull cursor: the changes after version ``since``, whole versions only, never skipping one."""
        doc_id = _doc_id(req)
        since = _opt_int(req, "since", minimum=0) or 0
        limit = _opt_int(req, "limit", minimum=1) or 1000
        store = self.mesh.store
        page = await store.read_history(doc_id, since=since, limit=limit + 1)
        records, history_from = page.records, page.history_from
        if len(records) > limit:
            last = records[limit].version
            kept = [r for r in records[:limit] if r.version != last]
            if not kept:  # one version alone is larger than the limit: return all of it
                whole = await store.read_history(doc_id, since=last - 1, limit=store.history_limit + 1)
                kept = [r for r in whole.records if r.version == last]
                # A dropped version's gap (Mesh.unstored_from) may have been committed between
                # the two reads: the newer mark counts, or the cursor would pass it unwarned.
                history_from = max(history_from, whole.history_from)
            records = kept
        floor = self.mesh.unstored_from(doc_id)
        if floor is not None:  # a version is waiting for its commit: stop before it (see there)
            records = [r for r in records if r.version < floor]
        version = self.mesh.version_of(doc_id)
        truncated = since + 1 < history_from and since < version
        # The cursor moves to the last version returned, never further: the in-memory version
        # may be ahead of what the store has committed, and skipping it would lose changes.
        cursor = records[-1].version if records else since
        head = {
            "context": doc_id, "since": since, "next": cursor, "version": version,
            "history_from": history_from, "truncated": truncated,
            "missed": [since + 1, history_from - 1] if truncated else None,
        }  # fmt: skip
        body = ",".join(_history_json(r) for r in records)
        return self._ok(req_id, raw=_dump_raw(head, {"changes": f"[{body}]"}))

    async def _op_resolve(self, conn: ServerConnection, req_id: Any, req: dict[str, Any]) -> str:
        doc_id = _doc_id(req)
        key = _str(req, "key", "")
        value = req.get("value")
        if not isinstance(value, str):
            raise _BadRequest("value must be JSON text")
        try:
            json.loads(value)
        except ValueError as exc:
            raise _BadRequest(f"value is not JSON text: {exc}") from None
        entry = self.mesh.get(doc_id, key)
        if not entry.conflicts:
            raise _BadRequest(f"{key!r} in {doc_id!r} has no conflict to resolve; use set")
        version, _ = await self.mesh.write(doc_id, [(key, value)])
        log.info("context.resolved", doc_id=doc_id, key=key, version=version, replaced=1 + len(entry.conflicts))
        return self._ok(req_id, {"version": version, "replaced": 1 + len(entry.conflicts)})

    async def _op_strategy(self, conn: ServerConnection, req_id: Any, req: dict[str, Any]) -> str:
        doc_id = _doc_id(req)
        name = req.get("name")
        if name is None:
            current = self.mesh.strategy_of(doc_id)
            if current is None:
                raise NotFound(f"no context {doc_id!r}")
            return self._ok(req_id, current)
        if name not in STRATEGIES:
            raise _BadRequest(f"name must be one of {', '.join(STRATEGIES)}")
        priority = req.get("priority", [])
        if not isinstance(priority, list) or not all(isinstance(p, str) and p for p in priority):
            raise _BadRequest("priority must be a list of node ids")
        if name == "origin-priority" and not priority:
            raise _BadRequest("origin-priority needs a priority list of node ids, most preferred first")
        if name == "latest-wins" and priority:
            raise _BadRequest("latest-wins takes no priority list")
        strategy = Strategy(name, tuple(self._node_ref(p) for p in priority))
        version = await self.mesh.set_strategy(doc_id, strategy)
        return self._ok(req_id, {**strategy.to_json(), "version": version})

    def _node_ref(self, text: str) -> NodeId:
        """A node named in a request: this node, a paired peer (id, name or a 7+ character id prefix), or a full node id."""
        known = {self.mesh.node_id: self.mesh.config.name, **{pid: st.config.name for pid, st in self.mesh.peers.items()}}
        matches = [nid for nid, name in known.items() if text in (nid, name) or (len(text) >= 7 and nid.startswith(text))]
        if len(matches) == 1:
            return NodeId(matches[0])
        if len(matches) > 1:
            raise _BadRequest(f"{text!r} names {len(matches)} nodes; give the whole node id")
        if _NODE_ID_RE.fullmatch(text):
            return NodeId(text)  # a node further away in the mesh
        raise _BadRequest(f"{text!r} is neither this node, a paired peer nor a node id (ctxsync peer list)")

    # -- snapshots, restore, adopt ------------------------------------------------------------

    def _recovery(self) -> Recovery:
        if self.recovery is None:
            raise _BadRequest("this daemon does not keep snapshots")
        return self.recovery

    async def _op_snapshot_create(self, conn: ServerConnection, req_id: Any, req: dict[str, Any]) -> str:
        label = req.get("label")
        if label is not None and not isinstance(label, str):
            raise _BadRequest("label must be a string")
        return self._ok(req_id, await self._recovery().create(_doc_id(req), label=label, meta=req.get("meta")))

    async def _op_snapshot_list(self, conn: ServerConnection, req_id: Any, req: dict[str, Any]) -> str:
        ctx = req.get("context")
        if ctx is not None and not isinstance(ctx, str):
            raise _BadRequest("context must be a string")
        return self._ok(req_id, await self._recovery().list(DocId(ctx) if ctx else None))

    async def _op_snapshot_show(self, conn: ServerConnection, req_id: Any, req: dict[str, Any]) -> str:
        snap = await self._recovery().get(_str(req, "snapshot", ""))
        assert snap.entries is not None
        return self._ok(req_id, raw=_dump_raw(snapshot_json(snap), {"content": _entries_json(snap.entries)}))

    async def _op_snapshot_diff(self, conn: ServerConnection, req_id: Any, req: dict[str, Any]) -> str:
        other = req.get("other")
        if other is not None and not isinstance(other, str):
            raise _BadRequest("other must be a snapshot id")
        d = await self._recovery().diff(_str(req, "snapshot", ""), other)
        changed = "{" + ",".join(f"{json.dumps(k)}:{{\"from\":{a},\"to\":{b}}}" for k, (a, b) in d["changed"].items()) + "}"
        return self._ok(
            req_id,
            raw=_dump_raw(
                {"context": d["context"], "from": d["from"], "to": d["to"]},
                {"added": _entries_json(d["added"]), "removed": _entries_json(d["removed"]), "changed": changed},
            ),
        )

    async def _op_snapshot_delete(self, conn: ServerConnection, req_id: Any, req: dict[str, Any]) -> str:
        await self._recovery().delete(_str(req, "snapshot", ""))
        return self._ok(req_id, {"deleted": True})

    async def _op_restore(self, conn: ServerConnection, req_id: Any, req: dict[str, Any]) -> str:
        return self._ok(req_id, await self._recovery().restore(_doc_id(req), _str(req, "snapshot", "")))

    async def _op_adopt(self, conn: ServerConnection, req_id: Any, req: dict[str, Any]) -> str:
        peer = _str(req, "peer", "")
        matches = [pid for pid, st in self.mesh.peers.items() if peer in (pid, st.config.name) or (len(peer) >= 7 and pid.startswith(peer))]
        if len(matches) != 1:
            raise NotFound(f"no single paired peer matches {peer!r} (give its node id or name)")
        return self._ok(req_id, await self._recovery().adopt(_doc_id(req), matches[0]))

    # -- webhooks -------------------------------------------------------------------------------

    def _webhooks(self) -> WebhookDispatcher:
        if self.webhooks is None:
            raise _BadRequest("this daemon does not run webhooks")
        return self.webhooks

    async def _op_webhook_add(self, conn: ServerConnection, req_id: Any, req: dict[str, Any]) -> str:
        secret = req.get("secret")
        if secret is not None and (not isinstance(secret, str) or not secret):
            raise _BadRequest("secret must be a non-empty string")
        hook = await self._webhooks().add(_doc_id(req), _str(req, "url", ""), prefix=_str(req, "prefix", ""), secret=secret)
        return self._ok(req_id, hook)

    async def _op_webhook_list(self, conn: ServerConnection, req_id: Any, req: dict[str, Any]) -> str:
        return self._ok(req_id, await self._webhooks().list())

    async def _op_webhook_remove(self, conn: ServerConnection, req_id: Any, req: dict[str, Any]) -> str:
        webhook_id = _str(req, "webhook", "")
        if not await self._webhooks().remove(webhook_id):
            raise NotFound(f"no webhook {webhook_id!r} (see ctxsync webhook list)")
        return self._ok(req_id, {"removed": webhook_id})

    async def _op_webhook_failures(self, conn: ServerConnection, req_id: Any, req: dict[str, Any]) -> str:
        webhook_id = req.get("webhook")
        if webhook_id is not None and not isinstance(webhook_id, str):
            raise _BadRequest("webhook must be a webhook id")
        return self._ok(req_id, await self._webhooks().failures(webhook_id))

    async def _op_reload_peers(self, conn: ServerConnection, req_id: Any, req: dict[str, Any]) -> str:
        return self._ok(req_id, {"peers": await self.reload_peers()})

    async def _op_invite(self, conn: ServerConnection, req_id: Any, req: dict[str, Any]) -> str:
        if self.invite is None:
            raise _BadRequest("this daemon does not serve invites")
        contexts = req.get("contexts", ["*"])
        if not isinstance(contexts, list) or not contexts or not all(isinstance(c, str) and c for c in contexts):
            raise _BadRequest("contexts must be a non-empty list of context names")
        read_only = req.get("read_only", False)
        ttl_s = req.get("ttl_s", 300)
        addr = req.get("addr")
        if not isinstance(read_only, bool):
            raise _BadRequest("read_only must be a boolean")
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not 1 <= ttl_s <= 86_400:
            raise _BadRequest("ttl_s must be a number of seconds from 1 to 86400")
        if addr is not None and (not isinstance(addr, str) or not addr):
            raise _BadRequest("addr must be a host name or address")
        return self._ok(req_id, await self.invite(contexts, read_only, float(ttl_s), addr))

    async def _op_stop(self, conn: ServerConnection, req_id: Any, req: dict[str, Any]) -> str:
        self.stop()
        return self._ok(req_id, {"stopping": True})


class _BadRequest(CtxSyncError):
    pass


def _set_args(req: dict[str, Any]) -> tuple[DocId, list[tuple[str, str | None]]]:
    """The context and ``(key, value_json_or_None)`` items of a ``set`` request; _BadRequest if malformed."""
    items = req.get("items")
    if not isinstance(items, list) or not items:
        raise _BadRequest("items must be a non-empty list of [key, value_json_or_null]")
    pairs: list[tuple[str, str | None]] = []
    for it in items:
        if not (isinstance(it, list) and len(it) == 2 and isinstance(it[0], str) and (it[1] is None or isinstance(it[1], str))):
            raise _BadRequest("each item must be [key, value_json_or_null]")
        if it[1] is not None and not _is_json_text(it[1]):
            try:
                json.loads(it[1])
            except (ValueError, RecursionError) as exc:
                raise _BadRequest(f"value of {it[0]!r} is not JSON text: {exc}") from None
        pairs.append((it[0], it[1]))
    return _doc_id(req), pairs


_scan_json = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]  # typeshed: takes the decoder


def _is_json_text(text: str) -> bool:
    """
    Tell quickly whether ``text`` is one JSON value with nothing around it.

    The fast path of a ``set``'s value check: the stdlib's C scanner, without the Python
    wrappers of :func:`json.loads` (1.7 -> 0.3 µs for a short value). False means "not sure":
    the caller runs :func:`json.loads`, which also accepts surrounding whitespace and gives the
    error message.
    """
    try:
        end: int = _scan_json(text, 0)[1]
    except Exception:  # StopIteration, JSONDecodeError, RecursionError: let json.loads decide
        return False
    return end == len(text)


def _set_json(req_id: Any, version: int, changed: int) -> str:
    """The response to a ``set``: ``{"id", "ok": true, "result": {"version", "changed"}}``."""
    rid = str(req_id) if type(req_id) is int else json.dumps(req_id)  # an int id is its own JSON
    return f'{{"id":{rid},"ok":true,"result":{{"version":{int(version)},"changed":{int(changed)}}}}}'


def _error_json(req_id: Any, code: str, message: str) -> str:
    return json.dumps({"id": req_id, "ok": False, "error": {"code": code, "message": message}}, separators=(",", ":"))


def _host_name(host: str) -> str:
    """The name of a Host header (``name``, ``name:port``, ``[v6]:port``), lower case, without port."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host[1:]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def _is_loopback_host(host: str) -> bool:
    """Tell whether a Host header (``name``, ``name:port``, ``[v6]:port``) names this machine's loopback."""
    name = _host_name(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _str(req: dict[str, Any], name: str, default: str) -> str:
    v = req.get(name, default)
    if not isinstance(v, str):
        raise _BadRequest(f"{name} must be a string")
    return v


def _opt_int(req: dict[str, Any], name: str, *, minimum: int) -> int | None:
    v = req.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _BadRequest(f"{name} must be an integer >= {minimum}")
    return v


def _doc_id(req: dict[str, Any]) -> DocId:
    v = req.get("context")
    if not isinstance(v, str) or not v:
        raise _BadRequest("context must be a non-empty string")
    return DocId(v)
