"""
The mesh: contexts, peer sessions, the dialer, and the routing of updates.

:class:`Mesh` owns every context (a pycrdt ``Doc`` + its :class:`~ctxsync.entries.EntryMap`),
every live :class:`~ctxsync.session.PeerSession` and a dial loop per configured peer. It is
the :class:`~ctxsync.session.SessionHandler` of all sessions. Its rules:

- A local write is applied to the document, shown to local watchers and sent to the open
  sessions sharing the context at once, while the store commits it; it is acknowledged to
  its caller once the store committed it. (If a crash loses it here, a peer may send it
  back; a later own write it displaces is put back, see ``EntryMap.take_reasserts``.)
- An update received from a peer is applied in one transaction tagged with the peer as
  origin. Only what was new to this node (the transaction's own update) is stored and
  relayed, to every other peer sharing the context, never back to where it came from.
  A duplicate (already seen) update stops here, so a mesh with cycles does not echo.
- On every (re)connect each side sends sync step 1 per shared context; the answer (step 2)
  carries exactly what the asker lacks.
- One connection per pair: if both nodes dial each other, the connection dialed by the
  smaller node id is kept on both sides.

Everything runs on the event loop thread; documents are never touched from another thread.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import fnmatch
import functools
import gc
import math
import random
import secrets
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pycrdt
import structlog

from ctxsync import transport
from ctxsync.codec import Message, SyncStep1, SyncStep2, SyncUpdate
from ctxsync.config import NodeConfig, PeerConfig, format_hostport
from ctxsync.crypto import client_tls_context, node_id_from_cert, server_tls_context
from ctxsync.entries import Clock, Entry, EntryMap, Slot, Strategy, validate_key
from ctxsync.errors import (
    ContextLoadFailed,
    ContextRebuilding,
    CryptoError,
    CtxSyncError,
    EntryError,
    HandshakeRejected,
    InvalidState,
    NotFound,
    PeerError,
    StoreCorrupt,
    StoreError,
    RemoteProtocolError,
    UpdateNotReady,
)
from ctxsync.metrics import trim_memory
from ctxsync.protocol import PeerProtocol
from ctxsync.session import PeerSession
from ctxsync.store import LEGACY_LINEAGE, Store, StoredContext, StoredHead
from ctxsync.types import ENTRIES_ROOT, DocId, NodeId, is_valid_doc_id
from ctxsync.yupdate import (
    InvalidUpdate,
    MissingDependencies,
    UpdateSummary,
    check_update,
    decode_delete_set,
    decode_state_vector,
    delete_set_covers,
)

log = structlog.get_logger("ctxsync.mesh")

_EMPTY_UPDATE = b"\x00\x00"
MAX_UNPERSISTED_BYTES = 64 * 1024 * 1024
"""Updates kept in memory (bytes) while the store fails, to store them once it works again."""
RTT_WINDOW = 120
"""RTT samples kept per peer for the percentiles (one per websocket pong: 10 minutes at the default 5 s ping)."""
LOAD_RETRY_S = 10.0
"""Seconds after a failed load of an unloaded context before the store is read for it again
(requests meanwhile get the same error), and before the peers whose content it could not take
are asked again (sync step 1 and a resync)."""
UNLOAD_MAX_STORED_BYTES = 4 * 1024 * 1024
"""Contexts whose store rows (checkpoint and log) hold more than this many bytes are never
unloaded (:meth:`Mesh.unload`): loading one back runs on the event loop, at the moment a peer's
update or a read needs it, and stalls the loop for as long (measured: about 30 ms per MiB stored, so up to ~130 ms)."""
UNLOAD_AT_STOP_BUDGET_S = 2.0
"""Longest time a clean stop spends unloading contexts to leave their records (:meth:`Mesh.unload_all`),
in seconds. Measured: 160 contexts of 550 writes unloaded in 74-90 ms, about 0.5 ms each."""
_EMPTY_STATE_VECTOR = b"\x00"


class Change(NamedTuple):
    """
    One visible change of an entry, as ``watch`` reports it.

    A named tuple, like :class:`~ctxsync.entries.EntryChange`: one is built per changed key of
    every update (100,000 for a new node's join), and a frozen dataclass took 1.6 µs to build
    against 0.5 µs.
    """

    context: DocId
    key: str
    value: str | None
    """New value as JSON text; None when the entry was deleted."""
    origin: str
    """Node id of the writer of the change."""
    version: int
    """The context's local version after the change."""
    previous: str | None = None
    """The value (JSON text) it replaced; None if the entry was absent."""
    t: str | None = None
    """HLC timestamp of the write (16 hex characters); None if no write is left (removed)."""


def new_lineage() -> str:
    """A fresh lineage id: 22 characters of URL-safe base64 of 128 random bits."""
    return secrets.token_urlsafe(16)


class Context:
    """One context: its document, entries, local version and the update its last transaction made."""

    def __init__(
        self,
        doc_id: DocId,
        node_id: NodeId,
        clock: Clock,
        *,
        version: int = 0,
        lineage: str = LEGACY_LINEAGE,
        client_id: int | None = None,
    ) -> None:
        self.doc_id = doc_id
        self.doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=client_id)
        self.version = version
        """Local change counter: +1 per transaction that changed the document."""
        self.lineage = lineage
        """Id made when the context was first created on some node; only equal lineages sync."""
        self.snapshot_at = version
        """Version at the last automatic snapshot (or at load)."""
        self.lineage_settled = version > 0
        """False while the context is new and unchanged here: it may still take a peer's lineage."""
        self.rebuilding = False
        """True while the document is replaced by its stored state after a failed remote apply."""
        self.unborn = False
        """True while the context exists here only because a write to it is queued (not announced yet)."""
        self.queued_writes: list[_Write] = []
        """Local writes waiting for the next group transaction (see :meth:`Mesh.write`)."""
        self.write_task: asyncio.Task[None] | None = None
        """The task committing queued writes, while there is one."""
        self.known_state: dict[int, int] | None = None
        """A lower bound of the document's state vector (client id -> next clock), or None.

        Decoding ``doc.get_state()`` for every update received costs time linear in the clients
        the context has ever had, one per node and restart and per Yjs client, which grow for as
        long as the context lives (measured 46 µs at 50 clients, 440 µs at 300). Updates are
        checked against this bound first; it is set to the exact state when that check finds
        dependencies missing, and raised by every checked remote update applied. It never
        exceeds the true state: clocks only grow, a rebuilt context starts without one, and a
        checked update is integrated whole (what :func:`check_update`'s ``state`` is for)."""
        self.used_at = time.monotonic()
        """When the context was last read, written or synced here (monotonic seconds; see :meth:`Mesh.unload_idle`)."""
        self._captured: list[bytes] = []
        self._sub = self.doc.observe(self._on_transaction)
        self.entries = EntryMap(self.doc, node_id, clock)

    def _on_transaction(self, event: Any) -> None:
        self._captured.append(event.update)

    def take_update(self) -> bytes | None:
        """Return the update made by the transactions since the last call, or None if nothing changed."""
        captured, self._captured = self._captured, []
        real = [u for u in captured if u != _EMPTY_UPDATE]
        if not real:
            return None
        if len(real) == 1:
            return real[0]
        return pycrdt.merge_updates(*real)

    def close(self) -> None:
        """Drop the observers (pycrdt keeps an observed Doc alive until unobserved)."""
        self.entries.close()
        self.doc.unobserve(self._sub)

    def load(self, updates: list[bytes]) -> None:
        """Apply stored updates (checkpoint first) at startup; nothing is relayed."""
        with _gc_paused(sum(map(len, updates))), self.doc.transaction(origin="store"):
            for u in updates:
                self.doc.apply_update(u)
        self._captured.clear()
        self.entries.pop_changes()
        self.entries.pop_new_conflicts()  # conflicts already there were reported when they appeared


@dataclass(slots=True)
class Parked:
    """
    What stays in memory of a context unloaded after going unchanged (:meth:`Mesh.unload`):
    enough to send and answer sync step 1 and to show the context in ``status``, without its
    document and entry index (measured: about 350 KiB for a context of 300 live entries).
    """

    lineage: str
    version: int
    snapshot_at: int
    """The context's :attr:`Context.snapshot_at`."""
    state_vector: bytes
    """The document's encoded Yjs state vector (``Doc.get_state()``) when it was unloaded."""
    clocks: dict[int, int]
    """The same, decoded: client id -> next clock."""
    delete_set: bytes
    """A Yjs v1 update with no structs and the document's whole delete set
    (``Doc.get_update(state_vector)``): the answer to a sync step 1 from a peer that holds every
    struct this node holds. A deletion moves no clock, so such a peer may still lack one. A peer's
    update with no structs and no deletion outside it brings nothing new, and does not load the
    context (:func:`_brings_nothing` decodes it for that check, and keeps nothing: decoded, the
    delete set of a context with many overwrites took more memory than the rest of its record)."""
    summary: dict[str, Any]
    """The context's fields in :meth:`Mesh.status` (entries, tombstones, strategy, conflicts)."""
    client_id: int | None
    """The document's Yjs client id, given back to it when it is loaded: a new one per load would
    add a client to its state vector, for good and on every replica, at each load and write.
    None for a record read at start: the last run may have made structs under its id that
    reached peers but not the store, and a new run must never make others under the same id."""
    failed_at: float = 0.0
    """When loading it back last failed (monotonic seconds; 0: never)."""
    failure: str = ""
    """Why it failed."""


GC_PAUSE_BYTES = 256 * 1024
"""Updates at least this large (bytes) are applied with Python's cyclic garbage collector paused,
and are followed by a trim of the C heap (:data:`TRIM_AFTER_LARGE_S`)."""
TRIM_AFTER_LARGE_S = 0.5
"""Seconds after the last large update was applied before the C heap's free memory is given back
(:func:`ctxsync.metrics.trim_memory`). Applying a 100,000-key update allocates and frees
about 85 MiB at once, and its history records are freed once the store has committed them
(a fraction of a second later); the daemon's periodic trim (every ``log.stats_interval_s``)
would give that back only later."""


@contextlib.contextmanager
def _gc_paused(size: int) -> Iterator[None]:
    """
    Pause the cyclic garbage collector while a large update (``size`` bytes) is applied.

    Applying one allocates a few objects per entry it holds (pycrdt's event, the index's slots
    and changes); each allocation of 700 containers starts a collection, and the older
    generations are walked again and again while the heap grows: measured 0.2-0.4 s of a
    100,000-key join's 1.4 s. None of those objects form cycles (reference counting frees
    them), and collection resumes when the update is in.
    """
    if size < GC_PAUSE_BYTES or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _check_ready(ctx: Context | None, update: bytes, max_bytes: int) -> UpdateSummary:
    """
    :func:`check_update` an update for ``ctx`` (``None``: a context this node does not have yet)
    against what it holds: first against ``ctx.known_state``, a lower bound (if that passes,
    the true state passes too), then, only if that finds dependencies missing, against the exact
    state decoded from the document, which becomes the new bound.

    Raises:
        InvalidUpdate: The update is malformed or misuses the entries root.
        MissingDependencies: It builds on structs the document does not have.
    """
    if ctx is None:
        return check_update(update, entries_root=ENTRIES_ROOT, max_bytes=max_bytes, state={})
    known = ctx.known_state
    if known is not None:
        try:
            return check_update(update, entries_root=ENTRIES_ROOT, max_bytes=max_bytes, state=known)
        except MissingDependencies:
            pass  # perhaps only missing from the bound (this node's own writes raise no bound)
    ctx.known_state = exact = decode_state_vector(ctx.doc.get_state())
    return check_update(update, entries_root=ENTRIES_ROOT, max_bytes=max_bytes, state=exact)


@dataclass(frozen=True, slots=True)
class Ingested:
    """What :meth:`Mesh.ingest` applied."""

    updates: list[bytes]
    """Updates of what was new here, one per applied update that changed something."""
    missing: bool
    """True if updates were left out because they build on structs this node lacks."""


class _Subscription:
    def __init__(self, context: DocId | None, prefix: str, maxsize: int, glob: str | None = None) -> None:
        self.context = context
        self.prefix = prefix
        self.glob = glob
        self.queue: asyncio.Queue[Change | None] = asyncio.Queue(maxsize)
        self.overflowed = False
        self.ended = False

    def end(self) -> None:
        """Stop offering changes; the reader gets what is queued, then None (with ``overflowed`` false)."""
        if self.ended or self.overflowed:
            return
        self.ended = True
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
        self.queue.put_nowait(None)

    def offer(self, change: Change) -> None:
        if self.overflowed or self.ended:
            return
        if self.context is not None and change.context != self.context:
            return
        if not change.key.startswith(self.prefix):
            return
        if self.glob is not None and not fnmatch.fnmatchcase(change.key, self.glob):
            return
        try:
            self.queue.put_nowait(change)
        except asyncio.QueueFull:
            self.overflowed = True
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
            self.queue.put_nowait(None)  # tells the reader it fell behind


@dataclass
class PeerState:
    """What the mesh knows of one configured peer, beyond its config."""

    config: PeerConfig
    session: PeerSession | None = None
    dial_task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    reconnects: int = 0
    last_error: str = ""
    connected_since: float | None = None
    protocol_errors: int = 0
    discovered: tuple[str, int] | None = None
    """Address found by mDNS discovery; used only when the config gives no static ``addr``."""
    rtt_ms: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=RTT_WINDOW))
    """Recent RTT samples (one per pong), in milliseconds: the sliding window of the percentiles."""
    out_of_sync_since: dict[DocId, float] = field(default_factory=dict)
    """Per shared context, when (monotonic seconds) :meth:`Mesh.status` first saw it out of sync."""
    replication_lag_ms: dict[DocId, float] = field(default_factory=dict)
    """Per context, the last replication lag seen from this peer: origin commit to apply here (ms)."""
    remote_lineage: dict[DocId, str] = field(default_factory=dict)
    """The lineage the peer last announced (sync step 1) per context; kept across sessions."""


@dataclass(slots=True)
class _Write:
    """One caller's local write, queued for the context's next group transaction."""

    items: list[tuple[str, str | None]]
    future: asyncio.Future[tuple[int, int]]
    changed: int = 0


@dataclass(slots=True)
class _Pending:
    """An update on its way to the store, with the history records of its version."""

    doc_id: DocId
    version: int
    update: bytes
    lineage: str
    history: list[tuple[int, dict[str, Any]]]
    local: bool
    """Made here: a failing store keeps it however full its retention is (no peer may hold it)."""
    missed_through: int = 0
    """An earlier version of the context whose records the store will never get (see :meth:`Mesh._note_history_gap`); 0 if none."""


_Stored = tuple[_Pending, "asyncio.Future[StoreError | None]"]
"""A version made here and the future of its commit (:meth:`Mesh._persist_nowait`)."""


def _settle_stored(done: asyncio.Future[StoreError | None], error: StoreError | None) -> None:
    if not done.done():  # cancelled by a caller that stopped waiting
        done.set_result(error)


_STOPPED_APPLIED = "the daemon stopped before the write was acknowledged; it may still have been stored"
_STOPPED_QUEUED = "the daemon stopped before the write was applied; nothing of it was stored"


def _retried(exc: BaseException) -> StoreError:
    """What a caller is told of an update the store refused and the mesh keeps for a retry."""
    return StoreError(f"the store failed ({exc}); the change stays in memory and is retried")


def backoff(min_s: float, max_s: float, *, factor: float = 2.0) -> Iterator[float]:
    """
    Yield reconnect delays in seconds: exponential from ``min_s`` to ``max_s`` with full jitter.

    Modeled on websockets ``client.backoff()``; jitter keeps a restarted mesh from
    reconnecting in lockstep.
    """
    delay = min_s
    while True:
        yield random.uniform(min_s / 2, delay)
        delay = min(delay * factor, max_s)


def is_retryable(exc: BaseException) -> bool:
    """Tell whether a failed dial or session deserves another dial (all but a rejected identity)."""
    return isinstance(exc, (PeerError, OSError)) and not isinstance(exc, HandshakeRejected)


class Mesh:
    """
    Contexts and peers of this node.

    Args:
        node_id: This node's id.
        config: The node's configuration (its ``peers`` are the initial peer list).
        store: The opened store.
        cert_path: This node's certificate file (PEM).
        key_path: This node's private key file (PEM).
    """

    def __init__(
        self,
        *,
        node_id: NodeId,
        config: NodeConfig,
        store: Store,
        cert_path: Path,
        key_path: Path,
    ) -> None:
        self.node_id = node_id
        self.config = config
        self.store = store
        self.cert_path = cert_path
        self.key_path = key_path
        self.clock = Clock()
        self.contexts: dict[DocId, Context] = {}
        """The contexts loaded in memory; the others are in :attr:`parked` (see :meth:`unload`)."""
        self.parked: dict[DocId, Parked] = {}
        """Contexts unloaded from memory (:meth:`unload`); loaded back when needed."""
        self._stored_version: dict[DocId, int] = {}
        """Per context, the highest version the store has committed (what :meth:`Store.load_now` would read)."""
        self._incomplete: set[DocId] = set()
        """Contexts an update of which the store never got (``store.retention_full``): kept loaded until a restart."""
        self._history_gaps: dict[DocId, int] = {}
        """Per context, the latest version whose history records the store will never get, until
        the store has committed that (:meth:`_note_history_gap`); readers stop before it."""
        self._gap_flush: asyncio.Task[None] | None = None
        self._sync_retries: set[tuple[str, DocId]] = set()
        """(session id, context) pairs whose sync waits for :data:`LOAD_RETRY_S` after a failed load."""
        self.loads = 0
        """Unloaded contexts loaded back since start."""
        self.unloads = 0
        """Contexts unloaded since start."""
        self.rebuilt = 0
        """Contexts rebuilt from the store at start (the others came from the records of an earlier run's unloads)."""
        self.peers: dict[NodeId, PeerState] = {}
        self._subs: set[_Subscription] = set()
        self._registered: set[PeerSession] = set()
        self._unpersisted: list[_Pending] = []
        """Updates the store refused, kept to retry."""
        self._to_persist: list[tuple[_Pending, asyncio.Future[StoreError | None]]] = []
        """Updates waiting for the next event loop turn to be queued to the store (:meth:`_persist_nowait`)."""
        self._update_subs: dict[DocId, dict[int, Callable[[bytes, object], None]]] = {}
        self.on_durable: list[Callable[[DocId, int], None]] = []
        """Called with (doc_id, version) once a version and its history are committed."""
        self.on_version: list[Callable[[Context], None]] = []
        """Called after each new version of a context (automatic snapshots)."""
        self._unpersisted_bytes = 0
        self.store_failing: str | None = None
        """Why the store last failed, while updates wait to be stored; None when healthy."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server_ctx: ssl.SSLContext | None = None
        self._trim: asyncio.TimerHandle | None = None
        self._stopping = False
        self.updates_received = 0
        self.updates_sent = 0
        self.protocol_errors = 0

    # -- lifecycle -------------------------------------------------------------------

    async def load(self, *, unload: bool = False) -> None:
        """
        Rebuild every context from the store.

        Args:
            unload: Take each context unchanged since an earlier run unloaded it from the record
                that unload stored (:meth:`Store.heads`; its rows are only unsealed, :meth:`Store.check_sealed`, not replayed), and unload each
                other one as soon as it is rebuilt (:meth:`unload`; those it keeps stay
                loaded): a start holds one document at a time, and a node holding many contexts
                does not keep them all in memory until they go unused; they are loaded back on
                first use.

        Raises:
            StoreCorrupt: A stored update cannot be applied, or (a context taken from its record)
                a stored blob cannot be unsealed (:meth:`Store.check_sealed`).
        """
        if unload:  # one context at a time: never every stored byte in memory at once
            for head in await self.store.heads():
                parked = _parked_from_record(head)
                if parked is not None:  # unloaded in an earlier run, unchanged since: nothing to rebuild
                    assert head.record is not None
                    await self.store.check_sealed(head.doc_id)  # but a damaged blob is still refused at start
                    self.clock.observe(head.record.get("hlc"))  # as a rebuild would have: later writes sort after its own
                    self.parked[head.doc_id] = parked
                    self._stored_version[head.doc_id] = head.version
                    continue
                stored = await self.store.load(head.doc_id)
                if stored is not None:
                    self._rebuild_stored(stored)
                    self.unload(head.doc_id)
        else:
            for stored in await self.store.load_all():
                self._rebuild_stored(stored)

    def _rebuild_stored(self, stored: StoredContext) -> None:
        """Rebuild one context from its stored checkpoint and log. Raises StoreCorrupt if an update cannot be applied."""
        self.rebuilt += 1
        ctx = Context(stored.doc_id, self.node_id, self.clock, version=stored.version, lineage=stored.lineage)
        try:
            ctx.load(stored.updates)
        except BaseException as exc:
            _reraise_fatal(exc)
            raise StoreCorrupt(
                f"{self.store.path}: context {stored.doc_id!r}: a stored update cannot be applied "
                f"({type(exc).__name__}: {exc}); the file is kept as it is"
            ) from None
        self.contexts[stored.doc_id] = ctx
        self._stored_version[stored.doc_id] = stored.version

    def start_peers(self) -> None:
        """Start a dial loop for every configured peer (call once, inside the running loop)."""
        self.set_peers(self.config.peers)

    async def stop(self) -> None:
        """Say Goodbye to every peer, stop dialing, end every session."""
        self._stopping = True
        for st in self.peers.values():
            if st.dial_task:
                st.dial_task.cancel()
        sessions = [st.session for st in self.peers.values() if st.session]
        await asyncio.gather(*(s.close("node stopping") for s in sessions), return_exceptions=True)
        if self._trim is not None:
            self._trim.cancel()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sub in list(self._subs):
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(None)
        self._hand_to_store()  # no version made here is left off the store's queue

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- peers -----------------------------------------------------------------------

    def set_peers(self, peers: tuple[PeerConfig, ...]) -> None:
        """
        Make ``peers`` the live peer list: new peers are dialed, removed ones are cut off at
        once (their session closed, their certificate no longer trusted), changed ones are
        redialed.
        """
        wanted: dict[NodeId, PeerConfig] = {}
        for p in peers:
            try:
                if node_id_from_cert(p.cert_pem.encode()) != p.node_id:
                    raise CryptoError("the certificate does not hash to this node id")
            except CryptoError as exc:
                log.error("peer.invalid", peer_id=p.node_id, peer_name=p.name, reason=str(exc))
                continue
            wanted[p.node_id] = p
        peers = tuple(wanted.values())
        for pid in list(self.peers):
            if pid not in wanted:
                st = self.peers.pop(pid)
                if st.dial_task:
                    st.dial_task.cancel()
                if st.session:
                    self._spawn(st.session.close("peer removed"), f"close-{pid[:7]}")
                log.info("peer.removed", peer_id=pid)
        for pid, pcfg in wanted.items():
            existing = self.peers.get(pid)
            if existing is None:
                st = self.peers[pid] = PeerState(pcfg)
                log.info("peer.added", peer_id=pid, peer_name=pcfg.name)
            else:
                st = existing
            if st.config != pcfg:
                st.config = pcfg
                if st.session:
                    self._spawn(st.session.close("peer changed"), f"close-{pid[:7]}")
                if st.dial_task:
                    st.dial_task.cancel()
                    st.dial_task = None
            if st.dial_task is None and (pcfg.addr or st.discovered) is not None and not self._stopping:
                st.dial_task = self._spawn(self._dial_loop(st), f"dial-{pid[:7]}")
        self._server_ctx = None
        self.config = dataclasses.replace(self.config, peers=tuple(peers))

    def on_discovered(self, peer_id: NodeId, addrs: list[tuple[str, int]]) -> None:
        """
        Take an address of a paired peer found by mDNS discovery.

        Ignored for unpaired node ids and for peers with a static ``addr`` (which always wins).
        The address is only where to dial: the TLS handshake still checks the pinned certificate.
        """
        st = self.peers.get(peer_id)
        if st is None or st.config.addr is not None or not addrs or self._stopping:
            return
        addr = addrs[0]
        if addr == st.discovered:
            return
        st.discovered = addr
        log.info("peer.discovered", peer_id=peer_id, addr=format_hostport(*addr))
        if st.dial_task is None or st.dial_task.done():
            st.dial_task = self._spawn(self._dial_loop(st), f"dial-{peer_id[:7]}")
        else:
            st.wake.set()

    def server_context(self) -> ssl.SSLContext:
        """TLS context trusting exactly the peers paired now (rebuilt after each change)."""
        if self._server_ctx is None:
            self._server_ctx = server_tls_context(
                self.cert_path, self.key_path, [st.config.cert_pem.encode() for st in self.peers.values()]
            )
        return self._server_ctx

    async def _dial_loop(self, st: PeerState) -> None:
        sync = self.config.sync
        delays = backoff(sync.reconnect_min_s, sync.reconnect_max_s)
        # Both sides dial; the larger node id waits a moment so the kept connection
        # (the smaller id's) usually comes first.
        if self.node_id > st.config.node_id:
            await asyncio.sleep(random.uniform(0.05, 0.3))
        while not self._stopping:
            if st.session is not None:
                st.wake.clear()
                await st.wake.wait()
                delays = backoff(sync.reconnect_min_s, sync.reconnect_max_s)
                continue
            pcfg = st.config
            addr = pcfg.addr or st.discovered
            if addr is None:  # a discovered address went away
                st.dial_task = None
                return
            try:
                ctx = client_tls_context(self.cert_path, self.key_path, pcfg.cert_pem.encode())
                channel = await transport.dial(
                    addr[0],
                    addr[1],
                    ssl_context=ctx,
                    expected_peer=pcfg.node_id,
                    max_frame_bytes=sync.max_frame_bytes,
                    ping_interval=sync.ping_interval_s,
                    ping_timeout=sync.ping_timeout_s,
                    open_timeout=max(sync.ping_timeout_s, 2.0),
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not is_retryable(exc):
                    st.last_error = str(exc)
                    log.warning("peer.dial_failed", peer_id=pcfg.node_id, reason=str(exc), retry=False)
                    return
                delay = next(delays)
                # INFO when the reason changes (first failure, a new cause), DEBUG for repeats,
                # so a peer that stays away is visible without flooding the log.
                level = log.info if str(exc) != st.last_error else log.debug
                st.last_error = str(exc)
                level("peer.dial_failed", peer_id=pcfg.node_id, reason=str(exc), retry=True, retry_in_s=round(delay, 2))
                st.wake.clear()
                with contextlib.suppress(TimeoutError):  # a new discovered address wakes it early
                    await asyncio.wait_for(st.wake.wait(), delay)
                continue
            opened = st.reconnects
            await self.run_channel(channel)
            if st.reconnects != opened:  # a session was open: start the backoff afresh
                delays = backoff(sync.reconnect_min_s, sync.reconnect_max_s)
            await asyncio.sleep(next(delays) if st.session is None else 0)

    async def run_channel(self, channel: transport.Channel) -> None:
        """Run a session over an authenticated channel (dialed, or accepted by the listener)."""
        st = self.peers.get(channel.peer_id)
        if st is None:
            log.warning(
                "peer.rejected", peer_id=channel.peer_id, addr=channel.remote_address, reason="not paired", stage="peer_list"
            )
            await channel.close("not paired")
            return
        sync = self.config.sync
        protocol = PeerProtocol(
            self.node_id,
            self.config.name,
            expected_peer=channel.peer_id,
            max_frame_bytes=sync.max_frame_bytes,
            max_message_bytes=sync.max_message_bytes,
        )
        session = PeerSession(channel, protocol, self, max_queue_bytes=sync.send_queue_bytes)
        try:
            await session.run()
        except Exception:
            log.exception("session.crashed", peer_id=channel.peer_id, session_id=session.session_id)

    # -- SessionHandler --------------------------------------------------------------

    def on_session_open(self, session: PeerSession) -> None:
        st = self.peers.get(session.peer_id)
        if st is None:  # removed while handshaking
            self._spawn(session.close("not paired"), "close-unpaired")
            return
        current = st.session
        if current is not None and current is not session:
            if current.channel.dialed == session.channel.dialed:
                # Same dialer again: it only redials after its own session ended, so the
                # old one is half-open here. Keep the new one.
                keep_new = True
            else:
                keep_dialed = self.node_id < session.peer_id  # the smaller id's dial wins
                keep_new = session.channel.dialed == keep_dialed
            loser = current if keep_new else session
            self._spawn(loser.close("duplicate connection"), "close-duplicate")
            if not keep_new:
                return
        st.session = session
        st.last_error = ""
        self._registered.add(session)
        st.connected_since = time.monotonic()
        st.reconnects += 1
        log.info(
            "peer.connected",
            peer_id=session.peer_id,
            peer_name=session.protocol.peer_name,
            addr=session.channel.remote_address,
            dialed=session.channel.dialed,
            session_id=session.session_id,
        )
        for ctx in self.contexts.values():
            if st.config.shares(ctx.doc_id):
                session.send_step1(ctx.doc_id, ctx.doc.get_state(), ctx.lineage)
        for doc_id, parked in self.parked.items():
            if st.config.shares(doc_id):
                session.send_step1(doc_id, parked.state_vector, parked.lineage)

    def on_session_closed(self, session: PeerSession, reason: str) -> None:
        st = self.peers.get(session.peer_id)
        if st is not None and st.session is session:
            st.session = None
            st.connected_since = None
            st.wake.set()
        if session in self._registered:
            self._registered.discard(session)
            log.info(
                "peer.disconnected",
                peer_id=session.peer_id,
                session_id=session.session_id,
                reason=reason,
                duration_s=round(time.monotonic() - session.opened_at, 3),
            )
        if reason.startswith("protocol error"):
            self.protocol_errors += 1
            if st is not None:
                st.protocol_errors += 1

    def resync_update(self, session: PeerSession, doc_id: DocId) -> bytes | None:
        try:
            ctx = self._loaded(doc_id)
        except ContextLoadFailed:  # logged; tried again later
            self._sync_later(session, doc_id)
            return None
        if ctx is None:
            return None
        return ctx.doc.get_update(session.remote_state_vectors.get(doc_id, _EMPTY_STATE_VECTOR))

    def on_message(self, session: PeerSession, message: Message) -> None:
        st = self.peers.get(session.peer_id)
        if st is None or st.session is not session:
            return  # a closing duplicate or a removed peer: ignore
        if not isinstance(message, (SyncStep1, SyncStep2, SyncUpdate)):
            raise RemoteProtocolError(f"unexpected {type(message).__name__}")
        try:
            self._on_sync_message(session, st, message)
        except ContextLoadFailed:
            # An unloaded context could not be read back (logged as context.load_failed): the
            # message is dropped, and both sides' sync of it is asked again later.
            log.debug("sync.dropped", peer_id=session.peer_id, doc_id=message.doc_id, reason="context not loadable")
            self._sync_later(session, message.doc_id)

    def _sync_later(self, session: PeerSession, doc_id: DocId) -> None:
        """After a failed load dropped a message of ``session`` for ``doc_id``: mark it out of sync, and sync it again in :data:`LOAD_RETRY_S`."""
        session.synced[doc_id] = False
        key = (session.session_id, doc_id)
        if key not in self._sync_retries:
            self._sync_retries.add(key)
            self._spawn(self._retry_sync(session, doc_id, key), f"sync-retry-{doc_id}")

    async def _retry_sync(self, session: PeerSession, doc_id: DocId, key: tuple[str, DocId]) -> None:
        try:
            await asyncio.sleep(LOAD_RETRY_S)
        finally:
            self._sync_retries.discard(key)
        lineage = self._lineage_of(doc_id)
        if not session.is_open or lineage is None:
            return
        ctx, parked = self.contexts.get(doc_id), self.parked.get(doc_id)
        state = ctx.doc.get_state() if ctx is not None else parked.state_vector if parked is not None else _EMPTY_STATE_VECTOR
        session.send_step1(doc_id, state, lineage)  # what the peer sent and was dropped comes again
        if doc_id in session.remote_state_vectors:
            session.request_resync(doc_id)  # and the peer gets what its step 1 asked for

    def _on_sync_message(self, session: PeerSession, st: PeerState, message: SyncStep1 | SyncStep2 | SyncUpdate) -> None:
        doc_id = message.doc_id
        if not st.config.shares(doc_id):
            # Asking (step 1) is how a one-sided share shows up; sending content is a refusal.
            level = log.info if isinstance(message, SyncStep1) else log.warning
            level("peer.denied", peer_id=session.peer_id, doc_id=doc_id, reason="context not shared")
            return
        if isinstance(message, SyncStep1):
            self._on_step1(session, st, message)
            return
        lineage = self._lineage_of(doc_id)
        if lineage is None or st.remote_lineage.get(doc_id, lineage) != lineage:
            if lineage is None and doc_id not in session.step1_sent_at:
                # Content before the peer's step 1 (which names the lineage): ask it to say it.
                session.send_step1(doc_id, _EMPTY_STATE_VECTOR, "")
            log.debug("sync.dropped", peer_id=session.peer_id, doc_id=doc_id, reason="lineage unknown or different")
            return
        updates = [message.update] if isinstance(message, SyncStep2) else list(message.updates)
        parked = self.parked.get(doc_id)
        if not st.config.accepts_writes(doc_id):
            if any(u != _EMPTY_UPDATE for u in updates):
                reason = "read-only peer" if st.config.read_only else "read-only context"
                log.warning("peer.denied", peer_id=session.peer_id, doc_id=doc_id, reason=reason)
        elif parked is not None and _brings_nothing(parked, updates):
            pass  # e.g. the answer to a reconnect's step 1 when nothing changed: the context stays unloaded
        else:
            origin_ms = message.origin_ms if isinstance(message, SyncUpdate) else 0
            self._apply_remote(session, doc_id, updates, origin_ms)
            if origin_ms:
                # Wall clocks of two machines: skew shows here (ack_lag_ms needs no clock sync).
                st.replication_lag_ms[doc_id] = max(0.0, time.time() * 1000 - origin_ms)
        if isinstance(message, SyncStep2) and not session.synced.get(doc_id, True):
            session.synced[doc_id] = True
            started = session.step1_sent_at.get(doc_id, time.monotonic())
            log.info(
                "sync.completed",
                peer_id=session.peer_id,
                doc_id=doc_id,
                received_bytes=len(message.update),
                duration_ms=round((time.monotonic() - started) * 1000, 3),
                session_id=session.session_id,
            )

    def _on_step1(self, session: PeerSession, st: PeerState, message: SyncStep1) -> None:
        """Answer a peer's sync step 1, unless its lineage of the context differs from ours."""
        doc_id, lineage = message.doc_id, message.lineage
        ctx = self.contexts.get(doc_id)
        parked = self.parked.get(doc_id) if ctx is None else None
        if lineage:
            st.remote_lineage[doc_id] = lineage
        if parked is not None:
            if lineage and lineage != parked.lineage:
                self._report_mismatch(session, doc_id, parked.lineage, lineage)
                return
            session.remote_state_vectors[doc_id] = message.state_vector
            try:
                theirs = decode_state_vector(message.state_vector)
            except InvalidUpdate as exc:
                raise RemoteProtocolError(f"invalid state vector for {doc_id}: {exc}") from None
            if all(theirs.get(client, 0) >= clock for client, clock in parked.clocks.items()):
                # The peer has every struct this node has: the answer is the delete set alone,
                # and the context stays unloaded (it is loaded if the peer sends anything new).
                if doc_id not in session.step1_sent_at or not lineage:
                    session.send_step1(doc_id, parked.state_vector, parked.lineage)
                session.send_step2(doc_id, parked.delete_set)
                return
            ctx = self._load_parked(doc_id)
        if ctx is None:
            if not lineage:
                return  # neither side has it
            ctx = self._context(doc_id, create=True, lineage=lineage)
        elif lineage and lineage != ctx.lineage and ctx.version == 0 and not ctx.lineage_settled:
            # Opened here (a Yjs client connected) but never changed: take the first lineage a
            # peer announces instead of refusing it, and tell every peer.
            log.info("context.lineage_taken", doc_id=doc_id, peer_id=session.peer_id, lineage=lineage, was=ctx.lineage)
            ctx.lineage = lineage
            ctx.lineage_settled = True
            self._announce(ctx)
        elif lineage and lineage != ctx.lineage:
            self._report_mismatch(session, doc_id, ctx.lineage, lineage)
            return
        session.remote_state_vectors[doc_id] = message.state_vector
        try:
            answer = ctx.doc.get_update(message.state_vector)
        except BaseException as exc:
            _reraise_fatal(exc)
            raise RemoteProtocolError(f"invalid state vector for {doc_id}: {exc}") from None
        if doc_id not in session.step1_sent_at or not lineage:
            # Our step 1 goes first: it names the lineage before any content arrives.
            session.send_step1(doc_id, ctx.doc.get_state(), ctx.lineage)
        session.send_step2(doc_id, answer)

    @staticmethod
    def _report_mismatch(session: PeerSession, doc_id: DocId, ours: str, theirs: str) -> None:
        """Log a peer's different lineage of a context, once per session and lineage."""
        if session.lineage_reported.get(doc_id) != theirs:
            session.lineage_reported[doc_id] = theirs
            log.warning(
                "context.lineage_mismatch",
                peer_id=session.peer_id,
                doc_id=doc_id,
                lineage=ours,
                peer_lineage=theirs,
                hint=f"ctxsync context adopt {doc_id} --from {session.peer_id}",
            )

    def _apply_remote(self, session: PeerSession, doc_id: DocId, updates: list[bytes], origin_ms: int = 0) -> None:
        received = sum(1 for u in updates if u != _EMPTY_UPDATE)  # an empty step 2 is no update
        self.updates_received += received
        session.stats.received_updates += received
        result = self.ingest(session.peer_id, doc_id, updates)
        ctx = self.contexts.get(doc_id)
        if ctx is None:
            return
        for update in result.updates:
            self._persist_nowait(
                self._committed(ctx, update, exclude=session.peer_id, origin=session.peer_id, origin_ms=origin_ms)
            )
        if result.missing:
            self._ask_for_missing(session, ctx)
        reasserts = ctx.entries.take_reasserts()
        if reasserts:
            self._restore_own(ctx, reasserts)

    def _ask_for_missing(self, session: PeerSession, ctx: Context) -> None:
        """An update from ``session`` built on structs this node lacks: ask the peer by sync step 1 (at most once a second)."""
        last = session.step1_sent_at.get(ctx.doc_id, 0.0)
        if session.synced.get(ctx.doc_id, True) is False and time.monotonic() - last < 1.0:
            return  # a step 1 is already on its way
        log.debug("sync.missing_dependencies", peer_id=session.peer_id, doc_id=ctx.doc_id)
        session.send_step1(ctx.doc_id, ctx.doc.get_state(), ctx.lineage)

    def _restore_own(self, ctx: Context, slots: dict[str, Slot]) -> None:
        """Put back this node's newer writes that an older write of its own, lost here in a crash, displaced."""
        with ctx.entries.transaction(origin="local"):
            restored = ctx.entries.restore_own(slots)
        update = ctx.take_update()
        if update is None:
            return
        log.info("entry.restored", doc_id=ctx.doc_id, keys=restored)
        pending = self._committed(ctx, update, exclude=None, origin=self.node_id, origin_ms=_now_ms())
        # Queued now, not by a task: a task cancelled by stop() before its first step would never
        # queue it, and a later version's commit would then hide the gap (an unload's record).
        self._persist_nowait(pending)

    def _durable(self, p: _Pending) -> None:
        if p.version > self._stored_version.get(p.doc_id, 0):
            self._stored_version[p.doc_id] = p.version
        if p.missed_through:
            self._gap_committed(p.doc_id, p.missed_through)
        for hook in self.on_durable:
            try:
                hook(p.doc_id, p.version)
            except Exception:
                log.exception("hook.failed", hook="on_durable", doc_id=p.doc_id)

    def ingest(self, origin: NodeId, doc_id: DocId, updates: list[bytes]) -> Ingested:
        """
        Apply updates received from a peer: the one path every remote byte takes into a document.

        Each update is walked by :func:`ctxsync.yupdate.check_update` against the document as it
        is at that moment (size cap, every claimed length checked against the bytes there,
        nothing but plain values under the entries root, and every struct it builds on already
        here), then applied in its own transaction tagged ``origin``, catching
        ``BaseException`` (pycrdt panics) but never ``KeyboardInterrupt``/``SystemExit``/
        ``CancelledError``. An update that needs structs this node lacks is not applied: pycrdt
        would keep it pending, and its pending-update code can crash the process (found by
        fuzzing pycrdt 0.14.13); the caller asks the peer for what is missing (sync step 1)
        instead. If a real apply fails half way, the context is rebuilt from the store and
        resynced from its peers. (DESIGN.md also asks for a scratch document first; an empty
        scratch document makes every update that builds on earlier ones pending, the very state
        that crashes pycrdt, so the state-vector check replaces it.)

        Args:
            origin: The peer the updates came from.
            doc_id: Their context (created when the first update is applied).
            updates: Yjs v1 updates, applied in order.

        Returns:
            The updates of what was new to this node, one per update that changed something (to
            store and relay), and whether the rest was left out for missing dependencies.

        Raises:
            RemoteProtocolError: An update was refused (InvalidUpdate) or made pycrdt fail;
                updates before it in ``updates`` stay applied (they were valid).
        """
        limit = self.config.sync.max_message_bytes
        ctx = self._loaded(doc_id)
        new: list[bytes] = []
        if ctx is not None and ctx.rebuilding:
            return Ingested(new, missing=False)  # the rebuild's resync brings them again
        for u in updates:
            try:
                summary = _check_ready(ctx, u, limit)
            except MissingDependencies:
                return Ingested(new, missing=True)
            except InvalidUpdate as exc:
                raise InvalidUpdate(f"update refused for {doc_id}: {exc.reason}", offset=exc.offset) from None
            if ctx is None:
                ctx = self._context(doc_id, create=True)  # only now: a refused update creates nothing
            try:
                update = self._apply_checked(ctx, u, origin, summary)
            except _ApplyFailed as exc:
                raise RemoteProtocolError(f"update refused for {doc_id}: {exc}") from None
            if update is not None:
                new.append(update)
        return Ingested(new, missing=False)

    def _apply_checked(self, ctx: Context, update: bytes, origin: str, summary: UpdateSummary) -> bytes | None:
        """
        Apply one update that passed :func:`check_update` (``summary``: what it found) against the
        context's state, in its own transaction tagged ``origin``; raise ``ctx.known_state`` by it.

        Returns:
            The transaction's own update (what was new here), or None if nothing changed.

        Raises:
            _ApplyFailed: pycrdt failed (a panic is a BaseException); the context, perhaps
                half-updated, is being rebuilt from the store.
        """
        try:
            with _gc_paused(len(update)), ctx.doc.transaction(origin=origin):
                ctx.doc.apply_update(update)
        except BaseException as exc:
            _reraise_fatal(exc)
            ctx.known_state = None
            ctx.take_update()
            self._rebuild(ctx, f"{type(exc).__name__}: {exc}")
            raise _ApplyFailed(f"{type(exc).__name__}: {exc}") from None
        known = ctx.known_state
        if known is not None:
            for client, end in summary.state_vector.items():
                if known.get(client, 0) < end:
                    known[client] = end
        if len(update) >= GC_PAUSE_BYTES:
            self._trim_soon()
        return ctx.take_update()

    def _trim_soon(self) -> None:
        """Give the C heap's free memory back :data:`TRIM_AFTER_LARGE_S` after the last large update (debounced)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # applied outside an event loop (tests, tools): nothing to schedule on
        if self._trim is not None:
            self._trim.cancel()
        self._trim = loop.call_later(TRIM_AFTER_LARGE_S, self._trim_now)

    def _trim_now(self) -> None:
        self._trim = None
        trim_memory()

    def _rebuild(self, ctx: Context, reason: str) -> None:
        """Replace a context whose document may be half-updated by its stored state, then resync it."""
        ctx.rebuilding = True
        log.error("context.rebuilding", doc_id=ctx.doc_id, reason=reason)
        self._spawn(self._rebuild_from_store(ctx), f"rebuild-{ctx.doc_id}")

    async def _rebuild_from_store(self, ctx: Context) -> None:
        fresh = Context(ctx.doc_id, self.node_id, self.clock, version=ctx.version, lineage=ctx.lineage)
        try:
            self._hand_to_store()
            stored = await self.store.load(ctx.doc_id)  # runs after every append queued before it
            retained = [p.update for p in self._unpersisted if p.doc_id == ctx.doc_id]
            fresh.load((stored.updates if stored else []) + retained)
        except BaseException as exc:
            _reraise_fatal(exc)
            fresh.close()
            # The context stays "rebuilding": writes to it are refused, peers' updates to it
            # dropped, until a restart loads it again (or refuses a damaged store).
            log.error("context.rebuild_failed", doc_id=ctx.doc_id, error=f"{type(exc).__name__}: {exc}")
            return
        ctx.close()
        self.contexts[ctx.doc_id] = fresh
        log.info("context.rebuilt", doc_id=ctx.doc_id, entries=len(fresh.entries))
        for st in self.peers.values():
            if st.session is not None and st.session.is_open and st.config.shares(ctx.doc_id):
                st.session.send_step1(ctx.doc_id, fresh.doc.get_state(), fresh.lineage)

    # -- persistence -----------------------------------------------------------------

    def _persist_nowait(self, p: _Pending) -> asyncio.Future[StoreError | None]:
        """
        Queue an update for the store, in the order versions are made: call it where the
        version is made (right after :meth:`_committed`). It is handed to the store at the next
        event loop turn (:meth:`_hand_to_store`), after the callbacks already scheduled; if the
        store fails, it is kept and retried until it works (:meth:`_retain`).

        Why later: handing a job to the store wakes its thread, which then competes with the
        event loop for the GIL. Scheduled after the watchers' tasks and the session writers that
        the update woke, their events and frames leave first. Measured on the 2-core test
        machine, 1,000 sequential writes between two daemons: convergence p50 1.58 ms to 1.48 ms
        (median of six runs each, alternated).

        Returns:
            A future of None once the update is committed, or of the error if it was not: the
            store's (the update is then kept for a retry), or a :class:`StoreError` if the
            context's lineage was adopted away before the update reached the store (it is
            dropped with that lineage). Nobody needs to await it; cancelling it changes nothing.
        """
        done: asyncio.Future[StoreError | None] = asyncio.get_running_loop().create_future()
        self._to_persist.append((p, done))
        if len(self._to_persist) == 1:
            asyncio.get_running_loop().call_soon(self._hand_to_store)
        return done

    def _hand_to_store(self) -> None:
        """
        Queue the updates :meth:`_persist_nowait` holds, oldest first. Whatever must come after
        them in the store (a lineage reset, a rebuild's read, the store's close) calls this first.
        """
        pending, self._to_persist = self._to_persist, []
        for p, done in pending:
            if p.lineage != self._lineage_of(p.doc_id):  # adopted away meanwhile: dropped with its lineage
                log.debug("store.update_dropped", doc_id=p.doc_id, version=p.version, reason="lineage adopted away")
                self._note_history_gap(p.doc_id, max(p.version, p.missed_through))  # its records go with it
                _settle_stored(done, StoreError(f"context {p.doc_id!r} was adopted from a peer before version {p.version} was stored; it was dropped with the old lineage"))
                continue
            self._take_history_gap(p)
            try:
                fut = self.store.append_nowait(
                    p.doc_id, p.version, p.update, lineage=p.lineage, history=p.history, missed_through=p.missed_through
                )
            except (StoreError, InvalidState) as exc:  # InvalidState: the store is closing
                self._retain(p, exc)
                _settle_stored(done, _retried(exc))
                continue
            except Exception as exc:  # a bug; the peers hold the update if it is theirs, so a restart's sync brings it back
                log.exception("store.hand_off_failed", doc_id=p.doc_id, version=p.version)
                self._incomplete.add(p.doc_id)  # the store lacks it: the context must not be unloaded
                self._note_history_gap(p.doc_id, max(p.version, p.missed_through))
                _settle_stored(done, StoreError(f"it could not be queued for the store ({type(exc).__name__}: {exc}); it stays in memory only, until a restart"))
                continue
            fut.add_done_callback(functools.partial(self._on_persisted, p, done))

    def _on_persisted(self, p: _Pending, done: asyncio.Future[StoreError | None], fut: asyncio.Future[None]) -> None:
        if fut.cancelled():  # not committed, nor kept for a retry: the store may lack it
            self._incomplete.add(p.doc_id)  # so the context is never unloaded (its record would claim it)
            done.cancel()
            return
        exc = fut.exception()
        if exc is None:
            self._durable(p)
            _settle_stored(done, None)
            return
        self._retain(p, exc)
        _settle_stored(done, _retried(exc))

    def _retain(self, p: _Pending, exc: BaseException | None) -> None:
        if self._unpersisted_bytes + len(p.update) > MAX_UNPERSISTED_BYTES and not p.local:
            # Still safe: peers hold it, and sync step 1/2 brings it back after a restart.
            log.error("store.retention_full", doc_id=p.doc_id, version=p.version, retained_bytes=self._unpersisted_bytes)
            self._incomplete.add(p.doc_id)  # the store lacks it: the context must not be unloaded
            self._note_history_gap(p.doc_id, max(p.version, p.missed_through))
        else:
            self._unpersisted.append(p)
            self._unpersisted_bytes += len(p.update)
        if self.store_failing is None:
            self.store_failing = str(exc)
            log.error("store.append_failed", doc_id=p.doc_id, version=p.version, error=str(exc))
            self._spawn(self._retry_persist(), "store-retry")

    async def _retry_persist(self) -> None:
        delay = 0.5
        while (self._unpersisted or self._history_gaps) and not self._stopping:
            await asyncio.sleep(delay)
            try:
                flushed = await self._store_retained()
            except Exception as exc:
                self.store_failing = str(exc)
                log.debug("store.retry_failed", error=str(exc), retained=len(self._unpersisted))
                delay = min(delay * 2, 10.0)
                continue
            if not self._unpersisted:
                log.info("store.recovered", flushed=flushed)
        self.store_failing = None

    async def _store_retained(self) -> int:
        """
        Store every retained update in one go and forget them.

        Returns:
            How many were stored. Raises the store's error, keeping them all, if it fails.
        """
        self._hand_to_store()
        pending = list(self._unpersisted)
        # Queued here, in this call, not by tasks a turn later: an adopt's reset queued in
        # between would come first, and an update of the old lineage would land in the new one.
        kept = [p for p in pending if p.lineage == self._lineage_of(p.doc_id)]  # the others: dropped with their lineage
        for p in pending:
            if p.lineage != self._lineage_of(p.doc_id):  # its records (and any gap it carried) go with it
                self._note_history_gap(p.doc_id, max(p.version, p.missed_through))
        for p in kept:
            self._take_history_gap(p)
        commits = [
            self.store.append_nowait(p.doc_id, p.version, p.update, lineage=p.lineage, history=p.history, missed_through=p.missed_through)
            for p in kept
        ]
        await asyncio.gather(*commits)
        del self._unpersisted[: len(pending)]
        self._unpersisted_bytes = sum(len(p.update) for p in self._unpersisted)
        for p in kept:
            self._durable(p)
        await self._mark_history_gaps()  # no update carried them: on their own
        return len(pending)

    def _note_history_gap(self, doc_id: DocId, version: int) -> None:
        """
        Remember that the store will never get the history records of ``version`` (its update
        was dropped), until the store has moved the context's ``history_from`` past it: with the
        next update of the context handed to it (``missed_through``), or on its own
        (:meth:`_flush_history_gaps`, or the retry loop while the store fails). Until then
        :meth:`unstored_from` holds readers (``changes``, webhooks) before it; after, a reader
        from before is told it missed changes instead of passing the version without a word.
        Noticed late, when a later version was already handed to the store, this still holds:
        that version's commit reaches readers only after this call (the store reports its
        batches in order). Lost at a stop, which loses nothing more: the restart's sync brings
        the dropped content back as new versions, with their records.
        """
        self._history_gaps[doc_id] = max(self._history_gaps.get(doc_id, 0), version)
        # Committed on its own soon, unless an update carries it first; while the store fails,
        # the retry loop does it. Until then, unstored_from() holds readers before it.
        if self.store_failing is None and not self._stopping and (self._gap_flush is None or self._gap_flush.done()):
            self._gap_flush = self._spawn(self._flush_history_gaps(), "store-gaps")

    def _take_history_gap(self, p: _Pending) -> None:
        """Put the context's pending history gap on ``p``, an update on its way to the store (kept on it if ``p`` is retried)."""
        gap = self._history_gaps.get(p.doc_id, 0)
        if gap > p.missed_through:
            p.missed_through = gap

    def _gap_committed(self, doc_id: DocId, version: int) -> None:
        """The store has moved ``history_from`` past ``version``: forget the gaps it covers."""
        if 0 < self._history_gaps.get(doc_id, 0) <= version:
            del self._history_gaps[doc_id]

    async def _mark_history_gaps(self) -> None:
        """
        Commit the pending history gaps on their own (:meth:`Store.mark_history_gap`), for
        contexts no update came to carry them. Raises the store's error, keeping the rest.
        """
        while self._history_gaps:
            doc_id, version = next(iter(self._history_gaps.items()))
            await self.store.mark_history_gap(doc_id, version, lineage=self._lineage_of(doc_id) or LEGACY_LINEAGE)
            self._gap_committed(doc_id, version)  # a later gap noted meanwhile stays, and goes round again

    async def _flush_history_gaps(self) -> None:
        """:meth:`_mark_history_gaps` soon after a gap is noted; a failing store leaves them to the retry loop."""
        try:
            await self._mark_history_gaps()
        except (StoreError, InvalidState) as exc:
            doc_id, version = next(iter(self._history_gaps.items()), (None, None))  # the one that failed, if still pending
            log.debug("store.gap_mark_failed", doc_id=doc_id, version=version, error=str(exc))
            if self.store_failing is None and not self._stopping:
                self.store_failing = str(exc)
                self._spawn(self._retry_persist(), "store-retry")

    def unstored_from(self, doc_id: DocId) -> int | None:
        """
        The lowest version of ``doc_id`` whose commit failed and that is kept for a retry, or
        that was dropped and not yet marked missed in the store (:meth:`_note_history_gap`);
        None if none.

        Readers of the history (``changes``, webhooks) must not move a cursor past it: the store
        may already hold later versions, and once this one is stored it would land behind the
        cursor, never read.
        """
        floors = [p.version for p in self._unpersisted if p.doc_id == doc_id]
        gap = self._history_gaps.get(doc_id)
        if gap:  # a version the store will never get: not passed until the store has marked it missed
            floors.append(gap)
        return min(floors, default=None)

    async def flush_unpersisted(self) -> bool:
        """Try once to store what a failing store refused (at shutdown); return whether all is stored."""
        self._hand_to_store()
        if not self._unpersisted:
            return True
        try:
            await self._store_retained()
        except Exception as exc:
            log.error("store.unflushed", retained=len(self._unpersisted), error=str(exc))
            return False
        return True

    # -- contexts and local writes ---------------------------------------------------

    def _context(self, doc_id: DocId, *, create: bool, lineage: str | None = None, announce: bool = True) -> Context:
        """
        Return a context; with ``create``, make it if missing, with ``lineage`` (a peer's, when
        its sync step 1 brings the context here) or a new one (created here). Without
        ``announce`` the peers are not told yet (call :meth:`_announce` once it has content).

        Raises:
            NotFound: It is missing and ``create`` is false.
            EntryError: The name is not a valid context name.
            ContextLoadFailed: It was unloaded and cannot be read back (:meth:`_load_parked`).
        """
        ctx = self._loaded(doc_id)
        if ctx is None:
            if not create:
                raise NotFound(f"no context {doc_id!r}")
            if not is_valid_doc_id(doc_id):
                raise EntryError(f"invalid context name {doc_id!r}: use 1-128 of A-Z a-z 0-9 . _ - :")
            ctx = self.contexts[doc_id] = Context(doc_id, self.node_id, self.clock, lineage=lineage or new_lineage())
            ctx.lineage_settled = lineage is not None  # a peer's lineage is kept; a new one may yield
            log.info("context.created", doc_id=doc_id, lineage=ctx.lineage, origin="peer" if lineage else "local")
            if announce:
                self._announce(ctx)
        return ctx

    def _announce(self, ctx: Context) -> None:
        """Send sync step 1 (which names the lineage) to each open session sharing the context, before any content."""
        ctx.unborn = False
        for st in self.peers.values():
            if st.session is not None and st.session.is_open and st.config.shares(ctx.doc_id):
                st.session.send_step1(ctx.doc_id, ctx.doc.get_state(), ctx.lineage)

    def _committed(
        self,
        ctx: Context,
        update: bytes,
        *,
        exclude: NodeId | None,
        origin: str,
        tag: object = None,
        origin_ms: int = 0,
    ) -> _Pending:
        """
        Count a new version, record its history, tell watchers and raw-update subscribers, and
        send ``update`` to the peers sharing the context (at once: before it is stored).

        Args:
            origin: Who applied it here: a peer's node id, or this node's for local writes.
            tag: Passed to raw-update subscribers (a Yjs connection skips its own updates).
            origin_ms: When the update was committed where it was made (Unix ms; 0 if unknown),
                passed on with it (replication lag).

        Returns:
            What to hand to the store: the update with its history records.
        """
        ctx.version += 1
        now_ms = time.time_ns() // 1_000_000
        changes = ctx.entries.pop_changes()
        limit = self.config.contexts.history_limit
        first = max(0, len(changes) - limit)  # older records of one huge version would be dropped anyway
        history: list[tuple[int, dict[str, Any]]] = []
        subs = self._subs
        for idx, ch in enumerate(changes):
            writer = ch.writer or origin
            if subs:
                change = Change(ctx.doc_id, ch.key, ch.value, writer, ctx.version, ch.previous, ch.t)
                for sub in subs:
                    sub.offer(change)
            if idx >= first:
                history.append(
                    (idx, {"t_ms": now_ms, "origin": writer, "key": ch.key, "value": ch.value,
                           "previous": ch.previous, "hlc": ch.t})
                )  # fmt: skip
        for key in ctx.entries.pop_new_conflicts():
            entry = ctx.entries.get(key)
            log.warning(
                "context.conflict",
                doc_id=ctx.doc_id,
                key=key,
                writers=[entry.writer, *(s.writer for s in entry.conflicts)] if entry else [],
                version=ctx.version,
            )
        for fn in list(self._update_subs.get(ctx.doc_id, {}).values()):
            fn(update, tag)
        for hook in self.on_version:
            hook(ctx)
        self._send(ctx.doc_id, update, exclude=exclude, origin_ms=origin_ms)
        return _Pending(ctx.doc_id, ctx.version, update, ctx.lineage, history, local=origin == self.node_id)

    def _send(self, doc_id: DocId, update: bytes, *, exclude: NodeId | None, origin_ms: int = 0) -> None:
        """Queue ``update`` for every open session sharing ``doc_id`` (and its lineage), except ``exclude``'s."""
        lineage = self._lineage_of(doc_id)
        for pid, st in self.peers.items():
            if pid == exclude or st.session is None or not st.session.is_open:
                continue
            if st.config.shares(doc_id) and (lineage is None or st.remote_lineage.get(doc_id, lineage) == lineage):
                st.session.send_update(doc_id, update, origin_ms)
                self.updates_sent += 1

    async def write(self, doc_id: DocId, items: list[tuple[str, str | None]]) -> tuple[int, int]:
        """
        Set (value JSON text) or delete (None) entries of a context in one transaction.

        Returns once the change is committed to the store. Arguments, result and errors as
        :meth:`submit_write`.
        """
        return await self.submit_write(doc_id, items)

    def submit_write(self, doc_id: DocId, items: list[tuple[str, str | None]]) -> asyncio.Future[tuple[int, int]]:
        """
        Queue a write for the context's next group commit (see :meth:`_commit_writes`) and
        return a future of its outcome, without a task of its own per write.

        The write's items are applied together, in order, in one transaction; writes queued
        in the same event loop turn share that transaction and its version.

        Args:
            doc_id: The context; created on first write.
            items: ``(key, value_json_or_None)`` pairs, applied in order.

        Returns:
            A future of ``(version, changed)``: the context's version after the write, and how
            many entries the write changed (0 when it was a no-op, e.g. deleting absent keys).
            It completes once the change is committed to the store; cancelling it before its
            round starts withdraws the write.

        Raises:
            EntryError: A bad context name, key, or a value over ``max_value_bytes`` (raised
                here, before anything is queued).
            StoreError: The store is failing or the context is being rebuilt (raised here);
                the store could not commit (set on the future: nothing was acknowledged).
        """
        limit = self.config.sync.max_value_bytes
        for key, value in items:
            validate_key(key)
            if value is not None and len(value.encode()) > limit:
                raise EntryError(f"value of {key!r} is {len(value.encode())} bytes; the limit is {limit}")
        if self.store_failing is not None:
            raise StoreError(
                f"the store is failing ({self.store_failing}); writes are refused until it recovers (reads still work)"
            )
        is_new = not self.has_context(doc_id)
        ctx = self._context(doc_id, create=True, announce=False)
        if is_new:
            ctx.unborn = True
        if ctx.rebuilding:
            raise StoreError(f"context {doc_id!r} is being rebuilt from the store; retry in a moment")
        write = _Write(items, asyncio.get_running_loop().create_future())
        if ctx.write_task is not None:  # a round is committing: join the next one
            ctx.queued_writes.append(write)
            return write.future
        # Idle: apply it now, in this call (no wait, and nothing can come in between the
        # caller's request and its transaction), then store it on a round of its own.
        pending = self._apply_writes(ctx, [write])
        if pending is not None:
            task = ctx.write_task = self._spawn(self._commit_writes(ctx, [write], pending), f"write-{doc_id}")
            task.add_done_callback(functools.partial(self._write_task_done, ctx, write))
        return write.future

    def _write_task_done(self, ctx: Context, first: _Write, task: asyncio.Task[None]) -> None:
        """
        A commit task cancelled before its first step (a stop in the same loop turn as the
        write) ran none of its own clean-up: answer its writes, so that no caller waits forever.
        """
        if not task.cancelled() or ctx.write_task is not task:
            return  # it ran: its except and finally clauses did this
        ctx.write_task = None
        for ws, why in (([first], _STOPPED_APPLIED), (ctx.queued_writes, _STOPPED_QUEUED)):
            for w in ws:
                if not w.future.done():
                    w.future.set_exception(StoreError(why))
        ctx.queued_writes.clear()

    async def _commit_writes(self, ctx: Context, first: list[_Write], pending: _Stored | None) -> None:
        """
        Group commit of local writes. Each round stores one version and sends it once durable;
        the writes submitted while a round commits are applied together, in one transaction,
        as the next round: under load the rounds grow with the queue (one pycrdt transaction,
        one update on the wire and one store row per round instead of per request), and a
        lone write waits for nothing.
        """
        batch = first
        try:
            await self._finish_writes(batch, pending)
            while ctx.queued_writes:
                batch, ctx.queued_writes = [w for w in ctx.queued_writes if not w.future.done()], []
                await self._finish_writes(batch, self._apply_writes(ctx, batch))
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):  # the daemon is stopping
                applied, queued = _STOPPED_APPLIED, _STOPPED_QUEUED
            else:
                log.exception("write.failed", doc_id=ctx.doc_id)
                applied = queued = f"write not acknowledged: {type(exc).__name__}: {exc}"
            for ws, why in ((batch, applied), (ctx.queued_writes, queued)):
                for w in ws:
                    if not w.future.done():
                        w.future.set_exception(StoreError(why))
            ctx.queued_writes.clear()
            _reraise_fatal(exc)
        finally:
            ctx.write_task = None

    def _apply_writes(self, ctx: Context, batch: list[_Write]) -> _Stored | None:
        """
        Apply ``batch`` in one transaction, count it as a version (:meth:`_committed`) and queue
        it for the store (:meth:`_persist_nowait`, at once: the store gets versions in order).

        Returns:
            The version made and the future of its commit, or None when nothing changed. A
            write that fails (a refused context, an invalid item) gets its error on its future
            and changes nothing.
        """
        refusal = None
        if self.store_failing is not None:
            refusal = f"the store is failing ({self.store_failing}); writes are refused until it recovers (reads still work)"
        elif ctx.rebuilding or self.contexts.get(ctx.doc_id) is not ctx:
            refusal = f"context {ctx.doc_id!r} is being rebuilt from the store; retry in a moment"
        if refusal is not None:
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(StoreError(refusal))
            return None
        with ctx.entries.transaction(origin="local"):
            for w in batch:
                try:
                    w.changed = ctx.entries.set_many(w.items)  # checks everything before it writes
                except EntryError as exc:
                    w.future.set_exception(exc)
        update = ctx.take_update()
        if update is None:
            if ctx.unborn and not ctx.queued_writes:  # nothing written: the context never came to be
                ctx.close()
                del self.contexts[ctx.doc_id]
                log.info("context.discarded", doc_id=ctx.doc_id, reason="the first write changed nothing")
            for w in batch:
                if not w.future.done():
                    w.future.set_result((ctx.version, 0))
            return None
        if ctx.unborn:
            self._announce(ctx)  # before the update leaves: the step 1 names the lineage
        # Watchers here and peers see the change at once, while the store commits it (the
        # caller's answer waits for the commit). If a crash loses it here, a peer may still
        # hold it and send it back: EntryMap.take_reasserts() puts back any later own write
        # it displaces (a new Yjs client id after the restart would lose the tie-break).
        made = self._committed(ctx, update, exclude=None, origin=self.node_id, origin_ms=_now_ms())
        return made, self._persist_nowait(made)

    async def _finish_writes(self, batch: list[_Write], stored: _Stored | None) -> None:
        """Wait until the version ``batch`` made (already sent to peers) is stored, and answer each write."""
        if stored is None:
            return
        pending, committed = stored
        failed = await committed
        for w in batch:
            if w.future.done():
                continue
            if failed is not None:
                w.future.set_exception(StoreError(f"write not acknowledged: {failed}"))
            else:
                w.future.set_result((pending.version, w.changed))

    async def adopt(self, doc_id: DocId, peer_id: NodeId) -> dict[str, Any]:
        """
        Settle a lineage mismatch by taking the peer's lineage of a context (``ctxsync context
        adopt``): this node's own content of the context is dropped (take a snapshot first), the
        context restarts empty under the peer's lineage and is synced from every peer that has
        that lineage. Versions, history and snapshots stay.

        Returns:
            ``{"context", "lineage", "from", "dropped_entries"}``.

        Raises:
            NotFound: ``peer_id`` is not a paired peer.
            EntryError: The peer has not announced the context (connect first), or the
                lineages already match.
            ContextRebuilding: The context is being rebuilt from the store (retry).
            StoreError: The store could not commit the reset (nothing changed).

        While the store resets the context, writes to it and peers' updates of it are refused
        or dropped, and updates of it kept for a retry after a store failure are dropped with
        the old lineage: none of them may land among the adopted lineage's rows.
        """
        st = self.peers.get(peer_id)
        if st is None:
            raise NotFound(f"no paired peer {peer_id!r}")
        lineage = st.remote_lineage.get(doc_id)
        if lineage is None:
            raise EntryError(
                f"{st.config.name} has not announced context {doc_id!r} yet; connect to it first (ctxsync status)"
            )
        if self._lineage_of(doc_id) == lineage:
            raise EntryError(f"context {doc_id!r} already has {st.config.name}'s lineage: nothing to adopt")
        current, resting = self.contexts.get(doc_id), self.parked.get(doc_id)
        if current is not None and current.rebuilding:
            raise ContextRebuilding(f"context {doc_id!r} is being rebuilt from the store; retry in a moment")
        # While the store resets it, nothing may reach the old lineage: a write or a peer's
        # update stored after the reset would land among the adopted lineage's rows.
        if current is not None:
            current.rebuilding = True
        if resting is not None:
            resting.failed_at, resting.failure = time.monotonic(), f"context {doc_id!r} is being adopted; retry in a moment"
        version = self.version_of(doc_id)
        self._hand_to_store()  # the old lineage's updates go before the reset, which deletes them
        try:
            await self.store.reset_context(doc_id, lineage, version)
        except BaseException:
            if current is not None:
                current.rebuilding = False
            if resting is not None:
                resting.failed_at = 0.0
            raise
        self._stored_version[doc_id] = max(self._stored_version.get(doc_id, 0), version)
        # The await let other work run: read the context as it is now (loaded or not; it is
        # replaced, so an unloaded one is not loaded back).
        old, parked = self.contexts.pop(doc_id, None), self.parked.pop(doc_id, None)
        if old is not None:
            dropped, version, old_lineage = len(old.entries), old.version, old.lineage
            old.close()
        elif parked is not None:
            dropped, version, old_lineage = int(parked.summary["entries"]), parked.version, parked.lineage
        else:
            dropped, old_lineage = 0, None
        fresh = Context(doc_id, self.node_id, self.clock, version=version, lineage=lineage)
        fresh.lineage_settled = True
        self.contexts[doc_id] = fresh
        log.warning(
            "context.adopted", doc_id=doc_id, peer_id=peer_id, lineage=lineage, dropped_entries=dropped,
            old_lineage=old_lineage,
        )  # fmt: skip
        for other in self.peers.values():
            s = other.session
            if s is not None and s.is_open and other.config.shares(doc_id):
                s.lineage_reported.pop(doc_id, None)
                s.send_step1(doc_id, fresh.doc.get_state(), lineage)
        return {"context": doc_id, "lineage": lineage, "from": peer_id, "dropped_entries": dropped}

    def lineage_mismatches(self) -> list[dict[str, Any]]:
        """Every (peer, context) whose lineages differ: ``{"context", "peer_id", "peer_name", "lineage", "peer_lineage"}``."""
        found = []
        for pid, st in self.peers.items():
            for doc_id, theirs in sorted(st.remote_lineage.items()):
                ours = self._lineage_of(doc_id)
                if ours is not None and theirs != ours and st.config.shares(doc_id):
                    found.append(
                        {"context": doc_id, "peer_id": pid, "peer_name": st.config.name,
                         "lineage": ours, "peer_lineage": theirs}
                    )  # fmt: skip
        return found

    # -- unloading idle contexts ---------------------------------------------------------

    def has_context(self, doc_id: DocId) -> bool:
        """Whether this node holds the context, loaded or not."""
        return doc_id in self.contexts or doc_id in self.parked

    def context_ids(self) -> list[DocId]:
        """Every context this node holds, loaded or not, sorted."""
        return sorted(self.contexts.keys() | self.parked.keys())

    def version_of(self, doc_id: DocId) -> int:
        """A context's local version (0 if this node does not hold it), without loading it."""
        ctx = self.contexts.get(doc_id)
        if ctx is not None:
            return ctx.version
        parked = self.parked.get(doc_id)
        return parked.version if parked is not None else 0

    def strategy_of(self, doc_id: DocId) -> dict[str, Any] | None:
        """A context's conflict strategy as JSON (``Strategy.to_json``), without loading it; None if not held."""
        ctx = self.contexts.get(doc_id)
        if ctx is not None:
            return ctx.entries.strategy.to_json()
        parked = self.parked.get(doc_id)
        return dict(parked.summary["strategy"]) if parked is not None else None

    def entry_count(self) -> int:
        """Live entries of every context, loaded or not."""
        return sum(len(c.entries) for c in self.contexts.values()) + sum(int(p.summary["entries"]) for p in self.parked.values())

    def context(self, doc_id: DocId) -> Context | None:
        """
        A context, loaded back into memory if it was unloaded; None if this node does not hold it.

        Raises:
            ContextLoadFailed: It was unloaded and cannot be read back (:meth:`_load_parked`).
        """
        return self._loaded(doc_id)

    def _lineage_of(self, doc_id: DocId) -> str | None:
        ctx = self.contexts.get(doc_id)
        if ctx is not None:
            return ctx.lineage
        parked = self.parked.get(doc_id)
        return parked.lineage if parked is not None else None

    def _loaded(self, doc_id: DocId) -> Context | None:
        """The context, loaded back if unloaded, marked as used now; None if not held. Raises ContextLoadFailed."""
        ctx = self.contexts.get(doc_id)
        if ctx is None:
            if doc_id not in self.parked:
                return None
            ctx = self._load_parked(doc_id)
        ctx.used_at = time.monotonic()
        return ctx

    def unload_idle(self, idle_s: float) -> list[DocId]:
        """
        :meth:`unload` every context not read, written or synced here for ``idle_s`` seconds.

        Returns:
            The contexts unloaded.
        """
        now = time.monotonic()
        return [d for d, ctx in list(self.contexts.items()) if now - ctx.used_at >= idle_s and self.unload(d)]

    def unload_all(self, budget_s: float = UNLOAD_AT_STOP_BUDGET_S) -> list[asyncio.Future[None]]:
        """
        At a clean stop (after :meth:`stop` and :meth:`flush_unpersisted`): :meth:`unload` every
        context that can be, so that each leaves its record in the store and the next start
        takes it from there instead of rebuilding it from its rows. Stops after ``budget_s``
        seconds (the rest are rebuilt at the next start, as after a crash); the records are
        committed when the store closes.

        Returns:
            The store's future of each record queued: done, without an exception, once committed.
        """
        deadline = time.monotonic() + budget_s
        records: list[asyncio.Future[None]] = []
        for doc_id in list(self.contexts):
            if time.monotonic() >= deadline:
                break
            try:
                self.unload(doc_id, records=records)
            except BaseException as exc:  # a pycrdt panic: that context is rebuilt at the next start
                _reraise_fatal(exc)
                log.error("context.unload_failed", doc_id=doc_id, error=f"{type(exc).__name__}: {exc}")
        return records

    def unload(self, doc_id: DocId, *, records: list[asyncio.Future[None]] | None = None) -> bool:
        """
        Drop a loaded context's document and entry index from memory, keeping a :class:`Parked`
        record (its lineage, version, state vector, delete set and status figures). The store
        holds the rest; every path that needs the document loads it back first
        (:meth:`_load_parked`), and a peer's sync step 1 that shows it lacks nothing is answered
        from the record alone, so reconnects do not load every context.

        A context is kept loaded (and False returned) while: it is not loaded; it is unchanged
        here (version 0: it may still take a peer's lineage); it is being rebuilt; local
        writes are queued or committing; a version is not yet committed to the store (or is
        held for a retry after a store failure); a Yjs client is connected to it (raw update
        subscribers); or its store rows hold more than :data:`UNLOAD_MAX_STORED_BYTES`.

        Args:
            records: If given, the store's future of the record (committed later, by the
                store's thread) is appended to it; nothing is when the store refused it at once.

        Returns:
            Whether it was unloaded.
        """
        ctx = self.contexts.get(doc_id)
        if (
            ctx is None
            or ctx.version == 0
            or ctx.rebuilding
            or ctx.unborn
            or ctx.queued_writes
            or ctx.write_task is not None
            or doc_id in self._update_subs
            or self._stored_version.get(doc_id, 0) < ctx.version
            or doc_id in self._incomplete
            or any(p.doc_id == doc_id for p in self._unpersisted)
            or self.store.stored_bytes(doc_id) > UNLOAD_MAX_STORED_BYTES
        ):
            return False
        state = ctx.doc.get_state()
        delete_set = ctx.doc.get_update(state)
        self.parked[doc_id] = Parked(
            ctx.lineage, ctx.version, ctx.snapshot_at, state, decode_state_vector(state), delete_set, _summary(ctx),
            ctx.doc.client_id,
        )  # fmt: skip
        ctx.close()
        del self.contexts[doc_id]
        self.unloads += 1
        record = {
            "state_vector": _b64(state), "delete_set": _b64(delete_set), "summary": self.parked[doc_id].summary,
            "hlc": self.clock.latest,  # >= every timestamp in the context: a start that takes the record feeds its clock
        }  # fmt: skip
        try:  # so that the next start need not rebuild it (see Store.heads)
            written = self.store.put_record(doc_id, self.parked[doc_id].version, self.parked[doc_id].lineage, record)
            written.add_done_callback(functools.partial(_record_written, doc_id))
            if records is not None:
                records.append(written)
        except CtxSyncError as exc:  # the store is closing, or cannot seal: only the next start is slower
            log.debug("context.record_failed", doc_id=doc_id, error=str(exc))
        return True

    def _load_parked(self, doc_id: DocId) -> Context:
        """
        Load an unloaded context back from the store, on the event loop (:meth:`Store.load_now`),
        and check that the store holds every struct the context had when it was unloaded. If it
        does not (rows lost from outside), what it holds is taken under a new Yjs client id,
        the context stays loaded, and its peers are asked for the rest (``context.load_incomplete``).

        Raises:
            ContextLoadFailed: The read failed, the store lacks the context, holds it under
                another lineage, or holds an update that cannot be applied; the context stays
                unloaded. Logged as ``context.load_failed``.
        """
        parked = self.parked[doc_id]
        if parked.failed_at and time.monotonic() - parked.failed_at < LOAD_RETRY_S:
            raise ContextLoadFailed(parked.failure)  # logged when it failed; not read again yet
        started = time.perf_counter()
        try:
            stored = self.store.load_now(doc_id)
            if stored is None or stored.lineage != parked.lineage:
                found = "nothing" if stored is None else f"lineage {stored.lineage}"
                raise StoreCorrupt(f"{self.store.path}: context {doc_id!r} was unloaded with lineage {parked.lineage}, the store holds {found}")
            # The same client id: the check below makes sure the store holds every struct made
            # under it, so new ones cannot clash with any that exist.
            ctx = self._context_from(stored, parked, parked.client_id)
            have = decode_state_vector(ctx.doc.get_state())
            missing = sum(1 for client, clock in parked.clocks.items() if have.get(client, 0) < clock)
            if missing:  # see below: again, under a new client id
                ctx.close()
                ctx = self._context_from(stored, parked, None)
        except (StoreError, InvalidState) as exc:  # InvalidState: the store is closing (a late request at a stop)
            log.error("context.load_failed", doc_id=doc_id, error=str(exc), retry_in_s=LOAD_RETRY_S)
            parked.failed_at = time.monotonic()
            parked.failure = f"context {doc_id!r} cannot be loaded back from the store: {exc}"
            raise ContextLoadFailed(parked.failure) from exc
        if missing:
            # The store lost part of the context (rows deleted or replaced from outside). Take
            # what it holds, under a new client id (this node's old one may have structs that
            # peers hold and the store lost), keep it loaded for the rest of the run, and ask
            # every peer for the rest.
            self._incomplete.add(doc_id)
            log.error(
                "context.load_incomplete", doc_id=doc_id, clients_behind=missing,
                hint="the store lost part of this context; the peers' sync brings back what they hold",
            )  # fmt: skip
        ctx.snapshot_at = parked.snapshot_at
        del self.parked[doc_id]
        self.contexts[doc_id] = ctx
        self.loads += 1
        log.debug("context.loaded", doc_id=doc_id, version=ctx.version, took_ms=round((time.perf_counter() - started) * 1000, 3))
        if missing:
            for st in self.peers.values():
                if st.session is not None and st.session.is_open and st.config.shares(doc_id):
                    st.session.send_step1(doc_id, ctx.doc.get_state(), ctx.lineage)
        return ctx

    def _context_from(self, stored: StoredContext, parked: Parked, client_id: int | None) -> Context:
        """Rebuild an unloaded context from its stored rows. Raises StoreCorrupt if an update cannot be applied."""
        ctx = Context(stored.doc_id, self.node_id, self.clock, version=parked.version, lineage=parked.lineage, client_id=client_id)
        try:
            ctx.load(stored.updates)
        except BaseException as exc:
            _reraise_fatal(exc)
            ctx.close()
            raise StoreCorrupt(
                f"{self.store.path}: context {stored.doc_id!r}: a stored update cannot be applied ({type(exc).__name__}: {exc})"
            ) from None
        return ctx

    # -- raw Yjs access (the /yjs endpoint) ----------------------------------------------

    def open_context(self, doc_id: DocId) -> pycrdt.Doc[Any]:
        """
        Return a context's document, creating the context (empty, new lineage) if missing.

        The document is for reading only (``get_state``, ``get_update``): change it through
        :meth:`apply_client_update` or :meth:`write`.

        Raises:
            EntryError: ``doc_id`` is not a valid context name.
        """
        return self._context(doc_id, create=True).doc

    def subscribe_updates(self, doc_id: DocId, fn: Callable[[bytes, object], None]) -> int:
        """
        Call ``fn(update, tag)`` with every update that changes ``doc_id`` from now on (local
        writes, peers' updates, Yjs clients'), on the event loop, right after it is applied.
        ``tag`` is what :meth:`apply_client_update` was given, else ``None``. ``fn`` must not
        block or raise.

        Returns:
            A handle for :meth:`unsubscribe_updates`.
        """
        handle = id(fn) ^ secrets.randbits(48)
        self._update_subs.setdefault(doc_id, {})[handle] = fn
        return handle

    def unsubscribe_updates(self, doc_id: DocId, handle: int) -> None:
        """Stop a :meth:`subscribe_updates` subscription (no error if already stopped)."""
        subs = self._update_subs.get(doc_id)
        if subs is not None:
            subs.pop(handle, None)
            if not subs:
                del self._update_subs[doc_id]

    async def apply_client_update(self, doc_id: DocId, update: bytes, *, tag: object = None) -> int:
        """
        Apply a Yjs v1 update from a local Yjs client (the /yjs endpoint) as a local change:
        checked like a peer's update (the entries root may hold only well-formed entries;
        other root types are free), applied, stored, then sent to the peers.

        Args:
            tag: Given back to :meth:`subscribe_updates` callbacks, so a client can skip its own echo.

        Returns:
            The context's version after it (unchanged if the update brought nothing new).

        Raises:
            UpdateNotReady: It builds on structs this node lacks (send the client a step 1).
            ContextRebuilding: The context is being rebuilt from the store (retry).
            EntryError: The update is malformed or too large, or misuses the entries root.
            StoreError: The store is failing (nothing applied), or could not commit it (it is
                kept and retried).
        """
        if self.store_failing is not None:
            raise StoreError(f"the store is failing ({self.store_failing}); updates are refused until it recovers")
        ctx = self._context(doc_id, create=True)
        if ctx.rebuilding:
            raise ContextRebuilding(f"context {doc_id!r} is being rebuilt from the store; retry in a moment")
        try:
            summary = _check_ready(ctx, update, self.config.sync.max_message_bytes)
        except MissingDependencies:
            raise UpdateNotReady("the update builds on changes this node does not have; sync step 1 first") from None
        except InvalidUpdate as exc:
            raise EntryError(f"update refused: {exc.reason}") from None
        try:
            new = self._apply_checked(ctx, update, "yjs", summary)
        except _ApplyFailed as exc:
            raise EntryError(f"update refused: {exc}") from None
        if new is None:
            return ctx.version
        pending = self._committed(ctx, new, exclude=None, origin=self.node_id, tag=tag, origin_ms=_now_ms())
        failed = await self._persist_nowait(pending)
        if failed is not None:
            raise StoreError(f"update not acknowledged: {failed}")
        return pending.version

    async def set_strategy(self, doc_id: DocId, strategy: Strategy) -> int:
        """
        Set a context's conflict strategy: stored in its document, so it reaches every replica
        and all resolve the same way. Returns once committed.

        Returns:
            The context's version after the change (unchanged if the strategy was already set).

        Raises:
            NotFound: No such context.
            EntryError: Unknown strategy name.
            StoreError: The store could not commit it.
        """
        ctx = self._context(doc_id, create=False)
        if ctx.rebuilding:
            raise StoreError(f"context {doc_id!r} is being rebuilt from the store; retry in a moment")
        if ctx.entries.strategy == strategy:
            return ctx.version
        with ctx.entries.transaction(origin="local"):
            ctx.entries.set_strategy(strategy)
        update = ctx.take_update()
        if update is None:
            return ctx.version
        pending = self._committed(ctx, update, exclude=None, origin=self.node_id, origin_ms=_now_ms())
        failed = await self._persist_nowait(pending)
        if failed is not None:
            raise StoreError(f"change not acknowledged: {failed}")
        log.info("context.strategy", doc_id=doc_id, strategy=strategy.name, priority=list(strategy.priority))
        return pending.version

    def get(self, doc_id: DocId, key: str) -> Entry:
        """Return the entry, or raise NotFound."""
        entry = self._context(doc_id, create=False).entries.get(key)
        if entry is None:
            raise NotFound(f"no key {key!r} in context {doc_id!r}")
        return entry

    def entries(self, doc_id: DocId, prefix: str = "") -> list[Entry]:
        """Every live entry of a context (sorted by key); raise NotFound for an unknown context."""
        return list(self._context(doc_id, create=False).entries.entries(prefix))

    def keys(self, doc_id: DocId, prefix: str = "") -> list[str]:
        """Live keys of a context, sorted; an unknown context has none. Raises ContextLoadFailed (:meth:`_load_parked`)."""
        ctx = self._loaded(doc_id)
        return ctx.entries.keys(prefix) if ctx else []

    def subscribe(
        self, context: DocId | None, prefix: str = "", *, maxsize: int = 10_000, glob: str | None = None
    ) -> _Subscription:
        """
        Start receiving :class:`Change` objects (None means the subscriber fell behind).

        Args:
            context: Only this context's changes; ``None`` for all.
            prefix: Only keys starting with it.
            glob: Only keys matching this shell pattern (``fnmatch``, case-sensitive: ``*``,
                ``?``, ``[seq]``; ``*`` also matches ``/``).
        """
        sub = _Subscription(context, prefix, maxsize, glob)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: _Subscription) -> None:
        """Stop a subscription."""
        self._subs.discard(sub)

    # -- status ----------------------------------------------------------------------

    def sample_rtt(self) -> None:
        """Record each open session's latest RTT (websockets' ``latency``, from its last pong)."""
        for st in self.peers.values():
            s = st.session
            if s is not None and s.is_open and (rtt := s.channel.rtt_s()) > 0:
                if not st.rtt_ms or st.rtt_ms[-1] != rtt * 1000:
                    st.rtt_ms.append(rtt * 1000)

    def status(self) -> dict[str, Any]:
        """
        A JSON-ready picture of this node's peers and contexts (``ctxsync status --json``).

        Per peer: connection, RTT (latest and p50/p90/p99 over the last :data:`RTT_WINDOW`
        samples, ms), traffic counters, queue depth, reconnects, protocol errors, and per shared
        context ``{"in_sync": bool, "out_of_sync_s": seconds}``. A context is in sync with a
        peer when the session is open, the peer answered this side's sync step 1 for it and
        nothing is queued for the peer. ``out_of_sync_s`` counts from the first call of this
        method that saw it out of sync (the daemon calls it every ``stats_interval_s``).
        """
        now = time.monotonic()
        peers = []
        for pid, st in sorted(self.peers.items(), key=lambda kv: kv[1].config.name):
            s = st.session
            open_ = bool(s and s.is_open)
            shared = [d for d in self.context_ids() if st.config.shares(d)]
            contexts: dict[str, Any] = {}
            for d in shared:
                theirs = st.remote_lineage.get(d)
                if theirs is not None and theirs != self._lineage_of(d):
                    since = st.out_of_sync_since.setdefault(d, now)
                    contexts[d] = {"in_sync": False, "out_of_sync_s": round(now - since, 3), "lineage_mismatch": True}
                    continue
                in_sync = bool(s and open_ and s.synced.get(d, False) and s.queued_bytes == 0)
                if in_sync:
                    st.out_of_sync_since.pop(d, None)
                    contexts[d] = {"in_sync": True, "out_of_sync_s": 0.0}
                else:
                    since = st.out_of_sync_since.setdefault(d, now)
                    contexts[d] = {"in_sync": False, "out_of_sync_s": round(now - since, 3)}
                behind = s.behind(d) if s is not None and open_ else (None, None)
                lag = st.replication_lag_ms.get(d)
                contexts[d].update(
                    updates_behind=behind[0],
                    bytes_behind=behind[1],
                    replication_lag_ms=round(lag, 3) if lag is not None else None,
                    ack_lag_ms=s.ack_lag_ms.get(d) if s is not None else None,
                )
            for d in [d for d in st.out_of_sync_since if d not in contexts]:
                del st.out_of_sync_since[d]
            p50, p90, p99 = _percentiles(st.rtt_ms, (0.5, 0.9, 0.99))
            peers.append(
                {
                    "node_id": pid,
                    "name": st.config.name,
                    "addr": format_hostport(*addr) if (addr := st.config.addr or st.discovered) else None,
                    "addr_source": "static" if st.config.addr else ("discovered" if st.discovered else None),
                    "connected": open_,
                    "rtt_ms": round(s.channel.rtt_s() * 1000, 3) if s and open_ and s.channel.rtt_s() > 0 else None,
                    "rtt_p50_ms": p50,
                    "rtt_p90_ms": p90,
                    "rtt_p99_ms": p99,
                    "sent_bytes": s.stats.sent_bytes if s else 0,
                    "received_bytes": s.stats.received_bytes if s else 0,
                    "sent_updates": s.stats.sent_updates if s else 0,
                    "received_updates": s.stats.received_updates if s else 0,
                    "queued_bytes": s.queued_bytes if s else 0,
                    "reconnects": max(st.reconnects - 1, 0),
                    "protocol_errors": st.protocol_errors,
                    "last_error": st.last_error or None,
                    "contexts": contexts,
                }
            )
        return {
            "node_id": self.node_id,
            "name": self.config.name,
            "contexts": {d: self.context_status(d) for d in self.context_ids()},
            "lineage_mismatches": self.lineage_mismatches(),
            "peers": peers,
        }


    def context_status(self, doc_id: DocId) -> dict[str, Any]:
        """A context's fields in :meth:`status` (without loading it). Raises KeyError if this node does not hold it."""
        ctx = self.contexts.get(doc_id)
        if ctx is not None:
            return _summary(ctx) | {"loaded": True}
        parked = self.parked[doc_id]
        return parked.summary | {"version": parked.version, "lineage": parked.lineage, "loaded": False}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _record_written(doc_id: DocId, fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and (exc := fut.exception()) is not None:
        log.debug("context.record_failed", doc_id=doc_id, error=str(exc))


def _parked_from_record(head: StoredHead) -> Parked | None:
    """The unloaded context an earlier run recorded (:meth:`Mesh.unload`), if its record is valid and well formed."""
    record = head.record
    if record is None:
        return None
    try:
        state = base64.b64decode(record["state_vector"], validate=True)
        delete_set = base64.b64decode(record["delete_set"], validate=True)
        clocks = decode_state_vector(state)
        summary = dict(record["summary"])
        if decode_delete_set(delete_set) is None or not all(isinstance(summary.get(k), int) for k in ("entries", "tombstones", "conflicts")):
            return None
        if not isinstance(summary.get("strategy"), dict):
            return None
    except (KeyError, TypeError, ValueError, InvalidUpdate):
        return None
    summary.update(version=head.version, lineage=head.lineage)
    return Parked(head.lineage, head.version, head.version, state, clocks, delete_set, summary, None)


def _brings_nothing(parked: Parked, updates: list[bytes]) -> bool:
    """Whether no update holds a struct or a deletion the unloaded context lacks (False if unsure)."""
    ours = None
    for update in updates:
        if update == _EMPTY_UPDATE:
            continue
        try:
            theirs = decode_delete_set(update)
            if theirs is not None and ours is None:
                ours = decode_delete_set(parked.delete_set)  # once per message, kept by nobody
        except InvalidUpdate:
            return False  # the load and the full check will refuse it
        if theirs is None or ours is None or not delete_set_covers(ours, theirs):
            return False
    return True


def _summary(ctx: Context) -> dict[str, Any]:
    """A context's entry figures for :meth:`Mesh.status`, kept in :attr:`Parked.summary` while unloaded."""
    return {
        "entries": len(ctx.entries),
        "tombstones": ctx.entries.tombstones,
        "version": ctx.version,
        "lineage": ctx.lineage,
        "strategy": ctx.entries.strategy.to_json(),
        "conflicts": len(ctx.entries.conflicts()),
    }


class _ApplyFailed(Exception):
    """pycrdt failed to apply a checked update (see :meth:`Mesh._apply_checked`)."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _percentiles(samples: Iterable[float], qs: tuple[float, ...]) -> list[float | None]:
    """Nearest-rank percentiles of ``samples`` (``None`` each when there are none), rounded to 0.001."""
    ordered = sorted(samples)
    if not ordered:
        return [None for _ in qs]
    return [round(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))], 3) for q in qs]


def _reraise_fatal(exc: BaseException) -> None:
    """Re-raise what must never be swallowed; pycrdt panics (BaseException) are not among them."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit, asyncio.CancelledError, GeneratorExit)):
        raise exc
