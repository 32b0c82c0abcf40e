"""
Randomised convergence: a Hypothesis state machine over 3-4 real meshes in one process.

Rules write, delete and batch-write entries (small and large values) on any node, link and cut
links (orderly or mid-stream, losing what is in flight), restart nodes from their stores, hold
one direction of a link while the others flow (updates overtake each other across paths, and a
held sender may block until its queue overflows into a resync), and duplicate ``SYNC_UPDATE``
frames. ``settle`` quiesces the network and checks that every connected group of nodes agrees.
At the end every pair is linked, the network quiesced, and all nodes must hold identical
entries, keys and documents, with every entry as the model predicts where it is determined.

The model keeps, per node, the writes it is known to have seen (merged across a connected group
at each ``settle``: an under-approximation of what it really saw). A write of key K by node N
supersedes every write of K that N has seen; after the final heal, the slots of K are exactly
the writes of K that nothing superseded (a subset of the model's survivors, since the model
sees fewer supersessions than happened; equal when the model has only one survivor).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import random
import tempfile
import time
import types
from collections.abc import Callable, Coroutine, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import structlog
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import ctxsync.mesh
from ctxsync.errors import NotFound
from ctxsync.types import DocId
from tests.meshnet import MeshNet, NetNode, index_problems, raw_slots

T = TypeVar("T")

STEP_TIMEOUT_S = 10.0
DOCS = (DocId("ctx"), DocId("two"))
SEED_KEY = "seed"
"""Written once on the first node at setup, so every context has one lineage (not in KEYS)."""
KEYS = ("a", "b", "c")
CRASHES = os.environ.get("CTXSYNC_MODEL_CRASHES", "1") == "1"
"""Also crash nodes between a write and its commit (on by default; set 0 to leave them out)."""
ALLOWED_WARNINGS = {"peer.queue_overflow", "context.conflict"}
"""Warnings and errors the network may log; anything else fails the example."""

STATS = {"examples": 0, "steps": 0, "crashes": 0, "overflows": 0, "duplicated": 0, "dropped": 0, "chunked": 0, "unloaded": 0}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=5,
).map(lambda v: json.dumps(v, sort_keys=True))
values = json_values | st.integers(2_000, 29_000).map(lambda n: json.dumps("x" * n))
"""JSON text; now and then large (a batch of them needs CHUNK frames)."""


@dataclass(frozen=True)
class Write:
    """One write (set or delete) of the model, as acknowledged by ``Mesh.write``."""

    wid: int
    node: str
    doc: DocId
    key: str
    value: str | None
    acked: bool = True
    """False for a write lost in a crash before its commit: it may exist on peers, or nowhere."""


class Events:
    """A structlog processor that records warnings and errors, and drops every event."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        if method in ("warning", "error", "exception", "critical"):
            self.seen.append(dict(event))
            if event.get("event") == "peer.queue_overflow":
                STATS["overflows"] += 1
        raise structlog.DropEvent


def seeded_client_ids(next_id: Callable[[], int]) -> Callable[[], None]:
    """Make every ``pycrdt.Doc`` the mesh creates take its client id from ``next_id``; return the undo."""
    real = getattr(ctxsync.mesh, "pycrdt")  # noqa: B009 (not exported: patched on purpose)
    fake = types.SimpleNamespace(**{k: getattr(real, k) for k in dir(real) if not k.startswith("__")})
    fake.Doc = lambda *args, client_id=None, **kwargs: real.Doc(
        *args, client_id=next_id() if client_id is None else client_id, **kwargs
    )  # a reloaded context asks for its own id back
    setattr(ctxsync.mesh, "pycrdt", fake)  # noqa: B010

    def undo() -> None:
        setattr(ctxsync.mesh, "pycrdt", real)  # noqa: B010

    return undo


def step(fn: Any) -> Any:
    """Count a rule, and note whether it finished (teardown only checks after a clean run)."""

    @functools.wraps(fn)
    def wrapper(self: MeshModel, *args: Any, **kwargs: Any) -> Any:
        self.ok = False
        result = fn(self, *args, **kwargs)
        self.ok = True
        STATS["steps"] += 1
        return result

    return wrapper


class MeshModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        STATS["examples"] += 1
        self.tmp = tempfile.TemporaryDirectory(prefix="ctxsync-model-")
        self.loop = asyncio.new_event_loop()
        self.events = Events()
        structlog.configure(
            processors=[self.events], wrapper_class=structlog.make_filtering_bound_logger(logging.INFO)
        )
        self.net: MeshNet | None = None
        self.ok = True
        """False once a step raised: teardown then only cleans up."""
        self.writes: dict[int, Write] = {}
        self.known: dict[str, set[int]] = {}
        """Per node: the writes it is known to have seen."""
        self.superseded: set[int] = set()
        self.unpatch: Callable[[], None] = lambda: None

    # -- running steps ---------------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(STEP_TIMEOUT_S):
                return await coro

        return self.loop.run_until_complete(bounded())

    @property
    def n(self) -> MeshNet:
        assert self.net is not None
        return self.net

    def node(self, i: int) -> NetNode:
        return self.n.nodes[i % len(self.n.nodes)]

    # -- setup -----------------------------------------------------------------------------

    @initialize(
        size=st.integers(3, 4),
        seed=st.integers(0, 2**32),
        topology=st.sampled_from(["none", "line", "ring", "full"]),
        compact_threshold=st.sampled_from([3, 2000]),
    )
    @step
    def setup(self, size: int, seed: int, topology: str, compact_threshold: int) -> None:
        self.net = MeshNet(
            Path(self.tmp.name), size, seed=seed, timeout=STEP_TIMEOUT_S, compact_threshold=compact_threshold
        )
        # Yjs client ids decide ties between concurrent items: draw them from the seed, so that
        # an example replays exactly (pycrdt draws them at random otherwise).
        ids = random.Random(seed)
        self.unpatch = seeded_client_ids(lambda: ids.getrandbits(32))
        self.known = {n.name: set() for n in self.net.nodes}
        pairs = {
            "none": [],
            "line": [(i, i + 1) for i in range(size - 1)],
            "ring": [(i, (i + 1) % size) for i in range(size)],
            "full": [(i, j) for i in range(size) for j in range(i + 1, size)],
        }[topology]

        async def start() -> None:
            await self.n.start()
            # Every context starts on one node and reaches the others before the nodes part: a
            # context made on two nodes independently is a lineage mismatch (not synced), which
            # test_mesh covers; the model checks the merging of one context's replicas.
            nodes = self.n.nodes
            for other in nodes[1:]:
                await self.n.link(nodes[0], other)
            for doc in DOCS:
                await nodes[0].m.write(doc, [(SEED_KEY, "0")])
            await self.n.quiesce()
            assert all(n.m.contexts[doc].lineage == nodes[0].m.contexts[doc].lineage for n in nodes for doc in DOCS)
            for other in nodes[1:]:
                await self.n.unlink(nodes[0], other)
            for i, j in pairs:
                await self.n.link(self.node(i), self.node(j))

        self.run(start())

    # -- writes ----------------------------------------------------------------------------

    def _write(self, node: NetNode, doc: DocId, items: list[tuple[str, str | None]]) -> None:
        mesh = node.m
        before_t = mesh.clock.latest

        async def write() -> tuple[tuple[int, int], list[int]]:
            # Decide which deletions are no-ops in the same step as the write itself: nothing
            # can arrive in between.
            live = set(mesh.keys(doc))
            done = []
            for key, value in items:
                if value is None and key not in live:
                    continue
                w = Write(len(self.writes), node.name, doc, key, value)
                self.writes[w.wid] = w
                self.superseded |= {
                    x
                    for x in self.known[node.name]
                    if self.writes[x].doc == doc and self.writes[x].key == key
                }
                # The node's own writes lost in a crash: its later acknowledged write must win.
                self.superseded |= {
                    x.wid
                    for x in self.writes.values()
                    if not x.acked and x.node == node.name and x.doc == doc and x.key == key
                }
                self.known[node.name].add(w.wid)
                done.append(w.wid)
                (live.add if value is not None else live.discard)(key)
            return await mesh.write(doc, items), done

        (_, changed), done = self.run(write())
        assert changed == len(done), f"write reported {changed} changes, the model expects {len(done)}"
        # Right after the acknowledgement the write is readable, unless a later write (from a
        # peer that saw it, or a concurrent one that wins) arrived meanwhile.
        final = {self.writes[w].key: self.writes[w] for w in done}
        for key, w in final.items():
            try:
                entry = mesh.get(doc, key)
            except NotFound:
                entry = None
            if entry is not None and entry.writer == node.node_id:
                assert entry.value == w.value, f"{node.name} reads {key}={entry.value}, wrote {w.value}"
            elif entry is not None or w.value is not None:
                assert entry is not None and entry.t > before_t, (
                    f"{node.name} wrote {key}={w.value!r} but reads {entry!r}, not a later write"
                )

    @rule(i=st.integers(0, 3), doc=st.sampled_from(DOCS), key=st.sampled_from(KEYS), value=values)
    @step
    def write(self, i: int, doc: DocId, key: str, value: str) -> None:
        self._write(self.node(i), doc, [(key, value)])

    @rule(i=st.integers(0, 3), doc=st.sampled_from(DOCS), key=st.sampled_from(KEYS))
    @step
    def delete(self, i: int, doc: DocId, key: str) -> None:
        self._write(self.node(i), doc, [(key, None)])

    @rule(
        i=st.integers(0, 3),
        doc=st.sampled_from(DOCS),
        items=st.lists(st.tuples(st.sampled_from(KEYS), st.none() | values), min_size=2, max_size=4),
    )
    @step
    def write_many(self, i: int, doc: DocId, items: list[tuple[str, str | None]]) -> None:
        if sum(len(v or "") for _, v in items) > 65_536:
            STATS["chunked"] += 1
        self._write(self.node(i), doc, items)

    @rule(
        i=st.integers(0, 3),
        doc=st.sampled_from(DOCS),
        sizes=st.lists(st.integers(22_000, 29_000), min_size=3, max_size=3),
    )
    @step
    def big_batch(self, i: int, doc: DocId, sizes: list[int]) -> None:
        """One write over 64 KiB: it travels as CHUNK frames."""
        STATS["chunked"] += 1
        self._write(
            self.node(i),
            doc,
            [(key, json.dumps(c * n)) for key, c, n in zip(KEYS, "xyz", sizes, strict=True)],
        )

    @precondition(lambda self: self.net is not None and self._pairs(linked=True))
    @rule(data=st.data(), forward=st.booleans(), doc=st.sampled_from(DOCS), writes=st.integers(3, 4))
    @step
    def flood(self, data: st.DataObject, forward: bool, doc: DocId, writes: int) -> None:
        """Block one direction of a link and write past the sender's queue bound (overflow, then resync)."""
        i, j = data.draw(st.sampled_from(self._pairs(linked=True)), label="pair")
        sender = self.node(i) if forward else self.node(j)
        self.n.link_of(self.node(i), self.node(j)).end(sender).hold(block_after=1)
        for n in range(writes):
            self._write(sender, doc, [(KEYS[n % len(KEYS)], json.dumps(f"{n}" * 29_000))])

    # -- the network -----------------------------------------------------------------------

    def _pairs(self, *, linked: bool) -> list[tuple[int, int]]:
        size = len(self.n.nodes)
        return [
            (i, j)
            for i in range(size)
            for j in range(i + 1, size)
            if self.n.linked(self.n.nodes[i], self.n.nodes[j]) == linked
        ]

    @precondition(lambda self: self.net is not None and self._pairs(linked=False))
    @rule(data=st.data(), dialer_first=st.booleans())
    @step
    def link(self, data: st.DataObject, dialer_first: bool) -> None:
        i, j = data.draw(st.sampled_from(self._pairs(linked=False)), label="pair")
        a, b = (self.node(i), self.node(j)) if dialer_first else (self.node(j), self.node(i))
        self.run(self.n.link(a, b))

    @precondition(lambda self: self.net is not None and self._pairs(linked=True))
    @rule(data=st.data(), drop=st.booleans(), deliver_first=st.integers(0, 3))
    @step
    def unlink(self, data: st.DataObject, drop: bool, deliver_first: int) -> None:
        i, j = data.draw(st.sampled_from(self._pairs(linked=True)), label="pair")
        self.run(self.n.unlink(self.node(i), self.node(j), drop=drop, deliver_first=deliver_first))

    @precondition(lambda self: self.net is not None and self._pairs(linked=True))
    @rule(data=st.data(), forward=st.booleans(), block_after=st.none() | st.integers(1, 4))
    @step
    def hold(self, data: st.DataObject, forward: bool, block_after: int | None) -> None:
        """Hold one direction of a link; the others keep flowing."""
        i, j = data.draw(st.sampled_from(self._pairs(linked=True)), label="pair")
        sender = self.node(i) if forward else self.node(j)
        self.n.link_of(self.node(i), self.node(j)).end(sender).hold(block_after=block_after)

    @precondition(lambda self: self.net is not None and self._pairs(linked=True))
    @rule(data=st.data(), count=st.none() | st.integers(1, 3))
    @step
    def release(self, data: st.DataObject, count: int | None) -> None:
        i, j = data.draw(st.sampled_from(self._pairs(linked=True)), label="pair")
        link = self.n.link_of(self.node(i), self.node(j))

        async def release() -> None:
            for end in link.ends.values():
                await end.release(count)
            await asyncio.sleep(0.002)  # let what was released arrive and be relayed

        self.run(release())

    @precondition(lambda self: self.net is not None)
    @rule(p=st.sampled_from([0.0, 0.3, 1.0]))
    @step
    def duplicate(self, p: float) -> None:
        """Deliver SYNC_UPDATE frames twice with probability ``p`` (on every link, now and later)."""
        self.n.duplicate_p = p
        for link in self.n.links.values():
            for end in link.ends.values():
                end.duplicate_p = p

    @precondition(lambda self: self.net is not None)
    @rule(i=st.integers(0, 3), doc=st.sampled_from(DOCS))
    @step
    def unload(self, i: int, doc: DocId) -> None:
        """Unload a context from memory (as the daemon does when it goes unused); the next use loads it back."""
        mesh = self.node(i).m
        if not mesh.unload(doc):  # perhaps a version the store has not committed yet: once more, a moment later
            self.run(asyncio.sleep(0.005))
            if not mesh.unload(doc):
                return
        STATS["unloaded"] += 1
        assert doc in mesh.parked and doc not in mesh.contexts

    @precondition(lambda self: self.net is not None)
    @rule(i=st.integers(0, 3), relink=st.booleans(), unload=st.booleans())
    @step
    def restart(self, i: int, relink: bool, unload: bool) -> None:
        node = self.node(i)
        node.unload_at_start = unload  # as the daemon does: every context unloaded, or taken from its record
        self.run(self.n.restart(node, relink=relink))

    @precondition(lambda self: self.net is not None and CRASHES)
    @rule(
        i=st.integers(0, 3),
        doc=st.sampled_from(DOCS),
        key=st.sampled_from(KEYS),
        value=json_values,
        relink=st.booleans(),
    )
    @step
    def crash_during_write(self, i: int, doc: DocId, key: str, value: str, relink: bool) -> None:
        """The node writes, the update leaves for its peers, and the node dies before the commit."""
        node = self.node(i)
        w = Write(len(self.writes), node.name, doc, key, value, acked=False)
        self.writes[w.wid] = w
        # Not acknowledged: nobody is known to have it (the node itself forgets it), and what
        # it superseded stays uncertain. A later write of the key by the same node must win.
        self.run(self.n.crash_during_write(node, doc, [(key, value)], relink=relink))
        STATS["crashes"] += 1

    @precondition(lambda self: self.net is not None and CRASHES)
    @rule(
        i=st.integers(0, 3),
        doc=st.sampled_from(DOCS),
        key=st.sampled_from(KEYS),
        lost=json_values,
        then=json_values,
    )
    @step
    def crash_then_rewrite(self, i: int, doc: DocId, key: str, lost: str, then: str) -> None:
        """Crash during a write, come back alone, write the key again, then reconnect."""
        node = self.node(i)
        peers = [link.other(node) for link in self.n.links.values() if node in (link.a, link.b)]
        self.crash_during_write(i, doc, key, lost, relink=False)
        self._write(node, doc, [(key, then)])
        for peer in peers:
            self.run(self.n.link(node, peer))

    @precondition(lambda self: self.net is not None)
    @rule(ms=st.sampled_from([0, 1, 5]))
    @step
    def pause(self, ms: int) -> None:
        """Let the network run a moment (without quiescing it)."""
        self.run(asyncio.sleep(ms / 1000))

    @precondition(lambda self: self.net is not None)
    @rule()
    @step
    def settle(self) -> None:
        """Quiesce: every connected group must agree, and now knows what any of its members knew."""
        self.run(self.n.quiesce())
        for group in self.n.components():
            if len(group) > 1:
                problems = self.n.differences(group)
                assert not problems, "a connected, quiet group disagrees:\n" + "\n".join(problems)
            union = set().union(*(self.known[n.name] for n in group))
            for n in group:
                self.known[n.name] = set(union)

    # -- checks between steps --------------------------------------------------------------

    @invariant()
    def reads_work_and_index_matches_document(self) -> None:
        if self.net is None:
            return
        self.ok = False
        for node in self.n.nodes:
            mesh = node.m
            for doc in DOCS:
                if doc in mesh.parked:
                    continue  # left unloaded (a read would load it); settle compares it
                keys = mesh.keys(doc)
                if doc in mesh.contexts:
                    entries = mesh.entries(doc)
                    assert [e.key for e in entries] == keys
                    for key in KEYS:
                        try:
                            mesh.get(doc, key)
                        except NotFound:
                            assert key not in keys
                    problems = index_problems(mesh, doc)
                    assert not problems, f"{node.name}: " + "; ".join(problems)
            mesh.status()
        bad = [e for e in self.events.seen if e.get("event") not in ALLOWED_WARNINGS]
        assert not bad, f"unexpected warnings/errors: {bad}"
        self.ok = True

    # -- the end ---------------------------------------------------------------------------

    def heal_and_check(self) -> None:
        async def heal() -> None:
            size = len(self.n.nodes)
            for i in range(size):
                for j in range(i + 1, size):
                    if not self.n.linked(self.node(i), self.node(j)):
                        await self.n.link(self.node(i), self.node(j))
            await self.n.quiesce()

        self.run(heal())
        problems = self.n.differences()
        assert not problems, "after healing, nodes disagree:\n" + "\n".join(problems)
        node = self.n.nodes[0]
        by_name = {n.name: n for n in self.n.nodes}
        for doc in DOCS:
            ctx = node.m.context(doc)
            if ctx is None:
                assert not any(w.doc == doc and w.acked for w in self.writes.values())
                continue
            slots = raw_slots(ctx.doc)
            for key in KEYS:
                survivors = [
                    w
                    for w in self.writes.values()
                    if w.doc == doc and w.key == key and w.wid not in self.superseded
                ]
                certain = [w for w in survivors if w.acked]
                real = slots.get(key, {})
                if certain:
                    assert real, f"{doc}/{key}: no slot left, but model survivors {survivors}"
                for writer, raw in real.items():
                    got = None if raw.get("deleted") is True else raw.get("v")
                    mine = [w for w in survivors if by_name[w.node].node_id == writer]
                    assert any(w.value == got for w in mine), (
                        f"{doc}/{key}: the slot of {writer[:7]} holds {got!r}, not a surviving write of it: {mine}"
                        f" (every write of the key: {[w for w in self.writes.values() if w.doc == doc and w.key == key]})"
                    )
                if len(survivors) == 1 and certain:
                    (w,) = survivors
                    assert len(real) == 1
                    try:
                        value = node.m.get(doc, key).value
                    except NotFound:
                        value = None
                    assert value == w.value, f"{doc}/{key}: reads {value!r}, the last write was {w.value!r}"

    def teardown(self) -> None:
        try:
            if self.ok and self.net is not None:
                self.heal_and_check()
        finally:
            try:
                if self.net is not None:
                    self.loop.run_until_complete(asyncio.wait_for(self.n.close(), STEP_TIMEOUT_S))
                    for k in ("duplicated", "dropped"):
                        STATS[k] += self.n.totals[k]
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            finally:
                self.loop.close()
                self.tmp.cleanup()
                structlog.reset_defaults()
                self.unpatch()


def test_mesh_converges(capsys: pytest.CaptureFixture[str]) -> None:
    """Any sequence of writes, link changes, restarts, holds and duplicates ends converged."""
    for k in STATS:
        STATS[k] = 0
    started = time.monotonic()
    run_state_machine_as_test(
        MeshModel,
        settings=settings(
            max_examples=int(os.environ.get("CTXSYNC_MODEL_EXAMPLES", "25")),
            stateful_step_count=int(os.environ.get("CTXSYNC_MODEL_STEPS", "25")),
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            print_blob=True,
        ),
    )
    with capsys.disabled():
        print(f"\n[test_model] {STATS} in {time.monotonic() - started:.1f} s")


# -- bugs found by the state machine, kept as failing examples --------------------------------


async def test_crash_before_commit_never_beats_a_later_acknowledged_write(tmp_path: Path) -> None:
    """Shrunk by the state machine : crash mid-write, rewrite the key alone, reconnect; the acknowledged write wins."""
    ids = iter(range(2**31, 0, -1000))  # each new document gets a smaller client id than the last
    undo = seeded_client_ids(lambda: next(ids))
    net = MeshNet(tmp_path, 2, timeout=STEP_TIMEOUT_S)
    a, b = net.nodes
    doc = DocId("ctx")
    try:
        await net.start()
        await net.link(a, b)
        await a.m.write(doc, [("k", '"v1"')])
        await net.quiesce()
        # a dies before committing "v2" (never acknowledged), after sending it to b.
        await net.crash_during_write(a, doc, [("k", '"v2"')], relink=False)
        assert b.m.get(doc, "k").value == '"v2"' and a.m.get(doc, "k").value == '"v1"'
        await a.m.write(doc, [("k", '"v3"')])  # acknowledged, and later than "v2" on the same node
        await net.link(a, b)
        await net.quiesce()
        assert not net.differences()
        got = {n.name: (n.m.get(doc, "k").value, n.m.get(doc, "k").conflicts) for n in net.nodes}
        assert got == {"n0": ('"v3"', ()), "n1": ('"v3"', ())}, got
    finally:
        await net.close()
        undo()


async def test_noop_write_creates_no_context(tmp_path: Path) -> None:
    net = MeshNet(tmp_path, 2, timeout=STEP_TIMEOUT_S)
    a, b = net.nodes
    try:
        await net.start()
        await net.link(a, b)
        assert await a.m.write(DocId("ghost"), [("k", None)]) == (0, 0)
        await net.quiesce()
        assert ("ghost" in a.m.contexts) == ("ghost" in b.m.contexts), (
            sorted(a.m.contexts),
            sorted(b.m.contexts),
        )
    finally:
        await net.close()
