"""
End to end against a real daemon: the async :class:`ctxsync.Client` and the blocking
:class:`ctxsync.SyncClient` (docs/client.md).

One daemon serves the whole module; each test writes to contexts of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import subprocess
import sys
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from ctxsync import Client, SyncClient
from ctxsync.errors import ApiError, EntryError, InvalidState, NotFound
from tests.integration.nodes import TIMEOUT_FACTOR, Node

pytestmark = pytest.mark.integration

T = 5.0 * TIMEOUT_FACTOR
"""Longest wait for the daemon to answer or report a change, in seconds."""


@pytest.fixture(scope="module")
def alice(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One running daemon for the module."""
    node = Node(tmp_path_factory.mktemp("client"), "alice")
    node.init()
    node.start()
    yield node
    node.kill()


@pytest.fixture
async def client(alice: Node) -> AsyncIterator[Client]:
    async with Client.for_home(alice.home) as c:
        yield c


async def watch_until(
    watch: AsyncGenerator[Any, None], done: Callable[[list[Any]], bool], ready: asyncio.Event
) -> asyncio.Task[list[Any]]:
    """Consume ``watch`` in a task until ``done(items)`` or its end; return the task once the watch is ready."""

    async def consume() -> list[Any]:
        items: list[Any] = []
        async with contextlib.aclosing(watch):
            async for item in watch:
                items.append(item)
                if done(items):
                    break
        return items

    task = asyncio.create_task(consume())
    await asyncio.wait_for(ready.wait(), T)
    return task


# -- package ---------------------------------------------------------------------------


def test_package_exports_clients_lazily() -> None:
    """`import ctxsync` does not import the client; `from ctxsync import Client, SyncClient` does."""
    code = (
        "import sys, ctxsync\n"
        "assert 'ctxsync.client' not in sys.modules and 'websockets' not in sys.modules\n"
        "from ctxsync import Client, SyncClient\n"
        "import ctxsync.client as m\n"
        "assert (Client, SyncClient) == (m.Client, m.SyncClient)\n"
        "assert set(ctxsync.__all__) <= set(dir(ctxsync)) and ctxsync.__version__\n"
        "try:\n    ctxsync.Nope\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit('no AttributeError')\n"
    )
    cp = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30 * TIMEOUT_FACTOR
    )
    assert cp.returncode == 0, cp.stderr


def test_sync_client_mirrors_every_client_method() -> None:
    """Every public method of Client has a SyncClient twin with the same parameters (watches add timeout_s)."""
    for name, fn in inspect.getmembers(Client, inspect.isfunction):
        if name.startswith("_"):
            continue
        twin = getattr(SyncClient, name, None)
        assert twin is not None, f"SyncClient lacks {name}"
        params = list(inspect.signature(fn).parameters)
        twin_params = list(inspect.signature(twin).parameters)
        if inspect.isasyncgenfunction(fn):
            assert twin_params == [*params, "timeout_s"], name
        else:
            assert inspect.iscoroutinefunction(fn), name
            assert twin_params == params, name
        assert f"Client.{name}" in (twin.__doc__ or ""), name
    assert list(inspect.signature(SyncClient.for_home).parameters) == list(
        inspect.signature(Client.for_home).parameters
    )


# -- async Client ----------------------------------------------------------------------


async def test_set_get_keys_delete(client: Client, alice: Node) -> None:
    """set answers a version; get/get_all/keys read it back; delete tells whether the key was there."""
    v1 = await client.set("basics", "build", '{"status": "ok"}')
    v2 = await client.set("basics", "big", "12345678901234567890")
    assert v2 == v1 + 1
    entry = await client.get("basics", "build")
    assert set(entry) == {"key", "value", "writer", "t"}
    assert entry["key"] == "build" and entry["value"] == {"status": "ok"} and entry["writer"] == alice.node_id
    assert len(entry["t"]) == 16
    assert (await client.get("basics", "build", conflicts=True))["conflicts"] == []
    assert await client.get_all("basics") == {"big": 12345678901234567890, "build": {"status": "ok"}}
    assert await client.get_all("basics", "bu") == {"build": {"status": "ok"}}
    assert await client.keys("basics") == ["big", "build"]
    assert await client.keys("basics", prefix="bi") == ["big"]
    assert await client.keys("no-such-context") == []
    assert await client.delete("basics", "big") is True
    assert await client.delete("basics", "big") is False
    with pytest.raises(NotFound):
        await client.get("basics", "big")
    with pytest.raises(NotFound):
        await client.get_all("no-such-context")
    with pytest.raises(ApiError) as err:
        await client.set("basics", "bad", "{not json")
    assert err.value.code == "bad_request"


async def test_set_many_is_one_durable_transaction(client: Client) -> None:
    """set_many writes and deletes many keys as one version, recorded as one version in the history."""
    v0 = await client.set("many", "old", "0")
    v = await client.set_many("many", [("a", "1"), ("b", '"two"'), ("c", "[3]"), ("old", None)])
    assert v == v0 + 1
    assert await client.get_all("many") == {"a": 1, "b": "two", "c": [3]}
    page = await client.changes("many", since=v0)
    assert {r["version"] for r in page["changes"]} == {v}
    assert sorted(r["key"] for r in page["changes"]) == ["a", "b", "c", "old"]


async def test_pipelined_sets_share_group_commits(client: Client) -> None:
    """Sets sent together are batched on the wire and committed in shared rounds; each gets its own answer."""
    n = 300
    versions = await asyncio.gather(*(client.set("piped", f"k{i:03d}", str(i)) for i in range(n)))
    assert await client.get_all("piped") == {f"k{i:03d}": i for i in range(n)}
    # The first set commits at once; the rest, sent in the same turn, wait for its round and
    # share the next ones: fewer versions than writes, each write's version among them.
    assert len(set(versions)) < n
    assert max(versions) == (await client.set("piped", "last", "0")) - 1
    page = await client.changes("piped", since=0, limit=1000)
    assert sorted(r["key"] for r in page["changes"]) == sorted([*(f"k{i:03d}" for i in range(n)), "last"])
    assert {r["version"] for r in page["changes"]} == {*versions, max(versions) + 1}
    deleted = await asyncio.gather(client.delete("piped", "k000"), client.delete("piped", "absent"))
    assert deleted == [True, False]


async def test_batch_message_answers_each_request_in_order(alice: Node) -> None:
    """A JSON array of requests gets one array of answers, in order, errors included; a bad batch is refused."""
    from websockets.asyncio.client import connect

    token = (alice.home / "api.token").read_text().strip()
    url = f"ws://127.0.0.1:{alice.api_port}/"
    async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}, proxy=None) as ws:
        batch = [
            {"id": 1, "op": "set", "context": "batch-frames", "items": [["a", "1"]]},
            {"id": 2, "op": "set", "context": "batch-frames", "items": [["b", "{bad"]]},
            {"id": 3, "op": "get", "context": "batch-frames", "key": "nope"},
            {"id": 4, "op": "watch", "context": "batch-frames"},
            {"id": 5, "op": "frobnicate"},
            {"id": 6, "op": "keys", "context": "batch-frames"},
        ]
        await ws.send(json.dumps(batch))
        answers = json.loads(await asyncio.wait_for(ws.recv(), T))
        assert [a["id"] for a in answers] == [1, 2, 3, 4, 5, 6]
        assert answers[0]["ok"] and answers[0]["result"]["changed"] == 1
        assert [a["error"]["code"] for a in answers[1:5]] == ["bad_request", "not_found", "bad_request", "bad_request"]
        assert "batch" in answers[3]["error"]["message"]
        assert answers[5] == {"id": 6, "ok": True, "result": ["a"]}
        for bad in ([], [1, 2]):
            await ws.send(json.dumps(bad))
            refused = json.loads(await asyncio.wait_for(ws.recv(), T))
            assert refused["ok"] is False and refused["error"]["code"] == "bad_request"


async def test_value_conveniences(client: Client) -> None:
    """set_value/set_values take Python values; get_value parses them and gives the default when absent."""
    v = await client.set_value("values", "doc", {"n": 12345678901234567890, "s": "é", "l": [1.5, None]})
    assert (await client.get("values", "doc"))["value"] == {
        "n": 12345678901234567890,
        "s": "é",
        "l": [1.5, None],
    }
    v2 = await client.set_values("values", {"x": 1, "y": "two", "z": None})
    assert v2 == v + 1
    assert await client.get_value("values", "x") == 1
    assert await client.get_value("values", "z", default="absent") is None  # JSON null is a value
    assert await client.get_value("values", "nope") is None
    assert await client.get_value("values", "nope", default=0) == 0
    assert await client.get_value("no-such-context", "x", default=[]) == []
    with pytest.raises(EntryError):
        await client.set_value("values", "bad", {1, 2})
    with pytest.raises(EntryError):
        await client.set_values("values", {"ok": 1, "nan": float("nan")})
    assert await client.keys("values") == ["doc", "x", "y", "z"]


async def test_watch_on_ready_and_glob(client: Client, alice: Node) -> None:
    """A watch confirmed by on_ready sees every later change of matching keys, with origin and previous."""
    ready = asyncio.Event()
    changes = client.watch("watched", glob="job/*", on_ready=ready.set)
    task = await watch_until(changes, lambda items: len(items) == 3, ready)
    await client.set("watched", "other", "0")
    await client.set("watched", "job/1", '"queued"')
    await client.set("watched", "job/1", '"done"')
    await client.delete("watched", "job/1")
    got = await asyncio.wait_for(task, T)
    assert [(c["key"], c["value"], c["previous"], c["deleted"]) for c in got] == [
        ("job/1", "queued", None, False),
        ("job/1", "done", "queued", False),
        ("job/1", None, "done", True),
    ]
    assert all(c["context"] == "watched" and c["origin"] == alice.node_id for c in got)
    assert [c["version"] for c in got] == sorted(c["version"] for c in got)


async def test_watch_all_contexts_with_prefix(client: Client) -> None:
    """A watch of every context (None) with a prefix sees matching keys of any context."""
    ready = asyncio.Event()
    task = await watch_until(
        client.watch(None, "p/", on_ready=ready.set), lambda items: len(items) == 2, ready
    )
    await client.set("any-1", "q/x", "1")
    await client.set("any-1", "p/x", "1")
    await client.set("any-2", "p/y", "2")
    got = await asyncio.wait_for(task, T)
    assert [(c["context"], c["key"]) for c in got] == [("any-1", "p/x"), ("any-2", "p/y")]


async def test_watch_batches(client: Client) -> None:
    """watch_batches delivers the changes of one transaction as one list."""
    ready = asyncio.Event()
    batches = client.watch_batches("batched", batch_ms=200, on_ready=ready.set)
    task = await watch_until(batches, lambda items: sum(map(len, items)) >= 5, ready)
    await client.set_many("batched", [(f"k{i}", str(i)) for i in range(5)])
    got = await asyncio.wait_for(task, T)
    assert len(got) == 1
    assert [c["key"] for c in got[0]] == [f"k{i}" for i in range(5)]
    assert {c["version"] for c in got[0]} == {1}


async def test_closing_a_watch_ends_it_on_the_daemon(client: Client) -> None:
    """Leaving a watch early sends `unwatch`: the daemon ends that subscription, and the connection goes on."""
    ready = asyncio.Event()
    changes = client.watch("unwatched", on_ready=ready.set)
    task = await watch_until(changes, lambda items: len(items) == 1, ready)
    (watch_id,) = client._streams  # the watch's request id on this connection
    await client.set("unwatched", "k", "1")
    assert [c["key"] for c in await asyncio.wait_for(task, T)] == ["k"]
    # The client's own unwatch went first on this connection, so this one finds nothing to end.
    with pytest.raises(NotFound, match="no watch"):
        await client.request("unwatch", watch=watch_id)
    assert await client.set("unwatched", "k", "2") > 0  # the connection is still in use


async def test_unwatch_ends_the_stream_with_end(client: Client) -> None:
    """`unwatch` by request id: the watch's stream ends with its `end` event; an unknown id is not_found."""
    ready = asyncio.Event()
    task = await watch_until(client.watch("unwatched-2", on_ready=ready.set), lambda items: False, ready)
    (watch_id,) = client._streams
    assert await client.request("unwatch", watch=watch_id) == {"unwatched": watch_id}
    assert await asyncio.wait_for(task, T) == []  # the iterator ended: the daemon sent `end`
    with pytest.raises(NotFound):
        await client.request("unwatch", watch=987654)


async def test_history_has_origin_and_previous(client: Client, alice: Node) -> None:
    """history lists a key's changes oldest first, with origin, previous value and deletion."""
    await client.set("hist", "k", "1")
    await client.set("hist", "other", "true")
    await client.set("hist", "k", "2")
    await client.delete("hist", "k")
    h = await client.history("hist", key="k")
    assert h["context"] == "hist" and h["version"] == 4 and h["history_from"] == 1
    records = h["records"]
    assert [(r["version"], r["value"], r["previous"], r["deleted"]) for r in records] == [
        (1, 1, None, False),
        (3, 2, 1, False),
        (4, None, 2, True),
    ]
    assert all(r["origin"] == alice.node_id and r["key"] == "k" for r in records)
    assert set(records[0]) == {
        "version",
        "t_ms",
        "time",
        "origin",
        "key",
        "value",
        "previous",
        "deleted",
        "hlc",
    }
    assert [r["version"] for r in (await client.history("hist", limit=2))["records"]] == [3, 4]
    assert [r["version"] for r in (await client.history("hist", since=1, limit=2))["records"]] == [2, 3]


async def test_changes_cursor_never_skips(client: Client) -> None:
    """Following `next` with a small limit returns every version once, in order, then nothing."""
    await client.set_many("cursor", [("a", "1"), ("b", "1")])  # version 1: two records
    for i in range(2, 6):
        await client.set("cursor", "a", str(i))
    seen: list[int] = []
    since = 0
    while True:
        page = await client.changes("cursor", since, limit=1)
        assert page["truncated"] is False and page["missed"] is None
        assert page["since"] == since and page["version"] == 5
        if not page["changes"]:
            assert page["next"] == since
            break
        seen += [r["version"] for r in page["changes"]]
        since = page["next"]
    assert seen == [1, 1, 2, 3, 4, 5]


async def test_snapshots_restore_and_undo(client: Client) -> None:
    """A snapshot can be listed, shown, diffed and restored, and the restore undone via its recovery point."""
    await client.set_values("snap", {"a": 1, "b": 2})
    snap = await client.snapshot("snap", label="before", meta={"by": "test"})
    assert snap["context"] == "snap" and snap["label"] == "before" and snap["meta"] == {"by": "test"}
    assert snap["version"] == 1 and snap["entries"] == 2 and snap["auto"] is False
    assert snap["id"] in [s["id"] for s in await client.snapshots("snap")]
    assert snap["id"] in [s["id"] for s in await client.snapshots()]
    assert (await client.snapshot_show(snap["id"]))["content"] == {"a": 1, "b": 2}

    await client.set_many("snap", [("a", "10"), ("b", None), ("c", "3")])
    diff = await client.snapshot_diff(snap["id"])
    assert diff == {
        "context": "snap", "from": snap["id"], "to": "current",
        "added": {"c": 3}, "removed": {"b": 2}, "changed": {"a": {"from": 1, "to": 10}},
    }  # fmt: skip

    restored = await client.restore("snap", snap["id"])
    assert restored["changed"] == 3 and restored["version"] == 3 and restored["recovery_point"]
    assert await client.get_all("snap") == {"a": 1, "b": 2}
    undo = await client.snapshot_diff(restored["recovery_point"])  # recovery point -> now
    assert (undo["added"], undo["removed"], undo["changed"]) == (
        {"b": 2},
        {"c": 3},
        {"a": {"from": 10, "to": 1}},
    )

    undone = await client.restore("snap", restored["recovery_point"])  # undo the restore
    assert undone["changed"] == 3
    assert await client.get_all("snap") == {"a": 10, "c": 3}
    assert (await client.restore("snap", restored["recovery_point"]))["changed"] == 0

    await client.snapshot_delete(snap["id"])
    with pytest.raises(NotFound):
        await client.snapshot_delete(snap["id"])
    with pytest.raises(NotFound):
        await client.snapshot_show(snap["id"])


async def test_resolve_without_conflict_and_strategy(client: Client, alice: Node) -> None:
    """resolve refuses a key without conflict; strategy reads and sets the context's conflict strategy."""
    await client.set("strat", "k", "1")
    with pytest.raises(ApiError) as err:
        await client.resolve("strat", "k", "2")
    assert err.value.code == "bad_request" and "no conflict" in str(err.value)
    with pytest.raises(NotFound):
        await client.resolve("strat", "absent", "2")
    assert await client.strategy("strat") == {"name": "latest-wins", "priority": []}
    result = await client.set_strategy("strat", "origin-priority", [alice.node_id])
    assert result["name"] == "origin-priority" and result["priority"] == [alice.node_id]
    assert isinstance(result["version"], int)
    assert await client.strategy("strat") == {"name": "origin-priority", "priority": [alice.node_id]}
    with pytest.raises(ApiError) as err:
        await client.set_strategy("strat", "coin-toss")
    assert err.value.code == "bad_request"
    with pytest.raises(NotFound):
        await client.strategy("no-such-context")


async def test_status(client: Client, alice: Node) -> None:
    """status describes this node and its contexts."""
    await client.set("stat", "k", "1")
    st = await client.status()
    assert st["node_id"] == alice.node_id and st["name"] == "alice"
    assert st["contexts"]["stat"]["entries"] == 1


async def test_wrong_token_is_unauthorized(alice: Node) -> None:
    """A client with a wrong token is refused with code unauthorized."""
    good = Client.for_home(alice.home)
    with pytest.raises(ApiError) as err:
        async with Client(good.url, "wrong"):
            pass
    assert err.value.code == "unauthorized"


async def test_daemon_not_running_is_unavailable(make_node: Callable[..., Node]) -> None:
    """Without a daemon, both clients fail with code unavailable and say to run `ctxsync run`."""
    bob = make_node("bob")
    with pytest.raises(ApiError) as err:
        async with Client.for_home(bob.home):
            pass
    assert err.value.code == "unavailable" and "ctxsync run" in str(err.value)
    with pytest.raises(ApiError) as err:
        with SyncClient.for_home(bob.home):
            pass
    assert err.value.code == "unavailable" and "ctxsync run" in str(err.value)
    with pytest.raises(ApiError) as err:
        Client.for_home(bob.home / "missing")
    assert err.value.code == "no_home"


async def test_daemon_stopping_ends_watch_and_requests(make_node: Callable[..., Node]) -> None:
    """When the daemon stops, a watch ends and the next request fails with code unavailable."""
    carol = make_node("carol")
    carol.start()
    async with Client.for_home(carol.home) as c:
        ready = asyncio.Event()
        task = await watch_until(c.watch(None, on_ready=ready.set), lambda items: False, ready)
        await asyncio.to_thread(carol.stop)  # the loop keeps running: the daemon's close handshake completes
        assert await asyncio.wait_for(task, T) == []
        with pytest.raises(ApiError) as err:
            await c.status()
        assert err.value.code == "unavailable"


# -- SyncClient ------------------------------------------------------------------------


def test_sync_client_basics(alice: Node) -> None:
    """SyncClient does what Client does, blocking, with the same results and errors."""
    with SyncClient.for_home(alice.home) as c:
        assert c.url.startswith("ws://127.0.0.1:")
        v = c.set("sync", "a", '{"x": 1}')
        assert c.set_many("sync", [("b", "2"), ("c", "3")]) == v + 1
        assert c.set_value("sync", "d", [4]) == v + 2
        assert c.set_values("sync", {"e": 5, "f": "six"}) == v + 3
        assert c.get("sync", "a")["value"] == {"x": 1}
        assert c.get_value("sync", "d") == [4]
        assert c.get_value("sync", "zz", default="none") == "none"
        assert c.get_all("sync") == {"a": {"x": 1}, "b": 2, "c": 3, "d": [4], "e": 5, "f": "six"}
        assert c.keys("sync", "e") == ["e"]
        assert c.delete("sync", "a") is True
        with pytest.raises(NotFound):
            c.get("sync", "a")
        snap = c.snapshot("sync")
        c.set_value("sync", "b", 20)
        assert c.restore("sync", snap["id"])["changed"] == 1
        assert c.get_value("sync", "b") == 2
        assert [r["key"] for r in c.history("sync", key="b")["records"]] == ["b", "b", "b"]
        assert c.changes("sync", since=v + 3)["changes"][0]["key"] == "a"
        assert c.status()["node_id"] == alice.node_id
        assert c.request("keys", context="sync", prefix="c") == ["c"]
    with pytest.raises(ApiError) as err:  # closed
        c.status()
    assert err.value.code == "unavailable"


def test_sync_client_watch_iterator_with_timeout(alice: Node) -> None:
    """The watch iterator yields changes written elsewhere, raises TimeoutError when idle, and closes on break."""
    ready = threading.Event()
    with SyncClient.for_home(alice.home) as c:

        def writer() -> None:
            assert ready.wait(T)
            c.set_value("sync-watch", "k", 1)  # the wrapper may be used from several threads
            c.set_value("sync-watch", "k", 2)

        changes = c.watch("sync-watch", on_ready=ready.set, timeout_s=T)
        thread = threading.Thread(target=writer)
        thread.start()
        got = [next(changes)["value"], next(changes)["value"]]
        thread.join()
        assert got == [1, 2]
        changes.close()

        idle = c.watch("sync-watch", timeout_s=0.2)
        with pytest.raises(TimeoutError):
            next(idle)

        ready.clear()
        batches = c.watch_batches("sync-watch", batch_ms=100, on_ready=ready.set, timeout_s=T)
        thread = threading.Thread(
            target=lambda: ready.wait(T) and c.set_values("sync-watch", {"x": 1, "y": 2})
        )
        thread.start()
        for batch in batches:
            assert [ch["key"] for ch in batch] == ["x", "y"]
            break  # stops the subscription
        thread.join()
        assert c.get_value("sync-watch", "y") == 2  # the wrapper still works


def test_sync_client_on_ready_must_not_call_the_wrapper(alice: Node) -> None:
    """Calling the wrapper from on_ready (its own loop) raises InvalidState instead of hanging."""
    with SyncClient.for_home(alice.home) as c:
        changes = c.watch("sync-ready", on_ready=lambda: c.status() and None, timeout_s=T)
        with pytest.raises(InvalidState):
            next(changes)
        assert c.status()["name"] == "alice"


async def test_sync_client_inside_a_running_event_loop(alice: Node) -> None:
    """SyncClient works from a coroutine whose loop is running (it blocks, but never deadlocks)."""
    with SyncClient.for_home(alice.home) as c:
        c.set_value("sync-in-loop", "k", "v")
        assert c.get_value("sync-in-loop", "k") == "v"
        with pytest.raises(TimeoutError):
            next(c.watch("sync-in-loop", timeout_s=0.2))
    async with Client.for_home(alice.home) as ac:  # this loop is still usable
        assert await ac.get_value("sync-in-loop", "k") == "v"


def test_for_home_honours_ctxsync_api(alice: Node) -> None:
    """CTXSYNC_API in env overrides node.api, as it does for the daemon."""
    c = SyncClient.for_home(alice.home, env={"CTXSYNC_API": "localhost:1"})
    assert c.url == "ws://localhost:1/"
    with pytest.raises(ApiError) as err:
        with c:
            pass
    assert err.value.code == "unavailable"
