"""
Partitions and bad links: real daemons whose one connection runs through a :class:`FaultProxy`.

Topology of every test: the *dialer* has the *listener*'s card with ``--addr`` = the proxy, and
the listener has the dialer's card with the address of a port that is bound but not listening
(every dial gets "connection refused"), so the only connection between them crosses the proxy.
Keepalive and reconnects are made fast in each home's ``config.toml`` before the first start.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
import tomli_w

from ctxsync.client import Client
from tests.faultproxy import FaultProxy
from tests.integration.nodes import TIMEOUT_FACTOR, Node, wait_for

pytestmark = pytest.mark.integration

MakeNode = Callable[..., Node]

FAST_SYNC = {"ping_interval_s": 0.5, "ping_timeout_s": 1.0, "reconnect_min_s": 0.2, "reconnect_max_s": 2.0}
"""[sync] settings of every node here, in seconds."""
DEBUG = {"CTXSYNC_LOG_LEVEL": "debug"}
"""Daemon environment that makes every ``peer.dial_failed`` (with ``retry_in_s``) visible."""


# -- helpers -----------------------------------------------------------------------------


def set_sync(node: Node, **sync: float) -> None:
    """Merge ``sync`` into the ``[sync]`` table of the node's config.toml (before its start)."""
    path = node.home / "config.toml"
    cfg = tomllib.loads(path.read_text())
    cfg.setdefault("sync", {}).update(sync)
    path.write_text(tomli_w.dumps(cfg))


@pytest.fixture
def dead_addr() -> Iterator[str]:
    """``127.0.0.1:PORT`` of a socket bound but not listening: dials are refused, and nobody else can take the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{s.getsockname()[1]}"


def link_through(dialer: Node, listener: Node, proxy: FaultProxy, dead_addr: str) -> None:
    """Pair both ways so that only ``dialer`` dials, and only through ``proxy``."""
    dialer.cli("peer", "add", listener.card(), "--addr", f"127.0.0.1:{proxy.port}")
    listener.cli("peer", "add", dialer.card(), "--addr", dead_addr)


def two_nodes(
    make_node: MakeNode, *, a_env: dict[str, str] | None = None, **sync: float
) -> tuple[Node, Node]:
    """Nodes alice and bob, initialised, with fast keepalive (plus ``sync`` overrides)."""
    a = make_node("alice", env=a_env) if a_env else make_node("alice")
    b = make_node("bob")
    for n in (a, b):
        set_sync(n, **{**FAST_SYNC, **sync})
    return a, b


def ts(event: dict[str, Any]) -> float:
    """An event's timestamp as Unix time, in seconds."""
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def events_since(node: Node, name: str, since: float) -> list[dict[str, Any]]:
    """Events ``name`` of ``node`` logged at or after Unix time ``since``."""
    return [e for e in node.events(name) if ts(e) >= since]


def timeline(*nodes: Node) -> str:
    """Every event of ``nodes`` but the periodic stats, in time order: for a failure's message."""
    rows = [
        (e["timestamp"], n.name, e["event"], e.get("reason") or e.get("error") or e.get("stalled_s") or "")
        for n in nodes
        for e in n.events()
        if e["event"] not in ("peer.stats", "node.stats")
    ]
    return "\n".join(f"{t[11:23]} {name:<6} {event} {detail}" for t, name, event, detail in sorted(rows))


def both_connected(a: Node, b: Node) -> bool:
    return a.connected_to(b) and b.connected_to(a)


def in_sync(node: Node, context: str) -> bool:
    """``status`` shows the (only) peer connected and ``context`` in sync with it."""
    peers = node.status()["peers"]
    return len(peers) == 1 and peers[0]["connected"] and peers[0]["contexts"].get(context, {}).get("in_sync") is True


async def _get_all(node: Node, context: str) -> dict[str, Any]:
    async with Client.for_home(node.home) as c:
        return await c.get_all(context)


def get_all(node: Node, context: str) -> dict[str, Any]:
    """The whole context through the API (faster than the CLI for big contexts)."""
    return asyncio.run(_get_all(node, context))


def entries(node: Node, context: str) -> int | None:
    """Live entries of ``context`` on ``node`` per ``status``, None if absent."""
    return node.entry_count(context)


# -- 1. partition ------------------------------------------------------------------------


def test_partition_both_sides_write_then_converge(make_node: MakeNode, dead_addr: str) -> None:
    """While blackholed, both sides accept writes (same key and different keys); after heal they converge, later write wins."""
    a, b = two_nodes(make_node)
    with FaultProxy(target=("127.0.0.1", b.listen_port)) as proxy:
        link_through(a, b, proxy, dead_addr)
        b.start()
        a.start()
        wait_for(lambda: both_connected(a, b))
        a.cli("set", "ctx", "base", "1")
        wait_for(lambda: b.get("ctx", "base") == 1)

        t0 = time.time()
        proxy.blackhole()
        # Before either side noticed: these go into the dead connection.
        a.cli("set", "ctx", "same", '"a-first"')
        b.cli("set", "ctx", "same", '"b-later"')
        b.cli("set", "ctx", "same2", '"b-first"')
        a.cli("set", "ctx", "same2", '"a-later"')
        a.cli("set", "ctx", "only-a", '"A"')
        b.cli("set", "ctx", "only-b", '"B"')
        wait_for(
            lambda: events_since(a, "peer.disconnected", t0) and events_since(b, "peer.disconnected", t0)
        )
        # After both noticed: still accepted, and only local.
        b.cli("set", "ctx", "same3", '"b-first"')
        a.cli("set", "ctx", "same3", '"a-later"')
        a.cli("set", "ctx", "after-a", "[1, 2]")
        b.cli("set", "ctx", "after-b", '{"x": 1}')
        b.cli("del", "ctx", "base")
        assert a.get("ctx", "only-b") is None and b.get("ctx", "only-a") is None
        assert a.get("ctx", "same") == "a-first" and b.get("ctx", "same") == "b-later"

        proxy.heal()
        expected = {
            "same": "b-later",
            "same2": "a-later",
            "same3": "a-later",
            "only-a": "A",
            "only-b": "B",
            "after-a": [1, 2],
            "after-b": {"x": 1},
        }
        wait_for(lambda: a.get("ctx") == expected and b.get("ctx") == expected, timeout=30)
        wait_for(lambda: in_sync(a, "ctx") and in_sync(b, "ctx"))
        assert not [e for n in (a, b) for e in n.events() if e["level"] == "error"]


# -- 2. silent blackhole: detection and redial with backoff --------------------------------


def test_silent_blackhole_is_detected_then_redial_backs_off(make_node: MakeNode, dead_addr: str) -> None:
    """A link that goes silent (no FIN, no RST) is detected by keepalive on both sides; redials back off with jitter; heal reconnects."""
    a, b = two_nodes(make_node, a_env=DEBUG)
    sync = FAST_SYNC
    with FaultProxy(target=("127.0.0.1", b.listen_port)) as proxy:
        link_through(a, b, proxy, dead_addr)
        b.start()
        a.start()
        wait_for(lambda: both_connected(a, b))

        t0 = time.time()
        proxy.blackhole()
        wait_for(
            lambda: events_since(a, "peer.disconnected", t0) and events_since(b, "peer.disconnected", t0),
            timeout=15,
        )
        detect = {n.name: ts(events_since(n, "peer.disconnected", t0)[0]) - t0 for n in (a, b)}
        reasons = {n.name: events_since(n, "peer.disconnected", t0)[0]["reason"] for n in (a, b)}
        print(f"\nblackhole detected after {detect} s; reasons {reasons}")
        for name, seconds in detect.items():
            # Not before a ping could time out (nothing leaked through the blackhole) ...
            assert seconds >= sync["ping_timeout_s"] * 0.9, (name, seconds)
            # ... and within interval + timeout + websockets' close timeout (2 s) + margin.
            assert seconds <= 5.0 * TIMEOUT_FACTOR, (name, seconds)

        # The peer is now "down": every new connection is reset at once, and the dial the
        # blackhole may be holding is reset too, so each redial fails fast and is visible.
        proxy.refuse()
        t_refuse = time.time()
        proxy.reset_all()
        n0 = proxy.connections_accepted
        wait_for(lambda: proxy.connections_accepted >= n0 + 5, timeout=20)
        attempts = proxy.accept_times[n0 : n0 + 5]
        gaps = [round(t2 - t1, 3) for t1, t2 in zip(attempts, attempts[1:], strict=False)]
        failed = [e for e in events_since(a, "peer.dial_failed", t_refuse) if e.get("retry")]
        delays = [e["retry_in_s"] for e in failed]
        print(f"redial gaps {gaps} s; logged retry_in_s {delays}")
        assert len(failed) >= 4
        lo, hi = sync["reconnect_min_s"] / 2, sync["reconnect_max_s"]
        assert all(lo - 0.01 <= d <= hi + 0.01 for d in delays), delays
        assert all(g >= lo - 0.02 for g in gaps), gaps  # never hammering
        assert len(set(delays)) > 1 and len(set(gaps)) > 1  # jittered, not a fixed period
        assert max(delays[:5]) > sync["reconnect_min_s"]  # grew past the first bound

        proxy.heal()
        wait_for(lambda: both_connected(a, b), timeout=20)
        a.cli("set", "ctx", "after-heal", "1")
        wait_for(lambda: b.get("ctx", "after-heal") == 1)
        assert proxy.live_connections >= 1


def test_backoff_restarts_after_a_healthy_session(make_node: MakeNode, dead_addr: str) -> None:
    """After a connection that worked drops, the redial delays start again from reconnect_min_s."""
    a, b = two_nodes(make_node, a_env=DEBUG, reconnect_min_s=0.05)
    with FaultProxy(target=("127.0.0.1", b.listen_port)) as proxy:
        link_through(a, b, proxy, dead_addr)
        a.start()  # bob is down: the proxy resets every dial, alice's backoff grows to its maximum
        wait_for(lambda: proxy.connections_accepted >= 7, timeout=30)
        b.start()
        wait_for(lambda: both_connected(a, b), timeout=20)
        proxy.refuse()
        t_drop = time.time()
        proxy.reset_all()
        wait_for(
            lambda: len([e for e in events_since(a, "peer.dial_failed", t_drop) if e.get("retry")]) >= 3,
            timeout=30,
        )
        delays = [e["retry_in_s"] for e in events_since(a, "peer.dial_failed", t_drop) if e.get("retry")][:3]
        print(f"\nretry_in_s after the drop: {delays}")
        # A fresh backoff (min 0.05 s) allows at most 0.1, 0.2, 0.4 s here (the first, unlogged
        # delay is 0.05 at most); the grown one draws each from [0.025, 2.0].
        assert delays[0] <= 0.1 and delays[1] <= 0.2 and delays[2] <= 0.4, delays


# -- 3. reset in the middle of a large catch-up -------------------------------------------


@pytest.mark.timeout(300)
def test_reset_mid_catch_up_then_converge(make_node: MakeNode, dead_addr: str) -> None:
    """A fresh node's first catch-up of 30,000 entries is cut part way by a reset; it reconnects and gets all of it."""
    a, b = two_nodes(make_node)  # a holds the data; b joins fresh and dials a through the proxy
    n_entries = 30_000

    async def fill() -> None:
        async with Client.for_home(a.home) as c:
            for start in range(0, n_entries, 10_000):
                items: list[tuple[str, str | None]] = [
                    (f"key-{i:06d}", json.dumps({"n": i, "pad": "x" * 40}))
                    for i in range(start, start + 10_000)
                ]
                await c.set_many("big", items)

    with FaultProxy(target=("127.0.0.1", a.listen_port)) as proxy:
        link_through(b, a, proxy, dead_addr)
        a.start()
        asyncio.run(fill())
        assert entries(a, "big") == n_entries
        cut_at = 1_000_000
        proxy.cut_after(cut_at)  # server (a) -> client (b): the catch-up's direction
        t0 = time.monotonic()
        b.start()
        wait_for(lambda: entries(b, "big") == n_entries, timeout=90)
        catch_up_s = time.monotonic() - t0
        assert proxy.cuts == 1 and proxy.connections_accepted >= 2

        # The cut ended b's first session before its sync of "big" completed, and the sync
        # that did complete carried more than the cut let through.
        first_off = b.events("peer.disconnected")[0]
        synced = [e for e in b.events("sync.completed") if e["doc_id"] == "big"]
        assert synced and synced[0]["session_id"] != first_off["session_id"]
        assert ts(first_off) <= ts(synced[0])
        assert synced[0]["received_bytes"] > cut_at
        print(
            f"\ncatch-up of {n_entries} entries: {catch_up_s:.2f} s from start with one cut at {cut_at} bytes; "
            f"completed sync {synced[0]['received_bytes']} bytes in {synced[0]['duration_ms']} ms; "
            f"first session ended: {first_off['reason']!r}"
        )

        assert get_all(b, "big") == get_all(a, "big")
        for key in ("key-000000", "key-012345", "key-029999"):
            assert b.get("big", key) == a.get("big", key) == {"n": int(key[4:]), "pad": "x" * 40}
        wait_for(lambda: in_sync(a, "big") and in_sync(b, "big"))


# -- 4. delay and bandwidth -------------------------------------------------------------


def test_delay_and_bandwidth_limit(make_node: MakeNode, dead_addr: str) -> None:
    """Over 50 ms of latency each way and a bandwidth cap, writes converge, nothing errors, and rtt_ms shows the delay."""
    # A pong waits behind every byte queued before it on the capped link: the bulk below puts
    # can put about a second of it there, so the fast keepalive's 1 s ping timeout could fire by
    # design (it did in one CI run of the previous session and one of this). The timeout here
    # leaves room for the queue.
    a, b = two_nodes(make_node, ping_timeout_s=3.0)
    delay_s, cap = 0.05, 256_000
    with FaultProxy(target=("127.0.0.1", b.listen_port)) as proxy:
        proxy.delay_s = delay_s
        proxy.bandwidth_bytes_per_s = cap
        link_through(a, b, proxy, dead_addr)
        b.start()
        a.start()
        wait_for(lambda: both_connected(a, b))

        async def bulk() -> None:
            async with Client.for_home(a.home) as c:
                for start in range(0, 600, 100):
                    await c.set_many(
                        "slow", [(f"bulk-{i:04d}", json.dumps("v" * 100)) for i in range(start, start + 100)]
                    )

        t0 = time.monotonic()
        asyncio.run(bulk())
        a.cli("set", "slow", "k-a", '"from-a"')
        b.cli("set", "slow", "k-b", '"from-b"')
        wait_for(lambda: entries(a, "slow") == 602 and entries(b, "slow") == 602, timeout=30)
        print(
            f"\n600 writes + 2 converged over {delay_s * 1000:.0f} ms / {cap} B/s in {time.monotonic() - t0:.2f} s"
        )
        assert get_all(a, "slow") == get_all(b, "slow")

        def rtts() -> list[float | None]:
            return [n.status()["peers"][0]["rtt_ms"] for n in (a, b)]

        wait_for(lambda: all(r is not None and r >= 2 * delay_s * 1000 * 0.9 for r in rtts()), timeout=20)
        print(f"rtt_ms {rtts()}")
        wait_for(lambda: in_sync(a, "slow") and in_sync(b, "slow"))
        for n in (a, b):
            assert not n.events("peer.disconnected"), timeline(a, b)
            bad = [e for e in n.events() if e["level"] in ("warning", "error")]
            assert not bad, timeline(a, b)


# -- 5. reset of a live connection during a stream of writes ----------------------------


def test_reset_during_write_stream_loses_nothing(make_node: MakeNode, dead_addr: str) -> None:
    """Connections reset (RST) during a stream of writes on A: every write A acknowledged reaches B."""
    a, b = two_nodes(make_node)
    acked: list[str] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    async def stream() -> None:
        async with Client.for_home(a.home) as c:
            i = 0
            while not stop.is_set() and i < 5000:
                key = f"w-{i:05d}"
                await c.set("stream", key, json.dumps(i))
                acked.append(key)
                i += 1

    def run() -> None:
        try:
            asyncio.run(stream())
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    with FaultProxy(target=("127.0.0.1", b.listen_port)) as proxy:
        link_through(a, b, proxy, dead_addr)
        b.start()
        a.start()
        wait_for(lambda: both_connected(a, b))
        writer = threading.Thread(target=run, name="writes")
        writer.start()
        try:
            for round_ in range(3):
                wait_for(lambda: both_connected(a, b), timeout=20)
                target = len(acked) + 100
                wait_for(lambda t=target: len(acked) >= t or not writer.is_alive(), timeout=30)
                assert proxy.reset_all() >= 1, f"round {round_}: nothing to reset"
            wait_for(lambda: len(acked) >= target + 100 or not writer.is_alive(), timeout=30)
        finally:
            stop.set()
            writer.join(30 * TIMEOUT_FACTOR)
        assert not writer.is_alive() and not errors, errors
        n = len(acked)
        print(f"\n{n} writes acknowledged on A across 3 resets")
        wait_for(lambda: entries(b, "stream") == n, timeout=30)
        on_b = get_all(b, "stream")
        assert set(on_b) == set(acked)
        assert on_b == get_all(a, "stream")
        assert len(events_since(a, "peer.disconnected", 0)) >= 3
        wait_for(lambda: in_sync(a, "stream") and in_sync(b, "stream"))


# -- 6. half-open connections and stalled senders ----------------------------------------


def test_dialer_replaces_its_half_open_connection(make_node: MakeNode, dead_addr: str) -> None:
    """
    The dialer's connection goes silent (half-open: the listener, with slower keepalive, still
    holds it); the dialer notices first and redials: the listener takes the new connection.
    """
    x, y = make_node("alice"), make_node("bob")
    listener, dialer = sorted((x, y), key=lambda n: n.node_id)  # the smaller id listens
    set_sync(dialer, **FAST_SYNC)
    set_sync(listener, **{**FAST_SYNC, "ping_interval_s": 10.0, "ping_timeout_s": 30.0})
    with FaultProxy(target=("127.0.0.1", listener.listen_port)) as proxy:
        link_through(dialer, listener, proxy, dead_addr)
        listener.start()
        dialer.start()
        wait_for(lambda: both_connected(dialer, listener))
        t0 = time.time()
        proxy.blackhole(new_connections=False)  # only the connection open now goes silent
        wait_for(lambda: events_since(dialer, "peer.disconnected", t0), timeout=15)

        def refused() -> list[dict[str, Any]]:
            return [
                e
                for e in events_since(dialer, "peer.disconnected", t0)
                if "duplicate connection" in e["reason"]
            ]

        def taken() -> list[dict[str, Any]]:
            return events_since(listener, "peer.connected", t0)

        wait_for(lambda: refused() or taken(), timeout=15)
        assert not refused(), f"the listener kept its dead connection and refused the new one: {refused()[0]}"
        listener.cli("set", "ctx", "k", "1")
        wait_for(lambda: dialer.get("ctx", "k") == 1)


def test_blackhole_during_bulk_send_is_detected_by_the_sender(make_node: MakeNode, dead_addr: str) -> None:
    """The path dies while one side is sending a large catch-up: both sides, the sender included, notice."""
    a, b = two_nodes(make_node)  # a sends the catch-up to b, which dials a through the proxy

    async def fill() -> None:
        async with Client.for_home(a.home) as c:
            for start in range(0, 20_000, 10_000):
                items: list[tuple[str, str | None]] = [
                    (f"key-{i:06d}", json.dumps({"n": i, "pad": "x" * 400}))
                    for i in range(start, start + 10_000)
                ]
                await c.set_many("big", items)

    with FaultProxy(target=("127.0.0.1", a.listen_port), rcvbuf_bytes=65536, queue_chunks=4) as proxy:
        link_through(b, a, proxy, dead_addr)
        a.start()
        asyncio.run(fill())
        proxy.cut_after(500_000, then="blackhole")
        b.start()
        wait_for(lambda: proxy.cuts == 1, timeout=30)
        t0 = time.time()  # the cut happened a poll interval earlier, at most
        wait_for(lambda: events_since(b, "peer.disconnected", t0 - 1), timeout=5)
        print(f"\nreceiver noticed after {ts(events_since(b, 'peer.disconnected', t0 - 1)[0]) - t0:.2f} s")
        try:
            wait_for(lambda: events_since(a, "peer.disconnected", t0 - 1), timeout=5)
        finally:
            print(
                f"sender: {[(p['connected'], p['contexts']) for p in a.status()['peers']]} after {time.time() - t0:.1f} s"
            )
        proxy.heal()
        wait_for(lambda: entries(b, "big") == 20_000, timeout=60)
