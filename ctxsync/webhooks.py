"""
Deliver each context's entry changes to webhook URLs: in order, at least once, signed.

This module owns the :class:`WebhookDispatcher` (one delivery task per webhook), the body and
headers of a delivery, its signature (:func:`sign`) and its retry policy (:func:`retry_delay`).

Delivery, per webhook:

1. Read the context's history after the webhook's cursor (the last version delivered), at most
   ``batch_max`` changes. A batch ends on a version boundary: the changes of one version are
   never split across two POSTs, unless that version alone has ``batch_max`` changes or more
   (then it goes out in parts of ``batch_max`` changes, each with ``from_version`` and
   ``to_version`` unchanged, and the cursor moves past it after the last part only).
2. Keep the changes whose key starts with the webhook's prefix. If none does, move the cursor
   without a POST (unless the batch is truncated: see below).
3. POST the batch. A 2xx answer moves the cursor to ``to_version``; anything else (other
   status, redirect, connection error, timeout) is retried after :func:`retry_delay`. After
   ``max_attempts`` attempts the batch goes to the dead-letter list, and the cursor moves on, in
   one transaction.

The cursor is in the store, so delivery resumes after a restart; a batch that was in flight
(or delivered but not yet recorded) when the node stopped is sent again: receivers must accept
duplicates (the ``X-Ctxsync-Delivery`` header, derived from the body, identifies them).

The history is bounded. When changes after the cursor have already been dropped from it
(``cursor + 1 < history_from``), the next POST says so: ``"truncated": true`` with the versions
possibly missed in ``missed_from`` .. ``missed_to`` (inclusive). It is sent even if none of its
changes match the prefix.

Body (``application/json``, UTF-8, ASCII only)::

    {"webhook_id": "wh-0123456789", "context": "tasks", "node_id": "...",
     "from_version": 4, "to_version": 6,
     "truncated": false, "missed_from": null, "missed_to": null,
     "changes": [{"version": 4, "key": "task/1", "value": {"done": true}, "previous": null, "deleted": false,
                  "origin": "<node id of the writer>", "t_ms": 1717000000000,
                  "hlc": "018fc5f1a2b30001"}, ...]}

``value`` and ``previous`` are the entry's JSON values (``null``: absent or deleted); integers
keep every digit. A value whose stored text is not strict JSON (or has a number no JSON
reader can hold: ``NaN``, ``1e400``, an integer of more than 4,300 digits) is sent as its text,
in a JSON string, and the change lists that field in ``"not_json": ["value"]``.

Headers:

- ``Content-Type: application/json``, ``User-Agent: ctxsync/<version>``
- ``X-Ctxsync-Webhook``: the webhook id.
- ``X-Ctxsync-Delivery``: the batch's id (a UUID). The same on every retry and after a
  restart, as long as the batch is the same.
- ``X-Ctxsync-Signature``: ``sha256=`` and the lowercase hex HMAC-SHA256 of the raw request
  body, keyed with the webhook's secret (UTF-8), as GitHub's ``X-Hub-Signature-256``. Check it
  on the raw bytes, before parsing, with a constant-time comparison::

      import hashlib, hmac

      def verify(secret: str, body: bytes, header: str) -> bool:
          expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
          return hmac.compare_digest(expected, header)

This module imports the standard library, structlog, and from ctxsync only ``store``,
``config``, ``errors`` and ``types``: nothing above the store. The daemon builds the dispatcher
and calls :meth:`WebhookDispatcher.notify` when the mesh has made a version durable.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import hashlib
import hmac
import http.client
import json
import random
import secrets
import ssl
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import structlog

from ctxsync import __version__
from ctxsync.config import WebhooksConfig
from ctxsync.errors import CtxSyncError, EntryError, InvalidState
from ctxsync.store import HistoryRecord, Store, StoredWebhook
from ctxsync.types import DocId, is_valid_doc_id

__all__ = ["USER_AGENT", "Target", "WebhookDispatcher", "parse_url", "retry_delay", "sign"]

log = structlog.get_logger("ctxsync.webhooks")

USER_AGENT = f"ctxsync/{__version__}"
"""``User-Agent`` of every delivery."""

MAX_EXCERPT_BYTES = 512
"""Most bytes of a failed response's body kept in the error message."""

_ID_PREFIX = "wh-"


# -- pure helpers ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """Where a webhook POSTs to, taken apart by :func:`parse_url`."""

    https: bool
    host: str
    """Host name or IP address, without brackets."""
    port: int | None
    """``None``: the scheme's default port."""
    request_target: str
    """Path and query, as sent on the request line (``"/"`` at least)."""


def parse_url(url: str) -> Target:
    """
    Check a webhook URL and take it apart.

    Args:
        url: ``http://`` or ``https://`` URL with a host, in ASCII (percent-encode the rest).
            A fragment is ignored.

    Returns:
        The :class:`Target` a POST goes to.

    Raises:
        EntryError: If the scheme is not http or https, the host is missing, the port is
            invalid, or the URL has credentials (``user:password@``), whitespace, control or
            non-ASCII characters.
    """
    if not isinstance(url, str) or not url:
        raise EntryError("webhook url must be a non-empty string, e.g. https://example.com/hook")
    if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        raise EntryError(
            f"webhook url {url!r} has whitespace, control or non-ASCII characters: percent-encode them"
        )
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise EntryError(f"webhook url {url!r} must start with http:// or https://")
    if parts.username is not None or parts.password is not None:
        raise EntryError(
            "webhook url must not carry credentials (user:password@): "
            "receivers authenticate deliveries with the X-Ctxsync-Signature header"
        )
    if not parts.hostname:
        raise EntryError(f"webhook url {url!r} has no host")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise EntryError(f"webhook url {url!r} has an invalid port (use 1-65535)")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(scheme == "https", parts.hostname, port, path)


def sign(secret: str, body: bytes) -> str:
    """
    Sign a delivery body.

    Args:
        secret: The webhook's secret (keyed as its UTF-8 bytes).
        body: The raw request body, exactly as sent.

    Returns:
        The ``X-Ctxsync-Signature`` header value: ``"sha256="`` and 64 lowercase hex digits.
    """
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def retry_delay(
    attempt: int, *, backoff_s: float, max_backoff_s: float, rand: Callable[[], float] = random.random
) -> float:
    """
    Return how long to wait after failed attempt number ``attempt``, in seconds.

    Exponential backoff with *equal jitter*: the ceiling ``backoff_s * 2 ** (attempt - 1)``,
    capped at ``max_backoff_s``, is halved, and a uniformly random part of the other half is
    added. So the delay is always between half the ceiling and the ceiling: retries of many
    webhooks spread out, yet never come back sooner than half the planned delay.

    Args:
        attempt: Failed attempts so far, from 1.
        backoff_s: Ceiling after the first failure, in seconds.
        max_backoff_s: Largest ceiling, in seconds.
        rand: Returns a float in ``[0, 1)``.

    Raises:
        ValueError: If ``attempt`` is below 1.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be at least 1, not {attempt}")
    ceiling = min(max_backoff_s, backoff_s * 2.0 ** min(attempt - 1, 60))
    return ceiling / 2 + rand() * ceiling / 2


def _strict_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} does not fit a double")
    return value


def _parse_json_text(text: str) -> Any:
    """Parse stored JSON text strictly (no NaN/Infinity, no overflowing numbers); ValueError if not."""
    return json.loads(text, parse_constant=_strict_constant, parse_float=_finite_float)


def _change(rec: HistoryRecord) -> dict[str, Any]:
    """One element of a body's ``changes``."""
    r = rec.record
    change: dict[str, Any] = {"version": rec.version, "key": r.get("key")}
    not_json: list[str] = []
    for field in ("value", "previous"):
        text = r.get(field)
        if text is None:
            change[field] = None
            continue
        try:
            change[field] = _parse_json_text(text) if isinstance(text, str) else None
        except ValueError:  # JSONDecodeError, non-JSON constants, too many digits
            change[field] = text
            not_json.append(field)
    change["deleted"] = r.get("value") is None  # a JSON null value is not a deletion
    change["origin"] = r.get("origin")
    change["t_ms"] = r.get("t_ms")
    change["hlc"] = r.get("hlc")
    if not_json:
        change["not_json"] = not_json
    return change


def _encode(body: dict[str, Any]) -> bytes:
    """Serialize a body: compact, ASCII only (lone surrogates stay escaped), never NaN."""
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode("ascii")


def _delivery_id(body: bytes) -> str:
    """A UUID derived from the body: the same batch always gets the same id."""
    return str(uuid.UUID(bytes=hashlib.sha256(b"ctxsync-delivery\x00" + body).digest()[:16], version=4))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- HTTP (runs on a worker thread) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    reason: str
    location: str | None
    excerpt: str
    """Start of the body of a non-2xx answer; empty for a 2xx one."""


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def _http_post(target: Target, body: bytes, headers: Mapping[str, str], timeout_s: float) -> _Response:
    """POST ``body`` once; no redirects followed, no proxies. Raises OSError, http.client.HTTPException."""
    conn: http.client.HTTPConnection
    if target.https:
        conn = http.client.HTTPSConnection(
            target.host, target.port, timeout=timeout_s, context=_tls_context()
        )
    else:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout_s)
    try:
        conn.request("POST", target.request_target, body=body, headers=dict(headers))
        resp = conn.getresponse()
        excerpt = ""
        if not 200 <= resp.status < 300:
            excerpt = resp.read(MAX_EXCERPT_BYTES).decode("utf-8", "replace").strip()
        return _Response(resp.status, resp.reason, resp.getheader("Location"), excerpt)
    finally:
        conn.close()


def _response_error(resp: _Response) -> str | None:
    """The error of a response, or ``None`` if it acknowledges the delivery (2xx)."""
    if 200 <= resp.status < 300:
        return None
    if 300 <= resp.status < 400:
        return (
            f"HTTP {resp.status} {resp.reason}: redirect to {resp.location!r} not followed;"
            " set the webhook's url to the final address"
        )
    return f"HTTP {resp.status} {resp.reason}" + (f": {resp.excerpt}" if resp.excerpt else "")


# -- the dispatcher -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Batch:
    """One POST, ready to send (and to re-send: body and delivery id never change)."""

    body_obj: dict[str, Any]
    body: bytes
    delivery_id: str
    changes: int
    advance_to: int
    """Cursor once this batch is delivered or dead-lettered."""


@dataclass(frozen=True, slots=True)
class _Plan:
    """The changes after the cursor: POST ``batches`` in order, then move the cursor to ``advance_to``."""

    batches: list[_Batch]
    advance_to: int


class _Webhook:
    """A webhook's settings and its delivery state, on the event loop thread."""

    def __init__(self, stored: StoredWebhook) -> None:
        self.id = stored.id
        self.doc_id = stored.doc_id
        self.created_at_ms = stored.created_at_ms
        self.url = str(stored.data.get("url", ""))
        self.prefix = str(stored.data.get("prefix") or "")
        self.secret = str(stored.data.get("secret") or "")
        self.target: Target | None = None
        """Where to POST; ``None`` until checked (see :meth:`check`)."""
        self.cursor = stored.cursor
        """Last version delivered or dead-lettered, as committed to the store."""
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.attempts = 0
        """Failed attempts of the batch being delivered."""
        self.last_error: str | None = stored.error
        """Why the last attempt of the batch being delivered failed (or why the stored webhook cannot be read)."""
        self.retry_at_ms: int | None = None
        """When the next attempt is due (Unix ms), while waiting to retry."""

    def check(self) -> Target:
        """Parse the url and check the secret (a stored webhook could be damaged). Raises EntryError."""
        self.target = parse_url(self.url)
        if not self.secret:
            raise EntryError(f"webhook {self.id} has no secret")
        return self.target


class WebhookDispatcher:
    """
    Deliver each webhook's changes in order, at least once (see the module docstring).

    Use ``async with WebhookDispatcher(...) as dispatcher:``, or :meth:`start` and :meth:`stop`.
    Everything runs on the event loop thread; only the HTTP requests run on worker threads.

    Args:
        store: The node's open store: webhooks, their cursors, the history, dead letters.
        config: Retry, timeout and batch settings (``[webhooks]``).
        node_id: This node's id, sent in every body as ``node_id``.
        current_version: Returns a context's current version (0 for a context that does not
            exist yet). A new webhook starts there: it gets only the changes made after it.
        unstored_from: Returns the lowest version of a context whose commit failed and that is
            kept for a retry (``Mesh.unstored_from``), or None. Delivery stops before it: later
            versions may be stored already, and a cursor past it would never deliver it.
    """

    def __init__(
        self,
        store: Store,
        config: WebhooksConfig,
        node_id: str,
        *,
        current_version: Callable[[DocId], int],
        unstored_from: Callable[[DocId], int | None] = lambda doc_id: None,
    ) -> None:
        self._store = store
        self._config = config
        self._node_id = node_id
        self._current_version = current_version
        self._unstored_from = unstored_from
        self._hooks: dict[str, _Webhook] = {}
        self._running = False
        self._loader: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> WebhookDispatcher:
        """Call :meth:`start`."""
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Call :meth:`stop`."""
        await self.stop()

    async def start(self) -> None:
        """
        Load the webhooks from the store and start one delivery task per webhook.

        If the store cannot list them, log ``webhook.load_failed`` and keep trying in the
        background (with :func:`retry_delay`); never raise for that.

        Raises:
            InvalidState: If the dispatcher is already running.
        """
        if self._running:
            raise InvalidState("webhook dispatcher already started")
        self._running = True
        if not await self._load():
            self._loader = asyncio.create_task(self._load_until_done(), name="webhooks-load")

    async def stop(self) -> None:
        """
        Cancel every delivery task and wait for them to end.

        A POST in flight is abandoned (its worker thread ends by itself within ``timeout_s``
        seconds); its batch is sent again after the next :meth:`start`. Idempotent.
        """
        self._running = False
        tasks = [h.task for h in self._hooks.values() if h.task is not None]
        if self._loader is not None:
            tasks.append(self._loader)
            self._loader = None
        for hook in self._hooks.values():
            hook.task = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._hooks.clear()

    def notify(self, doc_id: DocId, version: int) -> None:
        """
        Wake the webhooks of ``doc_id``: its version ``version`` (and its history) is durable.

        Synchronous; call on the event loop thread, after the store committed the version.
        """
        for hook in self._hooks.values():
            if hook.doc_id == doc_id:
                hook.wake.set()

    # -- management --------------------------------------------------------------------------

    async def add(
        self, doc_id: DocId, url: str, *, prefix: str = "", secret: str | None = None
    ) -> dict[str, Any]:
        """
        Create a webhook, store it durably and start delivering to it.

        It gets the changes made after now: its cursor starts at the context's current version.

        Args:
            doc_id: The context to watch; it need not exist yet.
            url: Where to POST (see :func:`parse_url`).
            prefix: Only changes of keys starting with it are sent (``""``: all).
            secret: HMAC key of the signatures; a random one (32 URL-safe characters) if ``None``.

        Returns:
            ``{"id", "context", "url", "prefix", "cursor", "created_at_ms", "secret"}``. This is
            the only answer that carries the secret.

        Raises:
            EntryError: If the context name, url, prefix or secret is invalid.
            StoreError: If it could not be stored.
        """
        if not isinstance(doc_id, str) or not is_valid_doc_id(doc_id):
            raise EntryError(f"invalid context name {doc_id!r}")
        target = parse_url(url)
        if not isinstance(prefix, str):
            raise EntryError(f"webhook prefix must be a string, not {type(prefix).__name__}")
        if secret is not None and (not isinstance(secret, str) or not secret):
            raise EntryError("webhook secret must be a non-empty string (or left out to get a random one)")
        stored = StoredWebhook(
            id=_ID_PREFIX + secrets.token_hex(5),
            doc_id=doc_id,
            created_at_ms=_now_ms(),
            cursor=self._current_version(doc_id),
            data={"url": url, "prefix": prefix, "secret": secret or secrets.token_urlsafe(24)},
        )
        await self._store.put_webhook(stored)
        hook = _Webhook(stored)
        hook.target = target
        if self._running:  # else start() loads it from the store
            self._hooks[hook.id] = hook
            self._spawn(hook)
        log.info(
            "webhook.added",
            webhook_id=hook.id,
            doc_id=doc_id,
            host=target.host,
            prefix=prefix,
            cursor=hook.cursor,
        )
        return {
            "id": hook.id,
            "context": hook.doc_id,
            "url": hook.url,
            "prefix": hook.prefix,
            "cursor": hook.cursor,
            "created_at_ms": hook.created_at_ms,
            "secret": hook.secret,
        }

    async def remove(self, webhook_id: str) -> bool:
        """
        Stop delivering to a webhook and delete it and its dead letters durably.

        Returns:
            Whether it existed.

        Raises:
            StoreError: If it could not be deleted (delivery to it has stopped anyway until
                the next start).
        """
        hook = self._hooks.pop(webhook_id, None)
        if hook is not None and hook.task is not None:
            hook.task.cancel()
            await asyncio.wait([hook.task])
            hook.task = None
        existed = await self._store.delete_webhook(webhook_id)
        if existed:
            log.info("webhook.removed", webhook_id=webhook_id)
        return existed

    async def list(self) -> list[dict[str, Any]]:
        """
        Describe every webhook, oldest first, without its secret.

        Returns:
            One ``{"id", "context", "url", "prefix", "cursor", "created_at_ms",
            "pending_versions", "attempts", "last_error", "retry_at_ms", "failures"}`` per
            webhook: ``cursor`` is the last version delivered; ``pending_versions`` how many
            versions of the context came after it; ``attempts`` and ``last_error`` describe the
            batch being delivered (``0`` and ``null`` when none failed); ``retry_at_ms`` when
            its next attempt is due (Unix ms, or ``null``); ``failures`` how many batches are
            in the dead-letter list.

        Raises:
            StoreError: If the store could not be read.
        """
        stored = await self._store.list_webhooks()
        counts: dict[str, int] = {}
        for _, webhook_id, _, _ in await self._store.list_webhook_failures():
            counts[webhook_id] = counts.get(webhook_id, 0) + 1
        out = []
        for s in stored:
            hook = self._hooks.get(s.id) or _Webhook(s)
            out.append({**self._to_json(hook), "failures": counts.get(s.id, 0)})
        return out

    # ``list`` is a method from here on: annotations say ``builtins.list``.
    async def failures(self, webhook_id: str | None = None) -> builtins.list[dict[str, Any]]:
        """
        List the dead letters: batches given up after ``max_attempts`` attempts, oldest first.

        Args:
            webhook_id: Only this webhook's; ``None`` for all.

        Returns:
            One ``{"seq", "webhook_id", "failed_at_ms", "attempts", "error", "delivery_id",
            "body"}`` per batch; ``body`` is the JSON object that was POSTed.

        Raises:
            StoreError: If the store could not be read.
        """
        return [
            {
                "seq": seq,
                "webhook_id": wid,
                "failed_at_ms": failed_at_ms,
                "attempts": failure.get("attempts"),
                "error": failure.get("error"),
                "delivery_id": failure.get("delivery_id"),
                "body": failure.get("body"),
            }
            for seq, wid, failed_at_ms, failure in await self._store.list_webhook_failures(webhook_id)
        ]

    # -- internals ---------------------------------------------------------------------------

    def _to_json(self, hook: _Webhook) -> dict[str, Any]:
        return {
            "id": hook.id,
            "context": hook.doc_id,
            "url": hook.url,
            "prefix": hook.prefix,
            "cursor": hook.cursor,
            "created_at_ms": hook.created_at_ms,
            "pending_versions": max(0, self._current_version(hook.doc_id) - hook.cursor),
            "attempts": hook.attempts,
            "last_error": hook.last_error,
            "retry_at_ms": hook.retry_at_ms,
        }

    async def _load(self) -> bool:
        """Load the stored webhooks and start their tasks; log and return False if the store failed."""
        try:
            stored = await self._store.list_webhooks()
        except CtxSyncError as exc:
            log.error("webhook.load_failed", error=str(exc))
            return False
        for s in stored:
            if s.id in self._hooks:  # added while loading
                continue
            hook = _Webhook(s)
            if s.error is not None:
                log.error("webhook.unreadable", webhook_id=s.id, doc_id=s.doc_id, error=s.error)
                continue
            try:
                hook.check()
            except EntryError as exc:
                log.error("webhook.invalid", webhook_id=s.id, doc_id=s.doc_id, error=str(exc))
                continue
            self._hooks[hook.id] = hook
            self._spawn(hook)
        return True

    async def _load_until_done(self) -> None:
        attempt = 0
        while True:
            attempt += 1
            await asyncio.sleep(self._delay(attempt))
            if await self._load():
                return

    def _delay(self, attempt: int) -> float:
        return retry_delay(
            attempt, backoff_s=self._config.backoff_s, max_backoff_s=self._config.max_backoff_s
        )

    def _spawn(self, hook: _Webhook) -> None:
        hook.wake.set()  # read the history once at start
        hook.task = asyncio.create_task(self._run(hook), name=f"webhook-{hook.id}")

    async def _run(self, hook: _Webhook) -> None:
        """Deliver forever; only cancellation ends it."""
        failures = 0  # consecutive store (or unexpected) errors
        while True:
            await hook.wake.wait()
            hook.wake.clear()
            try:
                plan = await self._plan(hook)
                if plan is None:
                    continue
                for batch in plan.batches:
                    await self._deliver(hook, batch)
                if plan.advance_to > hook.cursor:
                    await self._advance(hook, plan.advance_to)
                failures = 0
                hook.wake.set()  # there may be more after this batch
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                delay_s = self._delay(failures)
                if isinstance(exc, CtxSyncError):
                    log.warning(
                        "webhook.store_error",
                        webhook_id=hook.id,
                        doc_id=hook.doc_id,
                        error=str(exc),
                        delay_s=round(delay_s, 3),
                    )
                else:  # a bug: keep the traceback, keep the daemon
                    log.error(
                        "webhook.error",
                        webhook_id=hook.id,
                        doc_id=hook.doc_id,
                        error=repr(exc),
                        delay_s=round(delay_s, 3),
                        exc_info=True,
                    )
                await asyncio.sleep(delay_s)
                hook.wake.set()

    async def _plan(self, hook: _Webhook) -> _Plan | None:
        """
        Read the history after the cursor and cut it into batches; ``None`` if there is nothing.

        Raises:
            StoreError: If the history could not be read.
        """
        cursor, batch_max = hook.cursor, self._config.batch_max
        page = await self._store.read_history(hook.doc_id, since=cursor, limit=batch_max)
        history_from = page.history_from
        truncated = cursor + 1 < history_from
        records = page.records
        if not records and not truncated:
            return None
        split = False
        if len(records) >= batch_max:
            last = records[-1].version
            whole = [r for r in records if r.version != last]
            if whole:  # the last version may go on past this page: leave it to the next batch
                records = whole
            else:  # one version of batch_max changes or more: read all of it, send it in parts
                full = await self._store.read_history(
                    hook.doc_id, since=cursor, limit=max(self._store.history_limit, batch_max) + 1
                )
                records = [r for r in full.records if r.version == last]
                split = True
                # A dropped version's gap (Mesh.unstored_from) may have been committed between
                # the two reads: the newer mark counts, or the cursor would pass it unwarned.
                history_from = max(history_from, full.history_from)
                truncated = cursor + 1 < history_from
        floor = self._unstored_from(hook.doc_id)
        if floor is not None:
            records = [r for r in records if r.version < floor]
        to_version = records[-1].version if records else cursor
        if truncated:
            to_version = max(to_version, history_from - 1)
            if floor is not None:
                to_version = max(cursor, min(to_version, floor - 1))
        if not records and to_version <= cursor:
            return None  # waiting for the store to commit the version after the cursor
        if truncated:
            log.warning(
                "webhook.truncated",
                webhook_id=hook.id,
                doc_id=hook.doc_id,
                missed_from=cursor + 1,
                missed_to=history_from - 1,
            )
        matching = [
            r for r in records if isinstance(k := r.record.get("key"), str) and k.startswith(hook.prefix)
        ]
        if not matching and not truncated:
            log.debug(
                "webhook.skipped",
                webhook_id=hook.id,
                doc_id=hook.doc_id,
                from_version=cursor + 1,
                to_version=to_version,
            )
            return _Plan([], to_version)
        parts = [matching]
        if split and matching:
            parts = [matching[i : i + batch_max] for i in range(0, len(matching), batch_max)]
        batches = []
        for n, part in enumerate(parts):
            body_obj: dict[str, Any] = {
                "webhook_id": hook.id,
                "context": hook.doc_id,
                "node_id": self._node_id,
                "from_version": cursor + 1,
                "to_version": to_version,
                "truncated": truncated and n == 0,
                "missed_from": cursor + 1 if truncated and n == 0 else None,
                "missed_to": history_from - 1 if truncated and n == 0 else None,
                "changes": [_change(r) for r in part],
            }
            body = _encode(body_obj)
            # The cursor passes a split version only after its last part.
            advance_to = to_version if n == len(parts) - 1 else cursor
            batches.append(_Batch(body_obj, body, _delivery_id(body), len(part), advance_to))
        return _Plan(batches, to_version)

    async def _deliver(self, hook: _Webhook, batch: _Batch) -> None:
        """POST one batch until it is acknowledged or dead-lettered, then move the cursor."""
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Ctxsync-Webhook": hook.id,
            "X-Ctxsync-Delivery": batch.delivery_id,
            "X-Ctxsync-Signature": sign(hook.secret, batch.body),
            "Connection": "close",
        }
        fields = {"webhook_id": hook.id, "doc_id": hook.doc_id, "delivery_id": batch.delivery_id}
        target = hook.target or hook.check()
        attempt = 0
        while True:
            attempt += 1
            started = time.monotonic()
            status: int | None = None
            try:
                async with asyncio.timeout(self._config.timeout_s):
                    resp = await asyncio.to_thread(
                        _http_post, target, batch.body, headers, self._config.timeout_s
                    )
                status, error = resp.status, _response_error(resp)
            except TimeoutError:
                error = f"timed out after {self._config.timeout_s} s"
            except (OSError, http.client.HTTPException, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            duration_ms = round((time.monotonic() - started) * 1000, 1)
            if error is None:
                log.debug(
                    "webhook.delivered",
                    **fields,
                    changes=batch.changes,
                    status=status,
                    duration_ms=duration_ms,
                    attempts=attempt,
                )
                await self._advance(hook, batch.advance_to)
                hook.attempts, hook.last_error = 0, None
                return
            hook.attempts, hook.last_error = attempt, error
            if attempt >= self._config.max_attempts:
                log.error(
                    "webhook.failed",
                    **fields,
                    attempts=attempt,
                    error=error,
                    changes=batch.changes,
                    from_version=batch.body_obj["from_version"],
                    to_version=batch.body_obj["to_version"],
                )
                failure = {
                    "body": batch.body_obj,
                    "error": error,
                    "attempts": attempt,
                    "delivery_id": batch.delivery_id,
                }
                await self._advance(hook, batch.advance_to, failure)
                hook.attempts, hook.last_error = 0, None
                return
            delay_s = self._delay(attempt)
            log.warning(
                "webhook.retry",
                **fields,
                attempt=attempt,
                error=error,
                status=status,
                duration_ms=duration_ms,
                delay_s=round(delay_s, 3),
            )
            hook.retry_at_ms = _now_ms() + int(delay_s * 1000)
            try:
                await asyncio.sleep(delay_s)
            finally:
                hook.retry_at_ms = None

    async def _advance(self, hook: _Webhook, cursor: int, failure: dict[str, Any] | None = None) -> None:
        """Commit the cursor (and a dead letter), retrying while the store fails; never gives up."""
        attempt = 0
        while True:
            try:
                await self._store.advance_webhook(hook.id, cursor, failure)
            except CtxSyncError as exc:
                attempt += 1
                delay_s = self._delay(attempt)
                log.warning(
                    "webhook.store_error",
                    webhook_id=hook.id,
                    doc_id=hook.doc_id,
                    error=str(exc),
                    delay_s=round(delay_s, 3),
                )
                await asyncio.sleep(delay_s)
                continue
            hook.cursor = max(hook.cursor, cursor)
            return
