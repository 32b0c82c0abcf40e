"""Tests of ctxsync.webhooks: a real store in tmp_path, real pycrdt updates, a real HTTP receiver on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Doc, Map, TransactionEvent
from structlog.testing import capture_logs

from ctxsync import __version__
from ctxsync.config import WebhooksConfig
from ctxsync.entries import format_hlc
from ctxsync.errors import EntryError
from ctxsync.store import Store
from ctxsync.types import DocId
from ctxsync.webhooks import WebhookDispatcher, retry_delay
from tests.helpers import MS, wait_until

CTX = DocId("tasks")
NODE = "NODEAAA-TEST"
WRITER = "WRITERB-PEER"
WAIT_S = 5000 * MS
FAST = {"backoff_s": 0.02, "max_backoff_s": 0.1, "timeout_s": 2.0}


# -- a real HTTP receiver ---------------------------------------------------------------------


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    """Header names in lower case."""
    body: bytes
    status: int | None
    """What the receiver answered; ``None`` if it hung."""

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """An HTTP server on 127.0.0.1 that records every request; it can fail, redirect or hang on demand."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.fail_next = 0
        """Answer the next this many requests with 500."""
        self.redirect_next = 0
        """Answer the next this many requests with a 302 to ``/elsewhere``."""
        self.hang_next = 0
        """Never answer the next this many requests (until :attr:`release` is set, then drop them)."""
        self.release = threading.Event()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver._lock:
                    if receiver.hang_next:
                        receiver.hang_next -= 1
                        status = None
                    elif receiver.fail_next:
                        receiver.fail_next -= 1
                        status = 500
                    elif receiver.redirect_next:
                        receiver.redirect_next -= 1
                        status = 302
                    else:
                        status = 200
                    receiver.requests.append(Request(self.path, headers, body, status))
                if status is None:
                    receiver.release.wait(30)
                    self.close_connection = True
                    return
                self.send_response(status)
                if status == 302:
                    self.send_header("Location", f"{receiver.url}/elsewhere")
                reply = b"boom" if status == 500 else b""
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, name="receiver", daemon=True
        )
        self._thread.start()

    def delivered(self) -> list[Request]:
        """The requests answered with 200, in order."""
        with self._lock:
            return [r for r in self.requests if r.status == 200]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()


def verify(secret: str, body: bytes, header: str) -> bool:
    """The receiver's check, as given in the ctxsync.webhooks docstring."""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header)


# -- a context written the way the mesh writes it ----------------------------------------------


class Context:
    """A real pycrdt document; each version goes to the store with its history records."""

    def __init__(self, doc_id: DocId = CTX) -> None:
        self.doc_id = doc_id
        self.doc: Doc[Any] = Doc()
        self.entries = self.doc.get("entries", type=Map)
        self.updates: list[bytes] = []
        self.doc.observe(self._on_transaction)
        self.version = 0

    def _on_transaction(self, event: TransactionEvent) -> None:
        self.updates.append(event.update)

    def append_nowait(self, store: Store, items: dict[str, str | None]) -> asyncio.Future[None]:
        """Write one version: ``{key: JSON text, or None to delete}``."""
        version, update, history = self.make_version(items)
        return store.append_nowait(self.doc_id, version, update, history=history)

    def make_version(self, items: dict[str, str | None]) -> tuple[int, bytes, list[tuple[int, dict[str, Any]]]]:
        """Make the next version without storing it: ``(version, update, history)``."""
        history: list[tuple[int, dict[str, Any]]] = []
        now_ms = time.time_ns() // 1_000_000
        with self.doc.transaction():
            for idx, (key, value) in enumerate(items.items()):
                previous = self.entries.get(key)
                if value is None:
                    del self.entries[key]
                else:
                    self.entries[key] = value
                record = {"t_ms": now_ms, "origin": WRITER, "key": key, "value": value, "previous": previous,
                          "hlc": format_hlc(now_ms, idx)}  # fmt: skip
                history.append((idx, record))
        self.version += 1
        return self.version, self.updates[-1], history

    async def write(self, store: Store, items: dict[str, str | None]) -> None:
        await self.append_nowait(store, items)


class Env:
    """A store, a receiver, a context and the dispatchers of one test (all stopped at its end)."""

    def __init__(self, tmp_path: Path, receiver: Receiver, stack: AsyncExitStack) -> None:
        self.path = tmp_path / "store.db"
        self.receiver = receiver
        self.ctx = Context()
        self.stack = stack
        self.store: Store

    async def open_store(self, **kwargs: Any) -> Store:
        self.store = await self.stack.enter_async_context(Store(self.path, **kwargs))
        return self.store

    def dispatcher(self, unstored_from: Callable[[DocId], int | None] = lambda doc_id: None, **config: Any) -> WebhookDispatcher:
        d = WebhookDispatcher(
            self.store,
            WebhooksConfig(**{**FAST, **config}),
            NODE,
            current_version=lambda doc_id: self.ctx.version if doc_id == self.ctx.doc_id else 0,
            unstored_from=unstored_from,
        )
        self.stack.push_async_callback(d.stop)
        return d

    async def started(self, **config: Any) -> WebhookDispatcher:
        d = self.dispatcher(**config)
        await d.start()
        return d

    async def write(self, d: WebhookDispatcher, items: dict[str, str | None]) -> None:
        await self.ctx.write(self.store, items)
        d.notify(self.ctx.doc_id, self.ctx.version)

    def hook_url(self) -> str:
        return f"{self.receiver.url}/hook"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
async def env(tmp_path: Path, receiver: Receiver) -> AsyncIterator[Env]:
    async with AsyncExitStack() as stack:
        e = Env(tmp_path, receiver, stack)
        await e.open_store()
        yield e


async def cursor_of(d: WebhookDispatcher, webhook_id: str) -> int:
    return next(int(h["cursor"]) for h in await d.list() if h["id"] == webhook_id)


async def wait_cursor(d: WebhookDispatcher, webhook_id: str, cursor: int) -> None:
    """Wait until the webhook's cursor is committed at ``cursor``."""
    deadline = time.monotonic() + WAIT_S
    while (now := await cursor_of(d, webhook_id)) != cursor:
        assert time.monotonic() < deadline, f"cursor {now}, not {cursor}, after {WAIT_S:.1f} s"
        await asyncio.sleep(0.005)


def keys(request: Request) -> list[str]:
    return [c["key"] for c in request.json()["changes"]]


# -- tests ----------------------------------------------------------------------------------------


async def test_delivers_versions_in_order_in_one_signed_batch(env: Env) -> None:
    """Sends the changes after the cursor oldest first, with parsed values, exact big integers and a valid signature."""
    d = await env.started()
    hook = await d.add(CTX, env.hook_url() + "?via=test", secret="s3cret")
    assert set(hook) == {"id", "context", "url", "prefix", "cursor", "created_at_ms", "secret"}
    assert hook["cursor"] == 0 and hook["secret"] == "s3cret" and hook["context"] == CTX
    big = "123456789012345678901234567890"
    futures = [
        env.ctx.append_nowait(env.store, {"a": "1"}),
        env.ctx.append_nowait(env.store, {"b": big, "c": '{"x": [true, null, 1.5]}'}),
        env.ctx.append_nowait(env.store, {"a": None}),
    ]  # queued together, before the dispatcher reads: one batch
    await asyncio.gather(*futures)
    d.notify(CTX, 3)
    await wait_until(lambda: len(env.receiver.requests) == 1, WAIT_S)
    await wait_cursor(d, hook["id"], 3)

    (req,) = env.receiver.requests
    body = req.json()
    assert req.path == "/hook?via=test"
    assert {k: body[k] for k in body if k != "changes"} == {
        "webhook_id": hook["id"], "context": CTX, "node_id": NODE, "from_version": 1, "to_version": 3,
        "truncated": False, "missed_from": None, "missed_to": None,
    }  # fmt: skip
    changes = body["changes"]
    assert [(c["version"], c["key"], c["value"], c["previous"]) for c in changes] == [
        (1, "a", 1, None),
        (2, "b", int(big), None),
        (2, "c", {"x": [True, None, 1.5]}, None),
        (3, "a", None, 1),
    ]
    assert big.encode() in req.body  # not rounded through a float
    assert all(c["origin"] == WRITER and isinstance(c["t_ms"], int) and len(c["hlc"]) == 16 for c in changes)

    assert req.headers["content-type"] == "application/json"
    assert req.headers["user-agent"] == f"ctxsync/{__version__}"
    assert req.headers["x-ctxsync-webhook"] == hook["id"]
    uuid.UUID(req.headers["x-ctxsync-delivery"])
    assert verify("s3cret", req.body, req.headers["x-ctxsync-signature"])
    assert not verify("wrong", req.body, req.headers["x-ctxsync-signature"])
    assert not verify("s3cret", req.body.replace(b'"a"', b'"A"'), req.headers["x-ctxsync-signature"])

    (listed,) = await d.list()
    assert "secret" not in listed
    assert listed | {"created_at_ms": 0} == {
        "id": hook["id"], "context": CTX, "url": env.hook_url() + "?via=test", "prefix": "", "cursor": 3,
        "created_at_ms": 0, "pending_versions": 0, "attempts": 0, "last_error": None, "retry_at_ms": None,
        "failures": 0,
    }  # fmt: skip


async def test_generated_secret_signs(env: Env) -> None:
    """Without a secret, add() makes a random one, returns it once, and signs with it."""
    d = await env.started()
    hook = await d.add(CTX, env.hook_url())
    other = await d.add(CTX, env.hook_url())
    assert len(hook["secret"]) >= 32 and hook["secret"] != other["secret"]
    assert hook["id"].startswith("wh-") and len(hook["id"]) == 13
    await env.write(d, {"k": '"v"'})
    await wait_until(lambda: len(env.receiver.requests) == 2, WAIT_S)
    by_hook = {r.headers["x-ctxsync-webhook"]: r for r in env.receiver.requests}
    req = by_hook[hook["id"]]
    assert verify(hook["secret"], req.body, req.headers["x-ctxsync-signature"])
    assert not verify(other["secret"], req.body, req.headers["x-ctxsync-signature"])


async def test_values_that_are_not_json_are_sent_as_text(env: Env) -> None:
    """A stored value that is not strict JSON (or overflows a double) arrives as its text, flagged in not_json."""
    d = await env.started()
    await d.add(CTX, env.hook_url())
    await env.write(d, {"nan": "NaN", "bad": "{oops", "huge": "1e400", "ok": "[1]"})
    await wait_until(lambda: len(env.receiver.requests) == 1, WAIT_S)
    changes = {c["key"]: c for c in env.receiver.requests[0].json()["changes"]}
    assert changes["nan"]["value"] == "NaN" and changes["nan"]["not_json"] == ["value"]
    assert changes["bad"]["value"] == "{oops" and changes["bad"]["not_json"] == ["value"]
    assert changes["huge"]["value"] == "1e400" and changes["huge"]["not_json"] == ["value"]
    assert changes["ok"]["value"] == [1] and "not_json" not in changes["ok"]


async def test_prefix_filter(env: Env) -> None:
    """Only changes of keys under the prefix are sent; a batch with none moves the cursor without a POST."""
    d = await env.started()
    everything = await d.add(CTX, env.hook_url())
    tasks = await d.add(CTX, env.hook_url(), prefix="task/")
    futures = [
        env.ctx.append_nowait(env.store, {"note/a": "1"}),
        env.ctx.append_nowait(env.store, {"task/1": "2", "note/b": "3"}),
        env.ctx.append_nowait(env.store, {"note/c": "4"}),
    ]
    await asyncio.gather(*futures)
    d.notify(CTX, 3)
    await wait_until(lambda: len(env.receiver.requests) == 2, WAIT_S)
    by_hook = {r.headers["x-ctxsync-webhook"]: r for r in env.receiver.requests}
    assert keys(by_hook[everything["id"]]) == ["note/a", "task/1", "note/b", "note/c"]
    assert keys(by_hook[tasks["id"]]) == ["task/1"]
    assert by_hook[tasks["id"]].json()["to_version"] == 3

    await env.write(d, {"note/d": "5"})
    await wait_cursor(d, tasks["id"], 4)
    await wait_until(lambda: len(env.receiver.requests) == 3, WAIT_S)
    assert keys(env.receiver.requests[2]) == ["note/d"]
    assert env.receiver.requests[2].headers["x-ctxsync-webhook"] == everything["id"]


async def test_batches_end_on_version_boundaries(env: Env) -> None:
    """A batch never splits a version, except one with more changes than batch_max, sent in parts."""
    d = await env.started(batch_max=3)
    hook = await d.add(CTX, env.hook_url())
    futures = [
        env.ctx.append_nowait(env.store, {"a": "1"}),
        env.ctx.append_nowait(env.store, {"b": "2", "c": "3"}),
        env.ctx.append_nowait(env.store, {"d": "4", "e": "5", "f": "6", "g": "7"}),
        env.ctx.append_nowait(env.store, {"h": "8"}),
    ]
    await asyncio.gather(*futures)
    d.notify(CTX, 4)
    await wait_until(lambda: len(env.receiver.requests) == 5, WAIT_S)
    await wait_cursor(d, hook["id"], 4)
    got = [(r.json()["from_version"], r.json()["to_version"], keys(r)) for r in env.receiver.requests]
    assert got == [
        (1, 1, ["a"]),
        (2, 2, ["b", "c"]),
        (3, 3, ["d", "e", "f"]),
        (3, 3, ["g"]),
        (4, 4, ["h"]),
    ]
    assert len({r.headers["x-ctxsync-delivery"] for r in env.receiver.requests}) == 5


async def test_retries_after_errors_then_delivers(env: Env) -> None:
    """500 answers are retried with backoff, the same body and delivery id each time, until a 2xx."""
    env.receiver.fail_next = 2
    d = await env.started(max_attempts=5)
    hook = await d.add(CTX, env.hook_url())
    with capture_logs() as logs:
        await env.write(d, {"k": "1"})
        await wait_cursor(d, hook["id"], 1)
    requests = env.receiver.requests
    assert [r.status for r in requests] == [500, 500, 200]
    assert len({r.body for r in requests}) == 1
    assert len({r.headers["x-ctxsync-delivery"] for r in requests}) == 1
    retries = [e for e in logs if e["event"] == "webhook.retry"]
    assert [(e["attempt"], e["webhook_id"], e["log_level"]) for e in retries] == [
        (1, hook["id"], "warning"),
        (2, hook["id"], "warning"),
    ]
    assert all(e["error"] == "HTTP 500 Internal Server Error: boom" for e in retries)
    assert 0.01 <= retries[0]["delay_s"] <= 0.02 and 0.02 <= retries[1]["delay_s"] <= 0.04
    (delivered,) = [e for e in logs if e["event"] == "webhook.delivered"]
    assert delivered["status"] == 200 and delivered["changes"] == 1 and delivered["duration_ms"] >= 0
    (listed,) = await d.list()
    assert listed["attempts"] == 0 and listed["last_error"] is None and listed["failures"] == 0


async def test_dead_letter_after_max_attempts(env: Env) -> None:
    """After max_attempts failures the batch is dead-lettered, the cursor moves on and the next batch is delivered."""
    env.receiver.fail_next = 3
    d = await env.started(max_attempts=3)
    hook = await d.add(CTX, env.hook_url())
    with capture_logs() as logs:
        await env.write(d, {"lost": "1"})
        await wait_cursor(d, hook["id"], 1)
    assert [r.status for r in env.receiver.requests] == [500, 500, 500]
    (failed,) = [e for e in logs if e["event"] == "webhook.failed"]
    assert failed["log_level"] == "error" and failed["attempts"] == 3 and failed["webhook_id"] == hook["id"]

    (failure,) = await d.failures()
    assert failure["webhook_id"] == hook["id"] and failure["attempts"] == 3
    assert failure["error"].startswith("HTTP 500")
    assert failure["body"] == env.receiver.requests[0].json()
    assert failure["delivery_id"] == env.receiver.requests[0].headers["x-ctxsync-delivery"]
    assert await d.failures(hook["id"]) == [failure] and await d.failures("wh-other") == []
    (listed,) = await d.list()
    assert listed["failures"] == 1 and listed["cursor"] == 1

    await env.write(d, {"next": "2"})
    await wait_until(lambda: len(env.receiver.delivered()) == 1, WAIT_S)
    body = env.receiver.delivered()[0].json()
    assert (body["from_version"], body["to_version"], [c["key"] for c in body["changes"]]) == (2, 2, ["next"])


async def test_redirect_is_a_failure(env: Env) -> None:
    """A 3xx answer is not followed: it is a failed attempt whose error names the redirect."""
    env.receiver.redirect_next = 1
    d = await env.started(max_attempts=1)
    hook = await d.add(CTX, env.hook_url())
    await env.write(d, {"k": "1"})
    await wait_cursor(d, hook["id"], 1)
    (failure,) = await d.failures(hook["id"])
    assert (
        "302" in failure["error"] and "/elsewhere" in failure["error"] and "not followed" in failure["error"]
    )
    await env.write(d, {"k": "2"})
    await wait_until(lambda: len(env.receiver.delivered()) == 1, WAIT_S)
    assert [r.path for r in env.receiver.requests] == ["/hook", "/hook"]


async def test_timeout_is_retried(env: Env) -> None:
    """A receiver that does not answer within timeout_s counts as a failed attempt and is retried."""
    env.receiver.hang_next = 1
    d = await env.started(timeout_s=max(0.3, 300 * MS))
    hook = await d.add(CTX, env.hook_url())
    with capture_logs() as logs:
        await env.write(d, {"k": "1"})
        await wait_cursor(d, hook["id"], 1)
    assert [r.status for r in env.receiver.requests] == [None, 200]
    assert env.receiver.requests[0].body == env.receiver.requests[1].body
    (retry,) = [e for e in logs if e["event"] == "webhook.retry"]
    assert "timed out" in retry["error"]


async def test_resumes_after_restart(env: Env) -> None:
    """After a restart delivery goes on from the stored cursor: nothing lost, nothing acknowledged sent twice."""
    d = await env.started()
    hook = await d.add(CTX, env.hook_url())
    await env.write(d, {"v1": "1"})
    await wait_cursor(d, hook["id"], 1)
    await d.stop()
    await env.ctx.write(env.store, {"v2": "2"})  # while no dispatcher runs
    await env.ctx.write(env.store, {"v3": "3"})
    await env.store.__aexit__(None, None, None)

    await env.open_store()
    d2 = await env.started()
    await wait_cursor(d2, hook["id"], 3)
    await env.write(d2, {"v4": "4"})
    await wait_cursor(d2, hook["id"], 4)
    delivered = env.receiver.delivered()
    assert [(r.json()["from_version"], r.json()["to_version"], keys(r)) for r in delivered] == [
        (1, 1, ["v1"]),
        (2, 3, ["v2", "v3"]),
        (4, 4, ["v4"]),
    ]
    assert len(env.receiver.requests) == 3


async def test_in_flight_batch_is_sent_again_after_restart(env: Env) -> None:
    """A POST abandoned by stop() is sent again after a restart, with the same body and delivery id."""
    env.receiver.hang_next = 1
    d = await env.started(timeout_s=30.0)
    hook = await d.add(CTX, env.hook_url())
    await env.write(d, {"k": "1"})
    await wait_until(lambda: len(env.receiver.requests) == 1, WAIT_S)
    await asyncio.wait_for(d.stop(), WAIT_S)  # does not wait for the hung POST
    await env.store.__aexit__(None, None, None)

    await env.open_store()
    d2 = await env.started()
    await wait_cursor(d2, hook["id"], 1)
    env.receiver.release.set()
    first, again = env.receiver.requests
    assert (first.status, again.status) == (None, 200)
    assert first.body == again.body
    assert first.headers["x-ctxsync-delivery"] == again.headers["x-ctxsync-delivery"]


async def test_truncated_when_history_passed_the_cursor(env: Env) -> None:
    """Changes dropped from the bounded history before delivery are reported as missed, even to a prefix that matches nothing."""
    await env.store.__aexit__(None, None, None)
    await env.open_store(history_limit=3)
    d = env.dispatcher()
    hook = await d.add(CTX, env.hook_url())  # stored; delivery starts with start()
    other = await d.add(CTX, env.hook_url(), prefix="zzz/")
    for n in range(1, 6):
        await env.ctx.write(env.store, {f"k{n}": str(n)})
    with capture_logs() as logs:
        await d.start()
        await wait_until(lambda: len(env.receiver.requests) == 2, WAIT_S)
    by_hook = {r.headers["x-ctxsync-webhook"]: r.json() for r in env.receiver.requests}
    body = by_hook[hook["id"]]
    assert (body["truncated"], body["missed_from"], body["missed_to"]) == (True, 1, 2)
    assert (body["from_version"], body["to_version"]) == (1, 5)
    assert [c["key"] for c in body["changes"]] == ["k3", "k4", "k5"]
    assert (by_hook[other["id"]]["truncated"], by_hook[other["id"]]["changes"]) == (True, [])
    truncated = [e for e in logs if e["event"] == "webhook.truncated"]
    assert {(e["webhook_id"], e["missed_from"], e["missed_to"], e["log_level"]) for e in truncated} == {
        (hook["id"], 1, 2, "warning"),
        (other["id"], 1, 2, "warning"),
    }
    await wait_cursor(d, hook["id"], 5)

    await env.write(d, {"k6": "6"})
    await wait_until(lambda: len(env.receiver.requests) == 3, WAIT_S)
    assert env.receiver.requests[2].json()["truncated"] is False


@pytest.mark.parametrize(
    "url",
    [
        "",
        "ftp://example.com/hook",
        "example.com/hook",
        "http://",
        "http:///hook",
        "https://user:pw@example.com/hook",
        "http://example.com:0/hook",
        "http://example.com:99999/hook",
        "http://example.com/a hook",
        "http://exämple.com/hook",
    ],
)
async def test_invalid_url_is_refused(env: Env, url: str) -> None:
    """A url that is not http(s) with a valid host and port is refused with EntryError, and nothing is stored."""
    d = await env.started()
    with pytest.raises(EntryError, match="webhook url"):
        await d.add(CTX, url)
    assert await d.list() == []


async def test_invalid_context_or_secret_is_refused(env: Env) -> None:
    """A bad context name or an empty secret is refused with EntryError."""
    d = await env.started()
    with pytest.raises(EntryError, match="context"):
        await d.add(DocId("no spaces"), env.hook_url())
    with pytest.raises(EntryError, match="secret"):
        await d.add(CTX, env.hook_url(), secret="")
    assert await d.list() == []


async def test_remove_stops_delivery(env: Env) -> None:
    """A removed webhook gets nothing more; remove() says whether it existed."""
    d = await env.started()
    gone = await d.add(CTX, env.hook_url())
    kept = await d.add(CTX, env.hook_url())
    await env.write(d, {"k": "1"})
    await wait_until(lambda: len(env.receiver.requests) == 2, WAIT_S)
    assert await d.remove(gone["id"]) is True
    assert await d.remove(gone["id"]) is False
    await env.write(d, {"k": "2"})
    await wait_cursor(d, kept["id"], 2)
    assert [r.headers["x-ctxsync-webhook"] for r in env.receiver.requests][2:] == [kept["id"]]
    assert [h["id"] for h in await d.list()] == [kept["id"]]
    await d.stop()
    assert await d.remove(kept["id"]) is True  # a stopped dispatcher removes from the store
    assert await d.list() == []


async def test_webhook_of_a_context_without_history_waits(env: Env) -> None:
    """A webhook of a context with no history yet sends nothing and logs no error until the context is written."""
    d = await env.started()
    with capture_logs() as logs:
        hook = await d.add(DocId("later"), env.hook_url())
        other = Context(DocId("later"))
        await env.ctx.write(env.store, {"elsewhere": "1"})  # another context: does not wake it
        d.notify(CTX, 1)
        await other.write(env.store, {"k": "1"})
        d.notify(other.doc_id, 1)
        await wait_cursor(d, hook["id"], 1)
    assert [keys(r) for r in env.receiver.requests] == [["k"]]
    assert not [e for e in logs if e["log_level"] in ("warning", "error")]


async def test_store_failure_does_not_end_delivery_task(env: Env) -> None:
    """If the store fails under a running dispatcher, the error is logged and retried, and stop() still works."""
    d = await env.started()
    await d.add(CTX, env.hook_url())
    with capture_logs() as logs:
        await env.store.__aexit__(None, None, None)
        d.notify(CTX, 1)
        await wait_until(lambda: sum(e["event"] == "webhook.store_error" for e in logs) >= 2, WAIT_S)
    error = next(e for e in logs if e["event"] == "webhook.store_error")
    assert "not open" in error["error"] and error["delay_s"] > 0
    await asyncio.wait_for(d.stop(), WAIT_S)


def test_retry_delay_uses_capped_equal_jitter() -> None:
    """Delays double from backoff_s up to max_backoff_s, and lie between half the ceiling and the ceiling."""
    delays = [retry_delay(n, backoff_s=1.0, max_backoff_s=10.0, rand=lambda: 0.0) for n in range(1, 7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert retry_delay(3, backoff_s=1.0, max_backoff_s=10.0, rand=lambda: 1.0) == 4.0
    assert retry_delay(10_000, backoff_s=1.0, max_backoff_s=300.0, rand=lambda: 0.5) == 225.0
    with pytest.raises(ValueError):
        retry_delay(0, backoff_s=1.0, max_backoff_s=10.0)


async def test_an_unreadable_webhook_is_skipped_shown_and_removable(env: Env) -> None:
    """One webhook row that cannot be unsealed neither stops the others nor hides itself."""
    d = await env.started()
    broken = await d.add(CTX, env.hook_url())
    good = await d.add(CTX, env.hook_url(), prefix="g")
    await d.stop()
    await env.store.__aexit__(None, None, None)
    with sqlite3.connect(env.path) as conn:
        conn.execute("UPDATE webhooks SET data = ? WHERE id = ?", (b"\x00damaged", broken["id"]))
        conn.execute("INSERT INTO webhook_failures (webhook_id, failed_at_ms, data) VALUES (?, 1, ?)", (good["id"], b"\x00"))
    conn.close()

    await env.open_store()
    with capture_logs() as logs:
        d2 = await env.started()
        await env.write(d2, {"g1": "1"})
        await wait_cursor(d2, good["id"], 1)
    assert [keys(r) for r in env.receiver.delivered()] == [["g1"]]
    unreadable = [e for e in logs if e["event"] == "webhook.unreadable"]
    assert [e["webhook_id"] for e in unreadable] == [broken["id"]]
    listed = {h["id"]: h for h in await d2.list()}
    assert set(listed) == {broken["id"], good["id"]}
    assert "cannot unseal" in listed[broken["id"]]["last_error"] and listed[good["id"]]["last_error"] is None
    (failure,) = await d2.failures(good["id"])
    assert failure["error"].startswith("unreadable: ")
    assert await d2.remove(broken["id"]) is True
    assert [h["id"] for h in await d2.list()] == [good["id"]]


async def test_delivery_waits_for_a_version_whose_commit_failed(env: Env) -> None:
    """A version kept for a retry holds the cursor back, though a later one is stored: it is delivered, in order."""
    retained: list[int] = []
    d = env.dispatcher(unstored_from=lambda doc_id: min(retained, default=None))
    await d.start()
    hook = await d.add(CTX, env.hook_url())
    await env.write(d, {"v1": "1"})
    await wait_cursor(d, hook["id"], 1)
    v2, update2, history2 = env.ctx.make_version({"v2": "2"})  # its commit "failed": kept, not stored
    retained.append(v2)
    await env.ctx.write(env.store, {"v3": "3"})  # stored
    assert await d._plan(d._hooks[hook["id"]]) is None  # nothing to send until version 2 is stored
    await env.store.append(CTX, v2, update2, history=history2)  # the retry succeeds
    retained.clear()
    d.notify(CTX, 3)
    await wait_cursor(d, hook["id"], 3)
    assert [(r.json()["from_version"], r.json()["to_version"], keys(r)) for r in env.receiver.delivered()] == [
        (1, 1, ["v1"]),
        (2, 3, ["v2", "v3"]),
    ]
