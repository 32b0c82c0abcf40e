"""
An in-process network of real :class:`~ctxsync.mesh.Mesh` objects, for model-based tests.

Each :class:`NetNode` has its own identity and SQLite store under a root directory, and knows
every other node of the network as a paired peer (no address: nobody dials, the test links).
:class:`MeshNet` joins nodes with in-memory channels (:func:`tests.helpers.channel_pair`)
wrapped in :class:`NetChannel`, which can misbehave the way a real network may:

- *hold* (pause) one direction of a link: frames queue up, in order, while other links flow,
  so updates overtake each other across paths; optionally the sender then blocks after a few
  held frames (backpressure), so the session's queue can overflow into a resync;
- *duplicate* whole ``SYNC_UPDATE`` frames (never a CHUNK frame, which would break reassembly);
- *cut* a link mid-stream: the frames in flight are lost, then both ends see the close.

:meth:`MeshNet.restart` stops a node's mesh, closes its store, and reopens both from disk.
:meth:`MeshNet.quiesce` waits until nothing is queued or in flight on any link, and
:meth:`MeshNet.differences` compares nodes (entries, keys, live counts, document state).

Everything runs on one event loop; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pycrdt

from ctxsync.codec import MessageType
from ctxsync.config import NodeConfig, PeerConfig, SyncConfig
from ctxsync.crypto import Identity, generate_identity
from ctxsync.entries import Clock, Entry, EntryMap, Slot, split_slot_key
from ctxsync.errors import PeerDisconnected
from ctxsync.mesh import Mesh
from ctxsync.session import PeerSession
from ctxsync.store import Store
from ctxsync.types import ENTRIES_ROOT, DocId, NodeId
from tests.helpers import MemoryChannel, channel_pair

EMPTY_UPDATE = b"\x00\x00"

SMALL_SYNC = SyncConfig(max_frame_bytes=65_536, max_value_bytes=30_000, send_queue_bytes=65_536)
"""The smallest limits the config allows: big values travel as CHUNK frames, and a held
link with backpressure overflows its session queue (resync) after ~64 KiB."""


@functools.cache
def identity(name: str) -> Identity:
    """A node identity, made once per name and process (Ed25519 + X.509 take a few ms)."""
    return generate_identity(name)


class NetChannel:
    """
    One end of a link (implements :class:`ctxsync.transport.Channel`): a :class:`MemoryChannel`
    whose *outgoing* frames can be held, duplicated or dropped.

    Args:
        inner: The end being wrapped.
        rng: Decides which ``SYNC_UPDATE`` frames are duplicated (seeded by the test).
    """

    def __init__(self, inner: MemoryChannel, rng: random.Random) -> None:
        self.inner = inner
        self.peer_id: NodeId = inner.peer_id
        self.remote_address = inner.remote_address
        self.dialed = inner.dialed
        self.rng = rng
        self.held: list[bytes] = []
        """Frames sent while held, not yet handed to the other end."""
        self.holding = False
        self.block_after: int | None = None
        """While holding, ``send()`` blocks once this many frames are held (backpressure)."""
        self.duplicate_p = 0.0
        """Probability that a ``SYNC_UPDATE`` frame is delivered twice."""
        self.delivered = 0
        """Frames handed to the other end (duplicates included)."""
        self.duplicated = 0
        self.dropped = 0
        self._released = asyncio.Event()
        self._released.set()

    @property
    def closed(self) -> bool:
        return self.inner._link.closed.is_set()

    async def send(self, frame: bytes) -> None:
        if self.closed:
            raise PeerDisconnected("connection closed", peer_id=self.peer_id)
        if self.holding or self.held:
            self.held.append(frame)
            if self.holding and self.block_after is not None and len(self.held) >= self.block_after:
                self._released.clear()
                closed = asyncio.ensure_future(self.inner._link.closed.wait())
                released = asyncio.ensure_future(self._released.wait())
                try:
                    await asyncio.wait({closed, released}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    closed.cancel()
                    released.cancel()
            return
        await self._deliver(frame)

    async def _deliver(self, frame: bytes) -> None:
        await self.inner.send(frame)
        self.delivered += 1
        if frame[:1] == bytes([MessageType.SYNC_UPDATE]) and self.rng.random() < self.duplicate_p:
            await self.inner.send(frame)
            self.delivered += 1
            self.duplicated += 1

    def hold(self, *, block_after: int | None = None) -> None:
        """Keep every frame sent from now on until :meth:`release`."""
        self.holding = True
        self.block_after = block_after

    async def release(self, count: int | None = None) -> None:
        """Deliver the first ``count`` held frames (all if None); with None, stop holding."""
        n = len(self.held) if count is None else min(count, len(self.held))
        batch, self.held = self.held[:n], self.held[n:]
        for frame in batch:
            if self.closed:
                self.dropped += 1
                continue
            await self._deliver(frame)
        if count is None:
            self.holding = False
            self.block_after = None
        if not (self.holding and self.block_after is not None and len(self.held) >= self.block_after):
            self._released.set()

    def drop_in_flight(self) -> None:
        """Lose every frame held or queued towards the other end (a connection reset)."""
        self.dropped += len(self.held)
        self.held.clear()
        queue = self.inner._outbox
        while not queue.empty():
            queue.get_nowait()
            self.dropped += 1
            self.delivered -= 1

    async def recv(self) -> bytes:
        return await self.inner.recv()

    async def close(self, reason: str = "") -> None:
        self.held.clear()
        await self.inner.close(reason)
        self._released.set()

    def rtt_s(self) -> float:
        return 0.0


class NetNode:
    """One node: identity and store under ``root / name``; its mesh while open."""

    def __init__(
        self, root: Path, name: str, *, sync: SyncConfig = SMALL_SYNC, compact_threshold: int = 2000
    ) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.identity = identity(name)
        (self.dir / "node.crt").write_bytes(self.identity.cert_pem)
        (self.dir / "node.key").write_bytes(self.identity.key_pem)
        self.node_id: NodeId = self.identity.node_id
        self.sync = sync
        self.compact_threshold = compact_threshold
        self.unload_at_start = False
        """Open the mesh with ``load(unload=True)`` (what the daemon does with ``store.unload_idle_s`` on)."""
        self.store: Store | None = None
        self.mesh: Mesh | None = None
        self.restarts = 0

    def peer_config(self) -> PeerConfig:
        return PeerConfig(node_id=self.node_id, name=self.name, cert_pem=self.identity.cert_pem.decode())

    async def open(self, peers: list[NetNode]) -> Mesh:
        """Open the store, build the mesh and rebuild its contexts from the store."""
        self.store = Store(self.dir / "store.db", compact_threshold=self.compact_threshold)
        await self.store.__aenter__()
        cfg = NodeConfig(
            name=self.name,
            listen=("127.0.0.1", 0),
            api=("127.0.0.1", 1),
            sync=self.sync,
            peers=tuple(p.peer_config() for p in peers if p is not self),
        )
        self.mesh = Mesh(
            node_id=self.node_id,
            config=cfg,
            store=self.store,
            cert_path=self.dir / "node.crt",
            key_path=self.dir / "node.key",
        )
        await self.mesh.load(unload=self.unload_at_start)
        self.mesh.start_peers()  # no addresses: starts no dial loop
        return self.mesh

    async def close(self) -> None:
        """Stop the mesh (Goodbye to every session), then close the store (commits what is queued)."""
        if self.mesh is not None:
            await self.mesh.stop()
            self.mesh = None
        if self.store is not None:
            await self.store.__aexit__(None, None, None)
            self.store = None

    @property
    def m(self) -> Mesh:
        assert self.mesh is not None, f"node {self.name} is not open"
        return self.mesh


@dataclass
class Link:
    """Two nodes joined by a pair of :class:`NetChannel` ends; ``ends[x]`` is held by node x."""

    a: NetNode
    b: NetNode
    ends: dict[str, NetChannel]
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def end(self, holder: NetNode) -> NetChannel:
        return self.ends[holder.name]

    def other(self, node: NetNode) -> NetNode:
        return self.b if node is self.a else self.a


def pair_key(a: NetNode, b: NetNode) -> frozenset[str]:
    return frozenset((a.name, b.name))


class MeshNet:
    """
    Nodes named ``n0, n1, ...`` under ``root``, all paired with each other, none linked yet.

    Call :meth:`start` inside the running loop, :meth:`close` at the end.

    Args:
        root: Directory for the nodes' homes.
        size: Number of nodes.
        seed: Seeds the random choices of the links (frame duplication).
        timeout: Bound, in seconds, of every wait.
        sync: Sync limits of every node.
        compact_threshold: Store log rows per context before compaction.
    """

    def __init__(
        self,
        root: Path,
        size: int,
        *,
        seed: int = 0,
        timeout: float = 10.0,
        sync: SyncConfig = SMALL_SYNC,
        compact_threshold: int = 2000,
    ) -> None:
        self.nodes = [
            NetNode(root, f"n{i}", sync=sync, compact_threshold=compact_threshold) for i in range(size)
        ]
        self.rng = random.Random(seed)
        self.timeout = timeout
        self.links: dict[frozenset[str], Link] = {}
        self.duplicate_p = 0.0
        """Duplication probability given to links made from now on."""
        self.totals = {"duplicated": 0, "dropped": 0}
        """Frames duplicated and lost on links already cut."""

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        for node in self.nodes:
            await node.open(self.nodes)

    async def close(self) -> None:
        """Cut every link, stop every mesh, close every store (never raises for a half-built net)."""
        for link in list(self.links.values()):
            with contextlib.suppress(Exception):
                await self.unlink(link.a, link.b, drop=True)
        for node in self.nodes:
            with contextlib.suppress(Exception):
                await node.close()

    async def restart(self, node: NetNode, *, relink: bool = True) -> None:
        """Stop ``node``'s mesh (Goodbye on every link), close its store, reopen both, and relink
        (unless ``relink`` is false: the node then comes back alone)."""
        mine = [link for link in self.links.values() if node in (link.a, link.b)]
        for link in mine:  # let held frames go, so Goodbye is not stuck behind them
            for end in link.ends.values():
                await end.release()
        async with asyncio.timeout(self.timeout):
            await node.close()
            for link in mine:
                await asyncio.gather(*link.tasks, return_exceptions=True)
                del self.links[pair_key(link.a, link.b)]
                self._count(link)
            node.restarts += 1
            await node.open(self.nodes)
        for link in mine if relink else []:
            await self.link(link.other(node), node)

    async def crash_during_write(
        self, node: NetNode, doc_id: DocId, items: list[tuple[str, str | None]], *, relink: bool = True
    ) -> None:
        """
        Simulate a crash between a write leaving for the peers and its store commit.

        ``node``'s store never commits what it is given meanwhile (``append_nowait`` returns a
        future that never completes: the write's update, and any peer update of those few
        milliseconds, as a crash would lose them); once the update is handed to every open link,
        the write is cancelled (it is never acknowledged) and the node restarts from what its
        store holds.
        """
        store = node.store
        assert store is not None
        hung: list[asyncio.Future[None]] = []

        def never_commits(doc_id: DocId, version: int, update: bytes, **_: Any) -> asyncio.Future[None]:
            hung.append(asyncio.get_running_loop().create_future())
            return hung[-1]

        store.append_nowait = never_commits  # type: ignore[method-assign]  # instance patch, this store only
        try:
            write = asyncio.ensure_future(node.m.write(doc_id, items))

            def sent() -> bool:
                mine = [link for link in self.links.values() if node in (link.a, link.b)]
                return write.done() or all(
                    not s._outbox for link in mine if (s := self.session(node, link)) is not None
                )

            # Usually the update is out at once; a blocked link keeps it queued: crash anyway.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 0.005
            await asyncio.sleep(0)
            while not sent() and loop.time() < deadline:  # noqa: ASYNC110 (bounded poll)
                await asyncio.sleep(0.001)
            write.cancel()
            await asyncio.gather(write, return_exceptions=True)
        finally:
            del store.append_nowait
            for fut in hung:
                fut.cancel()
        await self.restart(node, relink=relink)

    # -- links -------------------------------------------------------------------------

    def linked(self, a: NetNode, b: NetNode) -> bool:
        return pair_key(a, b) in self.links

    def link_of(self, a: NetNode, b: NetNode) -> Link:
        return self.links[pair_key(a, b)]

    async def link(self, a: NetNode, b: NetNode, *, wait_open: bool = True) -> Link:
        """Join ``a`` and ``b`` (``a`` dials); with ``wait_open``, return once both sessions are open."""
        assert a is not b and not self.linked(a, b)
        ca, cb = channel_pair(a.node_id, b.node_id)
        link = Link(a, b, {a.name: NetChannel(ca, self.rng), b.name: NetChannel(cb, self.rng)})
        for end in link.ends.values():
            end.duplicate_p = self.duplicate_p
        loop = asyncio.get_running_loop()
        link.tasks = [
            loop.create_task(a.m.run_channel(link.ends[a.name]), name=f"{a.name}->{b.name}"),
            loop.create_task(b.m.run_channel(link.ends[b.name]), name=f"{b.name}<-{a.name}"),
        ]
        self.links[pair_key(a, b)] = link
        if wait_open:
            await self._wait(lambda: self._open(link), f"link {a.name}-{b.name} open")
        return link

    async def unlink(self, a: NetNode, b: NetNode, *, drop: bool = False, deliver_first: int = 0) -> None:
        """
        Cut the link between ``a`` and ``b`` and wait until both sessions ended.

        Args:
            drop: Lose what is held or in flight (a reset). Otherwise held frames are
                delivered first, and queued ones still arrive (an orderly close).
            deliver_first: With ``drop``, first deliver this many held frames of each direction.
        """
        link = self.links.pop(pair_key(a, b))
        for end in link.ends.values():
            if drop:
                await end.release(deliver_first)
                end.drop_in_flight()
            else:
                await end.release()
        await link.ends[a.name].close("cut by test")
        async with asyncio.timeout(self.timeout):
            await asyncio.gather(*link.tasks, return_exceptions=True)
        self._count(link)

    def _count(self, link: Link) -> None:
        for end in link.ends.values():
            self.totals["duplicated"] += end.duplicated
            self.totals["dropped"] += end.dropped

    def session(self, holder: NetNode, link: Link) -> PeerSession | None:
        """The session ``holder`` runs over ``link``, if it is the current one for that peer."""
        if holder.mesh is None:
            return None
        st = holder.mesh.peers.get(link.other(holder).node_id)
        s = st.session if st else None
        return s if s is not None and s.channel is link.end(holder) else None

    def _open(self, link: Link) -> bool:
        return all((s := self.session(n, link)) is not None and s.is_open for n in (link.a, link.b))

    def _link_idle(self, link: Link) -> bool:
        sessions = {n.name: self.session(n, link) for n in (link.a, link.b)}
        for n in (link.a, link.b):
            s, end = sessions[n.name], link.end(n)
            peer_s = sessions[link.other(n).name]
            if s is None or peer_s is None or not s.is_open or not peer_s.is_open:
                return False
            if s._outbox or end.held or end.inner.unread:
                return False
            if end.delivered != peer_s.stats.received_frames:
                return False  # taken from the queue, not yet processed
        return True

    def idle(self) -> bool:
        """True when every link is open and nothing is queued, held or in flight on it."""
        return all(self._link_idle(link) for link in self.links.values())

    async def quiesce(self, *, stable_rounds: int = 3) -> None:
        """Release every held frame, then wait until the network is idle for a few loop rounds."""
        for link in list(self.links.values()):
            for end in link.ends.values():
                await end.release()
        async with asyncio.timeout(self.timeout):
            stable = 0
            while stable < stable_rounds:
                await asyncio.sleep(0)
                if self.idle():
                    stable += 1
                else:
                    stable = 0
                    await asyncio.sleep(0.001)

    async def _wait(self, predicate: Any, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while not predicate():
            if loop.time() >= deadline:
                raise AssertionError(f"not within {self.timeout} s: {what}")
            await asyncio.sleep(0.001)

    def components(self) -> list[list[NetNode]]:
        """Groups of nodes connected by links (directly or through others)."""
        seen: set[str] = set()
        groups = []
        by_name = {n.name: n for n in self.nodes}
        for start in self.nodes:
            if start.name in seen:
                continue
            group, todo = [], [start.name]
            seen.add(start.name)
            while todo:
                name = todo.pop()
                group.append(by_name[name])
                for key in self.links:
                    if name in key:
                        (other,) = key - {name}
                        if other not in seen:
                            seen.add(other)
                            todo.append(other)
            groups.append(sorted(group, key=lambda n: n.name))
        return groups

    # -- comparing ---------------------------------------------------------------------

    def differences(self, nodes: list[NetNode] | None = None) -> list[str]:
        """
        What differs between ``nodes`` (all by default): contexts, entries, keys, live counts and
        document state (neither of a pair misses items of the other, and their delete sets are equal).
        """
        nodes = self.nodes if nodes is None else nodes
        found: list[str] = []
        first = nodes[0]
        for doc_id in sorted(set().union(*(n.m.context_ids() for n in nodes))):
            # A context a node never heard of counts as empty: a no-op write (deleting an
            # absent key) creates an empty context on its node alone (see test_model.py).
            # An unloaded one is loaded back here (Mesh.context).
            docs = {n.name: ctx.doc if (ctx := n.m.context(doc_id)) else pycrdt.Doc() for n in nodes}
            entries = {n.name: n.m.entries(doc_id) if n.m.has_context(doc_id) else [] for n in nodes}
            for n in nodes[1:]:
                if entries[n.name] != entries[first.name]:
                    found.append(
                        f"{doc_id}: entries of {n.name} != {first.name}:\n"
                        f"  {n.name}: {brief(entries[n.name])}\n  {first.name}: {brief(entries[first.name])}"
                    )
                if n.m.keys(doc_id) != first.m.keys(doc_id):
                    found.append(
                        f"{doc_id}: keys of {n.name} {n.m.keys(doc_id)} != {first.name} {first.m.keys(doc_id)}"
                    )
                da, db = docs[n.name], docs[first.name]
                for x, y, dx, dy in ((n, first, da, db), (first, n, db, da)):
                    missing = dx.get_update(dy.get_state())
                    if missing[:1] != b"\x00":
                        found.append(f"{doc_id}: {y.name} lacks items of {x.name}: {missing.hex()}")
                if delete_set(da) != delete_set(db):
                    found.append(
                        f"{doc_id}: delete sets differ: {n.name} {delete_set(da)} != {first.name} {delete_set(db)}"
                    )
            for n in nodes:
                if n.m.has_context(doc_id):
                    found += [f"{n.name}: {p}" for p in index_problems(n.m, doc_id)]
        return found


def _varuint(data: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return n, pos


def delete_set(doc: pycrdt.Doc[Any]) -> dict[int, list[tuple[int, int]]]:
    """
    A document's delete set, normalised: ``{client: [(start, end), ...]}``, merged and sorted.

    ``get_update(state_vector)`` always carries the whole delete set, so two equal documents
    never give ``b"\\x00\\x00"``: compare the missing items and the delete sets instead.
    """
    data = doc.get_update(doc.get_state())
    n_clients, pos = _varuint(data, 0)
    assert n_clients == 0, "a document misses none of its own items"
    out: dict[int, list[tuple[int, int]]] = {}
    count, pos = _varuint(data, pos)
    for _ in range(count):
        client, pos = _varuint(data, pos)
        n_ranges, pos = _varuint(data, pos)
        for _ in range(n_ranges):
            clock, pos = _varuint(data, pos)
            length, pos = _varuint(data, pos)
            out.setdefault(client, []).append((clock, clock + length))
    for client, ranges in out.items():
        merged: list[tuple[int, int]] = []
        for start, end in sorted(ranges):
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
            else:
                merged.append((start, end))
        out[client] = merged
    return out


def brief(entries: list[Entry]) -> str:
    return ", ".join(
        f"{e.key}={e.value}@{e.writer[:3]}{'+' + str(len(e.conflicts)) if e.conflicts else ''}"
        for e in entries
    )


def raw_slots(doc: pycrdt.Doc[Any]) -> dict[str, dict[NodeId, dict[str, Any]]]:
    """The slots in a document's root map, read directly: ``{key: {writer: raw slot value}}``."""
    out: dict[str, dict[NodeId, dict[str, Any]]] = {}
    for name, raw in doc.get(ENTRIES_ROOT, type=pycrdt.Map).items():
        parts = split_slot_key(name)
        if parts is not None:
            out.setdefault(parts[0], {})[parts[1]] = raw
    return out


def index_problems(mesh: Mesh, doc_id: DocId) -> list[str]:
    """
    Compare a context's live index (kept by observer callbacks) with one rebuilt from scratch
    from a copy of its document, and its O(1) live count with its keys.
    """
    ctx = mesh.context(doc_id)
    assert ctx is not None, f"no context {doc_id}"
    copy: pycrdt.Doc[Any] = pycrdt.Doc()
    copy.apply_update(ctx.doc.get_update())
    fresh = EntryMap(copy, mesh.node_id, Clock())
    problems = []
    live = list(ctx.entries.entries())
    rebuilt = list(fresh.entries())
    if live != rebuilt:
        problems.append(f"{doc_id}: index {brief(live)} != rebuilt from the document {brief(rebuilt)}")
    if len(ctx.entries) != len(ctx.entries.keys()):
        problems.append(f"{doc_id}: live count {len(ctx.entries)} != {len(ctx.entries.keys())} keys")
    fresh.close()
    return problems


__all__ = ["Link", "MeshNet", "NetChannel", "NetNode", "Slot", "index_problems", "raw_slots"]
