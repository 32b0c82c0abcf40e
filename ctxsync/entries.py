"""
The entry model: a context's key/value entries as multi-value registers in one flat root map.

A context keeps its entries in one root ``Y.Map`` named :data:`~ctxsync.types.ENTRIES_ROOT`. Each
map key is a *slot*: ``entry key + SEPARATOR + writer node id``. A slot's value is a plain dict
(never a nested shared type), ``{"v": "<JSON text>", "t": "<HLC>"}`` for a value or
``{"t": "<HLC>", "deleted": True}`` for a tombstone. Values are JSON text so that they round-trip
exactly: pycrdt turns every number into a float.

A write of key K on node N deletes, in one transaction, every slot of K that N can see and sets
N's slot. Sequential writes therefore leave one slot; concurrent writes leave one slot per writer,
since a deletion only removes what its writer had seen. Reads are a deterministic function of the
slots (:func:`resolve`: latest hybrid logical clock wins, ties broken by node id), so every node
converges to the same value; more than one slot is a *conflict*, whose losers stay readable until
the next write of K.

Remote peers may be buggy. A slot whose key does not parse, whose entry key is invalid, or whose
value is not a dict with a well-formed ``"t"`` and a string ``"v"`` (or ``"deleted": True``) is
ignored by reads, the same way on every node. It is not deleted either: writes only remove the
well-formed slots of their key.

This module is pure: it imports no asyncio, websockets, sqlite3, psutil or structlog.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Final, NamedTuple

import pycrdt

from .errors import EntryError, InvalidState
from .types import ENTRIES_ROOT, NodeId

__all__ = [
    "HLC_CHARS", "MAX_KEY_CHARS", "META_ROOT", "SEPARATOR", "STRATEGIES", "Clock", "Entry", "EntryChange",
    "EntryMap", "Slot", "Strategy",
    "format_hlc", "parse_hlc", "resolve", "slot_key", "split_slot_key", "validate_key",
]  # fmt: skip

SEPARATOR: Final = "\x1f"
"""Separates the entry key from the writer's node id in a slot key (ASCII unit separator)."""

MAX_KEY_CHARS: Final = 1024
"""Longest entry key, in characters."""

HLC_CHARS: Final = 16
"""Length of an encoded HLC timestamp: 12 hex digits of wall time in ms, 4 of counter."""

_MAX_WALL_MS: Final = 16**12 - 1
_MAX_COUNTER: Final = 0xFFFF
_HLC_RE: Final = re.compile(r"[0-9a-f]{16}")
_ZERO_HLC: Final = "0" * HLC_CHARS
_ORDER: Final = attrgetter("t", "writer")
_new_tuple: Final = tuple.__new__
"""Builds a :class:`Slot` or :class:`EntryChange` from a tuple of all its fields, skipping the
Python-level ``__new__`` of named tuples (0.43 -> 0.28 µs each; the hot paths make one or two per
write, and one or two per key a node joins with)."""


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def format_hlc(wall_ms: int, counter: int) -> str:
    """
    Encode an HLC timestamp so that string order is time order.

    Args:
        wall_ms: Wall time in milliseconds since the Unix epoch, ``0 <= wall_ms < 2**48``.
        counter: Logical counter within that millisecond, ``0 <= counter <= 0xffff``.

    Returns:
        16 lowercase hex characters, e.g. ``"018f3a2b4c5d0001"``.

    Raises:
        EntryError: If either part is out of range.

    """
    if not (0 <= wall_ms <= _MAX_WALL_MS and 0 <= counter <= _MAX_COUNTER):
        raise EntryError(f"HLC out of range: wall_ms={wall_ms}, counter={counter}")
    return f"{wall_ms:012x}{counter:04x}"


def parse_hlc(ts: str) -> tuple[int, int]:
    """
    Decode an HLC timestamp made by :func:`format_hlc`.

    Args:
        ts: 16 lowercase hex characters.

    Returns:
        ``(wall_ms, counter)``: wall time in milliseconds since the Unix epoch, and counter.

    Raises:
        EntryError: If ``ts`` is not exactly 16 lowercase hex characters.

    """
    if not isinstance(ts, str) or _HLC_RE.fullmatch(ts) is None:
        raise EntryError(f"malformed HLC timestamp: {ts!r}")
    return int(ts[:12], 16), int(ts[12:], 16)


class Clock:
    """
    Hybrid logical clock: wall time in milliseconds plus a counter, never going backwards.

    One clock serves every context of a node. Timestamps are strings (see :func:`format_hlc`).

    Args:
        now_ms: Returns the wall time in milliseconds since the Unix epoch.
        max_drift_ms: :meth:`observe` ignores timestamps more than this many milliseconds ahead of
            ``now_ms()``, so that one peer with a wild clock (or a hostile one sending
            ``"ffffffffffffffff"``) cannot drag every node's clock to the end of time. ``None``
            accepts any timestamp.

    """

    __slots__ = ("_counter", "_latest", "_max_drift_ms", "_now_ms", "_wall_hex", "_wall_ms")

    def __init__(
        self,
        now_ms: Callable[[], int] = _wall_clock_ms,
        *,
        max_drift_ms: int | None = 86_400_000,
    ) -> None:
        self._now_ms = now_ms
        self._max_drift_ms = max_drift_ms
        self._wall_ms = 0
        self._wall_hex = _ZERO_HLC[:12]
        """``_wall_ms`` as its 12 hex digits: formatted once per millisecond, not per tick."""
        self._counter = 0
        self._latest = _ZERO_HLC

    @property
    def latest(self) -> str:
        """The greatest timestamp ticked or observed so far; ``"0" * 16`` at first."""
        return self._latest

    def tick(self) -> str:
        """
        Make a timestamp for a local event.

        Returns:
            A timestamp strictly greater than every one ticked or observed before. When the wall
            clock is behind, the wall part is kept and the counter bumped; when the counter would
            pass ``0xffff``, the wall part moves one millisecond ahead and the counter restarts.

        Raises:
            EntryError: If the wall part would pass ``2**48 - 1`` ms (the year 10889).

        """
        now = self._now_ms()
        if now <= self._wall_ms and self._counter < _MAX_COUNTER:  # the commonest case under load
            self._counter = counter = self._counter + 1
            self._latest = ts = self._wall_hex + "%04x" % counter  # noqa: UP031  (faster than an f-string here)
            return ts
        wall = now if now > self._wall_ms else self._wall_ms + 1  # counter restarts either way
        if wall > _MAX_WALL_MS:
            raise EntryError(f"HLC wall clock out of range: {wall} ms")
        self._wall_ms, self._counter, self._wall_hex = wall, 0, "%012x" % wall  # noqa: UP031
        self._latest = ts = self._wall_hex + "0000"
        return ts

    def observe(self, ts: object) -> None:
        """
        Merge a timestamp seen in a remote slot, so the next :meth:`tick` is greater than it.

        Args:
            ts: A timestamp; malformed ones, and ones too far ahead (see ``max_drift_ms``), are
                ignored.

        """
        if not isinstance(ts, str) or ts <= self._latest or _HLC_RE.fullmatch(ts) is None:
            return  # a well-formed ts <= latest is not news; a malformed one is ignored
        wall, counter = int(ts[:12], 16), int(ts[12:], 16)
        if self._max_drift_ms is not None and wall > self._now_ms() + self._max_drift_ms:
            return
        self._wall_ms, self._counter, self._latest, self._wall_hex = wall, counter, ts, ts[:12]


def validate_key(key: str) -> None:
    """
    Check that ``key`` can be an entry key.

    Args:
        key: 1 to :data:`MAX_KEY_CHARS` characters, none of them :data:`SEPARATOR`, and text
            UTF-8 can encode (no lone surrogate: pycrdt panics on one).

    Raises:
        EntryError: If ``key`` is not a string, is empty, is too long, contains the separator or
            a lone surrogate.

    """
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS or SEPARATOR in key or not _encodable(key):
        if not isinstance(key, str):
            raise EntryError(f"entry key must be a string, not {type(key).__name__}")
        if not key:
            raise EntryError("entry key is empty")
        if len(key) > MAX_KEY_CHARS:
            raise EntryError(f"entry key is {len(key)} characters long; the limit is {MAX_KEY_CHARS}")
        if SEPARATOR in key:
            raise EntryError(f"entry key {key!r} contains the reserved character U+001F")
        raise EntryError(f"entry key {key!r} is not valid Unicode text (a lone surrogate)")


def _encodable(text: str) -> bool:
    """Whether UTF-8 can encode ``text`` (pycrdt panics on a lone surrogate); ASCII without encoding."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def slot_key(key: str, writer: NodeId) -> str:
    """Return the root-map key of ``writer``'s slot for entry ``key`` (neither is validated)."""
    return f"{key}{SEPARATOR}{writer}"


def split_slot_key(slot: str) -> tuple[str, NodeId] | None:
    """
    Split a root-map key into ``(entry key, writer)``.

    Returns:
        ``None`` unless ``slot`` is a valid entry key, the separator and a non-empty writer id.

    """
    key, sep, writer = slot.rpartition(SEPARATOR)
    if not sep or not writer or not key or len(key) > MAX_KEY_CHARS or SEPARATOR in key:
        return None
    # Interned: a context's index holds one writer id per slot, and there are only a few
    # writers (at 100,000 keys, one 63-character copy per key took 11 MiB).
    return key, NodeId(sys.intern(writer))


class Slot(NamedTuple):
    """
    One writer's value (or tombstone) for one entry key.

    A named tuple, not a frozen dataclass: the index holds one per key and writer, and every
    update builds and compares them; a named tuple does both about 30% faster.
    """

    writer: NodeId
    """Node that wrote the slot."""
    t: str
    """HLC timestamp of the write (see :func:`format_hlc`)."""
    value: str | None
    """The value as JSON text; ``None`` for a tombstone (a deletion)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """A live entry as read: the winning slot of its key, and the losers if there is a conflict."""

    key: str
    value: str
    """The value as JSON text."""
    t: str
    """HLC timestamp of the winning write."""
    writer: NodeId
    """Node that made the winning write."""
    conflicts: tuple[Slot, ...] = ()
    """Losing concurrent writes (tombstones included), best first by the context's strategy; empty without a conflict."""


class EntryChange(NamedTuple):
    """The resolved state of ``key`` after a change, local or remote (a named tuple, like :class:`Slot`: one per changed key)."""

    key: str
    value: str | None
    """The value as JSON text, or ``None`` if the entry is now absent."""
    writer: NodeId | None
    """Node that wrote the winning slot (tombstones included); ``None`` if no slot is left."""
    t: str | None
    """HLC timestamp of the winning slot; ``None`` if no slot is left."""
    previous: str | None = None
    """The value (JSON text) the entry had before the change; ``None`` if it was absent."""


STRATEGIES: Final = ("latest-wins", "origin-priority")
"""Names of the conflict strategies a context can use (see :class:`Strategy`)."""


@dataclass(frozen=True, slots=True)
class Strategy:
    """
    How the winner among concurrent slots of one key is chosen; the same on every node.

    ``latest-wins`` (the default): the greatest ``(t, writer)``, i.e. the latest HLC, ties
    broken by node id. ``origin-priority``: a slot written by a node listed in ``priority``
    beats every slot by a node listed after it or not at all; among equals, latest wins.
    Tombstones take part like values: a deletion by a preferred node wins.

    A context keeps its strategy in its document (root map :data:`META_ROOT`, key
    ``"strategy"``), so every replica resolves with the same one; concurrent changes of the
    strategy settle like any map key.
    """

    name: str = "latest-wins"
    priority: tuple[NodeId, ...] = ()
    """Node ids, most preferred first (``origin-priority`` only)."""

    def order(self) -> Callable[[Slot], Any]:
        """Return the sort key of slots: the winner is the ``max``."""
        if self.name != "origin-priority" or not self.priority:
            return _ORDER
        rank = {writer: len(self.priority) - i for i, writer in enumerate(self.priority)}
        return lambda slot: (rank.get(slot.writer, 0), slot.t, slot.writer)

    def to_json(self) -> dict[str, Any]:
        """The strategy as stored in the document and shown by the API."""
        return {"name": self.name, "priority": list(self.priority)}

    @classmethod
    def parse(cls, raw: object) -> Strategy:
        """
        Read a stored strategy; anything malformed (a buggy or hostile peer wrote it) reads as
        the default, the same way on every node.
        """
        if type(raw) is not dict:
            return cls()
        name, priority = raw.get("name"), raw.get("priority", [])
        if name not in STRATEGIES or type(priority) is not list or not all(type(p) is str for p in priority):
            return cls()
        return cls(name, tuple(NodeId(p) for p in priority))


META_ROOT: Final = "ctxsync.meta"
"""Root ``Y.Map`` of a context's settings that must be equal on every node (its strategy)."""


def resolve(slots: Iterable[Slot], order: Callable[[Slot], Any] = _ORDER) -> Slot | None:
    """
    Pick the winning slot of one key: the greatest by ``order`` (default: latest ``(t, writer)``);
    ``None`` if there are none.

    The winner may be a tombstone, in which case the entry is absent.
    """
    return max(slots, key=order, default=None)


def _parse_slot(writer: NodeId, raw: object) -> Slot | None:
    """
    Read a raw slot value from the map; ``None`` if it is malformed (see the module docstring).

    The slot holds copies of the strings in ``raw``, not the strings themselves. ``raw`` comes
    from pycrdt's conversion of a whole update's event (or of the whole map), allocated all at
    once; an index keeping one small string per change out of it keeps nearly every memory page
    of it allocated after it is freed. Measured at 100,000 keys: the index plus the document
    took 226 MiB with the event's strings, and 149 MiB with copies (a bare document: 89 MiB).
    """
    if type(raw) is not dict:
        return None
    t = raw.get("t")
    if type(t) is not str or _HLC_RE.fullmatch(t) is None:
        return None
    t = t.lower()  # a copy (t is lowercase hex already)
    if raw.get("deleted") is True:
        return _new_tuple(Slot, (writer, t, None))
    v = raw.get("v")
    if type(v) is not str:
        return None
    return _new_tuple(Slot, (writer, t, v.encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass")))


class EntryMap:
    """
    The entries of one context, over the root map ``doc.get(ENTRIES_ROOT, type=Map)``.

    An index ``key -> {writer: Slot}`` of the well-formed slots is built at construction and kept up
    to date by a ``Map.observe`` callback, so updates applied with ``doc.apply_update`` are indexed
    too; this object's own writes are indexed at once, so they are visible to reads and later
    writes inside an enclosing transaction. Do not apply remote updates and write in one
    transaction: the write would not see (and so not replace) slots the update adds.

    Every slot timestamp seen is passed to ``clock.observe``. Call :meth:`close` when done.

    Args:
        doc: The context's document.
        node_id: This node's id: the writer of every local slot.
        clock: This node's clock.

    Raises:
        EntryError: If ``node_id`` is empty or contains :data:`SEPARATOR`.

    """

    def __init__(self, doc: pycrdt.Doc[Any], node_id: NodeId, clock: Clock) -> None:
        if not isinstance(node_id, str) or not node_id or SEPARATOR in node_id:
            raise EntryError(f"invalid node id {node_id!r}")
        self._doc = doc
        self._node_id = node_id
        self._clock = clock
        self._map: pycrdt.Map[Any] = doc.get(ENTRIES_ROOT, type=pycrdt.Map)
        self._slots: dict[str, Slot | dict[NodeId, Slot]] = {}
        """The index: key -> its one slot, or {writer: slot} when it has two or more (a conflict).
        A bare slot for the common case: a dict per key took 21 MiB at 100,000 keys."""
        self._live = 0
        self._conflicted: set[str] = set()
        self._changes: dict[str, EntryChange] = {}
        self._reasserts: dict[str, Slot] = {}
        self._new_conflicts: dict[str, None] = {}
        self._indexed_own: dict[str, dict[str, Any]] = {}
        """Own slots written and indexed in the open transaction: slot name -> the raw value set."""
        self._exclusive = False
        """True inside :meth:`transaction`: every change to the map is this object's, indexed already."""
        self._closed = False
        self._meta: pycrdt.Map[Any] = doc.get(META_ROOT, type=pycrdt.Map)
        self._strategy = Strategy.parse(self._meta.get("strategy"))
        self._order = self._strategy.order()
        with doc.transaction():
            self._load()
            # The raw (Rust-level) subscription: pycrdt's own wrapper walks every event value
            # in Python looking for shared types to wrap, which entries never hold (a third of
            # the indexing cost of a large update). _on_map_event must not raise (see there).
            self._subscription = self._map.integrated.observe(self._on_map_event)
            self._meta_subscription = self._meta.observe(self._on_meta_event)

    def _load(self) -> None:
        observe = self._clock.observe
        index = self._slots
        for name, raw in self._map.items():
            parts = split_slot_key(name)
            if parts is None:
                continue
            slot = _parse_slot(parts[1], raw)
            if slot is None:
                continue
            observe(slot.t)
            self._put_slot(parts[0], slot)
        for key, held in index.items():
            if type(held) is dict:
                self._conflicted.add(key)
                winner = resolve(held.values(), self._order)
            else:
                winner = held  # type: ignore[assignment]
            if winner is not None and winner.value is not None:
                self._live += 1

    # -- writes -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, origin: object = None) -> Iterator[None]:
        """
        Open a document transaction (tagged ``origin``) for writes made through this object only.

        Inside it, change the document only with this object's methods: they index each write at
        once, so the map observer skips the transaction's event instead of converting every
        changed slot to Python to find them indexed already (about 3 µs per write). A remote
        update applied inside it would go unindexed. Nested in another transaction, it is that
        transaction, and the observer does its usual work.

        Raises:
            RuntimeError: From pycrdt, if a transaction with another origin is open.
        """
        if self._exclusive or self._doc._txn is not None:  # nested: the outer one decides
            with self._doc.transaction(origin=origin):
                yield
            return
        self._exclusive = True
        try:
            with self._doc.transaction(origin=origin):  # its observers run as it exits: still exclusive
                yield
        finally:
            self._exclusive = False
            self._indexed_own = {}

    def _open(self) -> contextlib.AbstractContextManager[object]:
        """:meth:`transaction`, or (cheaper) the enclosing transaction when there is one."""
        if self._doc._txn is not None:
            return self._doc.transaction()
        return self.transaction()

    def set(self, key: str, value_json: str) -> None:
        """
        Write an entry, replacing every slot of ``key`` this node can see, in one transaction.

        Args:
            key: Entry key (see :func:`validate_key`).
            value_json: The value as JSON text. It is not checked: the caller must pass valid JSON.

        Raises:
            EntryError: If ``key`` is invalid or ``value_json`` is not a string (or holds a lone
                surrogate, which pycrdt cannot encode).
            InvalidState: If the map is closed.

        """
        validate_key(key)
        if not isinstance(value_json, str):
            raise EntryError(f"value must be JSON text, not {type(value_json).__name__}")
        if not _encodable(value_json):
            raise EntryError(f"value of {key!r} is not valid Unicode text (a lone surrogate)")
        self._check_open()
        with self._open():
            self._write(key, value_json)

    def delete(self, key: str) -> bool:
        """
        Delete an entry by writing a tombstone in this node's slot, in one transaction.

        Returns:
            ``True`` if the entry was live; ``False`` if it was absent, and nothing was written.

        Raises:
            EntryError: If ``key`` is invalid.
            InvalidState: If the map is closed.

        """
        validate_key(key)
        self._check_open()
        if not self._is_live(key):
            return False
        with self._open():
            self._write(key, None)
        return True

    def set_many(self, items: Iterable[tuple[str, str | None]]) -> int:
        """
        Write and delete several entries in one transaction.

        Args:
            items: ``(key, value_json)`` pairs, applied in order; ``None`` deletes the key.

        Returns:
            How many writes were made: deletions of absent keys are skipped.

        Raises:
            EntryError: If any key or value is invalid; then nothing is written.
            InvalidState: If the map is closed.

        """
        batch = list(items)
        for key, value_json in batch:
            validate_key(key)
            if value_json is not None and not isinstance(value_json, str):
                raise EntryError(f"value must be JSON text or None, not {type(value_json).__name__}")
            if value_json is not None and not _encodable(value_json):
                raise EntryError(f"value of {key!r} is not valid Unicode text (a lone surrogate)")
        self._check_open()
        if self._doc._txn is None:
            with self.transaction():
                return self._write_all(batch)
        return self._write_all(batch)  # in the caller's transaction (the mesh's group commit): no nested one

    def _write_all(self, batch: list[tuple[str, str | None]]) -> int:
        written = 0
        for key, value_json in batch:
            if value_json is None and not self._is_live(key):
                continue
            self._write(key, value_json)
            written += 1
        return written

    def _write(self, key: str, value: str | None) -> None:
        """Replace the slots of ``key`` with this node's; must run inside a transaction."""
        node = self._node_id
        after: Slot = _new_tuple(Slot, (node, self._clock.tick(), value))
        held = self._slots.get(key)
        before = None if held is None else self._winner(key)
        # Own slot first: if pycrdt refuses it, nothing has changed (in an exclusive transaction
        # no observer would repair the index after a half-done write).
        self._put_own(key, after)
        if held is not None:
            for writer in held if type(held) is dict else (held.writer,):  # type: ignore[union-attr]
                if writer != node:
                    del self._map[slot_key(key, writer)]
        self._slots[key] = after
        self._settle(key, before, after)

    def _put_own(self, key: str, slot: Slot) -> None:
        """Write this node's ``slot`` of ``key`` to the map; the caller indexes it at once, so the observer skips it."""
        name = slot_key(key, slot.writer)
        raw = {"v": slot.value, "t": slot.t} if slot.value is not None else {"t": slot.t, "deleted": True}
        # pycrdt's ``self._map[name] = raw`` without its wrapper (a nested transaction and
        # type checks for shared types and subdocuments, which slots never are): half the cost.
        txn = self._doc._txn
        assert txn is not None and txn._txn is not None, "must run inside a transaction"
        self._map.integrated.insert(txn._txn, name, raw)
        if not self._exclusive:  # else the observer skips the whole transaction (see transaction())
            self._indexed_own[name] = raw

    def take_reasserts(self) -> dict[str, Slot]:
        """
        Return and forget this node's own slots that an older write of its own replaced.

        Such a write can only come back after a crash lost it here before it was stored (it
        left, or was computed into a sync answer, first). Pass the result to
        :meth:`restore_own` in a local transaction.
        """
        found, self._reasserts = self._reasserts, {}
        return found

    def restore_own(self, slots: dict[str, Slot]) -> int:
        """
        Put back this node's own slots (same value, same timestamp), unless something newer
        replaced them meanwhile. Must run inside a transaction, or opens one.

        Returns:
            How many slots were put back.
        """
        self._check_open()
        node = self._node_id
        restored = 0
        with self._open():
            for key, own in slots.items():
                current = self._slot_of(key, node)
                if current is None or current.t >= own.t:
                    continue  # deleted by a later write elsewhere, or already newer
                before = self._winner(key)
                self._put_own(key, own)
                self._put_slot(key, own)
                self._settle(key, before, self._winner(key))
                restored += 1
        return restored

    @property
    def strategy(self) -> Strategy:
        """The context's conflict strategy, as its document says (the default if unset or malformed)."""
        return self._strategy

    def set_strategy(self, strategy: Strategy) -> None:
        """
        Store the context's conflict strategy in its document (it travels to every replica).

        Winners of conflicted keys are re-resolved at once; the changes show in
        :meth:`pop_changes`.

        Raises:
            EntryError: If the strategy's name is not one of :data:`STRATEGIES`.
            InvalidState: If the map is closed.
        """
        if strategy.name not in STRATEGIES:
            raise EntryError(f"unknown strategy {strategy.name!r}; use one of {', '.join(STRATEGIES)}")
        self._check_open()
        with self._doc.transaction():
            self._meta["strategy"] = strategy.to_json()

    def _on_meta_event(self, event: pycrdt.MapEvent) -> None:
        strategy = Strategy.parse(self._meta.get("strategy"))
        if strategy == self._strategy:
            return
        before = {key: self._winner(key) for key in self._conflicted}
        self._strategy, self._order = strategy, strategy.order()
        for key, winner in before.items():
            self._settle(key, winner, self._winner(key))

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidState("entry map is closed")

    # -- index maintenance --------------------------------------------------------------------

    def _on_map_event(self, event: Any) -> None:
        """
        Index the slots a transaction changed (a raw yrs ``MapEvent``, during its commit).

        An exception here is handed to pycrdt the way its own observer wrapper does, so the
        transaction still commits whole and ``with doc.transaction()`` raises it afterwards.
        """
        if self._exclusive:
            return  # only this object's writes, indexed as they were made (see transaction())
        try:
            self._index_changes(event.keys)
        except Exception as exc:
            self._doc._exceptions.append(exc)

    def _index_changes(self, changes: dict[str, dict[str, Any]]) -> None:
        """
        ``changes``: {slot key: {"action": "add" | "update" | "delete", "newValue": ..., "oldValue": ...}}.

        A live slot of a key new to the index (all of them when a node joins) is indexed here
        without :meth:`_apply` and :meth:`_settle`, and the clock observes only the newest of
        those timestamps: this loop runs once per slot of a 100,000-key update.
        """
        own, self._indexed_own = self._indexed_own, {}
        slots, log, conflicted = self._slots, self._changes, self._conflicted
        newest = ""
        fresh: list[Slot] = []
        for name, change in changes.items():
            if own and name in own and change.get("newValue") == own[name]:
                continue  # this node's own write, indexed when it was made
            parts = split_slot_key(name)
            if parts is None:
                continue
            key, writer = parts
            slot = None if change.get("action") == "delete" else _parse_slot(writer, change.get("newValue"))
            if slot is not None and slot.value is not None and key not in slots and key not in log:
                slots[key] = slot
                log[key] = _new_tuple(EntryChange, (key, slot.value, writer, slot.t, None))
                if conflicted:
                    conflicted.discard(key)
                fresh.append(slot)
                if slot.t > newest:
                    newest = slot.t
                continue
            self._apply(key, writer, slot)
        if fresh:
            self._live += len(fresh)
            self._clock.observe(newest)
            if self._clock.latest < newest:  # refused (too far ahead): observe the others one by one
                for slot in fresh:
                    self._clock.observe(slot.t)

    def _apply(self, key: str, writer: NodeId, slot: Slot | None) -> None:
        """Index one slot of ``key``: ``slot`` is its new value, ``None`` if removed or malformed."""
        if key not in self._slots:
            if slot is not None:
                self._clock.observe(slot.t)
                self._slots[key] = slot
                self._settle(key, None, slot)
            return
        known = self._slot_of(key, writer)
        if known == slot:
            return
        if writer == self._node_id and known is not None and slot is not None and slot.t < known.t:
            # An older write of this node's own slot came back (made before a crash that lost it
            # locally, under another Yjs client id) and won Yjs' client-id tie-break against the
            # newer one: remember the newer one so the caller can put it back (restore_own()).
            self._reasserts[key] = known
        before = self._winner(key)
        if slot is not None:
            self._clock.observe(slot.t)
            self._put_slot(key, slot)
        elif known is not None:
            self._drop_slot(key, writer)
        self._settle(key, before, self._winner(key))

    def _slot_of(self, key: str, writer: NodeId) -> Slot | None:
        """``writer``'s slot of ``key`` in the index, if any."""
        held = self._slots.get(key)
        if held is None:
            return None
        if type(held) is dict:
            return held.get(writer)
        return held if held.writer == writer else None  # type: ignore[union-attr,return-value]

    def _put_slot(self, key: str, slot: Slot) -> None:
        """Index ``slot`` of ``key``, replacing its writer's earlier one."""
        held = self._slots.get(key)
        if held is None:
            self._slots[key] = slot
        elif type(held) is dict:
            held[slot.writer] = slot
        elif held.writer == slot.writer:  # type: ignore[union-attr]
            self._slots[key] = slot
        else:
            self._slots[key] = {held.writer: held, slot.writer: slot}  # type: ignore[union-attr,dict-item]

    def _drop_slot(self, key: str, writer: NodeId) -> None:
        """Remove ``writer``'s slot of ``key`` from the index; a last one left is held bare again."""
        held = self._slots[key]
        if type(held) is not dict:
            del self._slots[key]
            return
        del held[writer]
        if len(held) == 1:
            (self._slots[key],) = held.values()

    def _winner(self, key: str) -> Slot | None:
        held = self._slots.get(key)
        if held is None or type(held) is not dict:
            return held  # type: ignore[return-value]  # a bare Slot
        return resolve(held.values(), self._order)

    def _settle(self, key: str, before: Slot | None, after: Slot | None) -> None:
        """Update the live count, conflict set and change log after ``key``'s slots changed."""
        if before is None and after is not None and after.value is not None and key not in self._changes:
            # The commonest case by far (a new key, as when a node joins): one slot, no conflict.
            if self._conflicted:
                self._conflicted.discard(key)
            self._live += 1
            self._changes[key] = _new_tuple(EntryChange, (key, after.value, after.writer, after.t, None))
            return
        if type(self._slots.get(key)) is dict:
            if key not in self._conflicted:
                self._conflicted.add(key)
                self._new_conflicts[key] = None
        elif self._conflicted:
            self._conflicted.discard(key)
        if before == after:
            return
        was_live = before is not None and before.value is not None
        is_live = after is not None and after.value is not None
        self._live += is_live - was_live
        held = self._changes.get(key)
        if not (was_live or is_live):
            # Absent before and after: nothing visible changed. A deletion held from earlier in
            # this batch takes the tombstone that now wins (its writer and time), whichever
            # order pycrdt reported the slots in.
            if held is not None and held.value is None and after is not None:
                self._changes[key] = EntryChange(key, None, after.writer, after.t, held.previous)
            return
        previous = held.previous if held is not None else (before.value if before is not None else None)
        if not is_live and previous is None:
            # Absent when the batch began and absent now: it was live only between two slots of
            # one remote transaction, taken in pycrdt's order (a loser's slot showing for a
            # moment after the winner's went). Nothing visible changed.
            self._changes.pop(key, None)
            return
        if after is None:
            self._changes[key] = EntryChange(key, None, None, None, previous)
        else:
            self._changes[key] = EntryChange(key, after.value, after.writer, after.t, previous)

    def _is_live(self, key: str) -> bool:
        winner = self._winner(key)
        return winner is not None and winner.value is not None

    # -- reads --------------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        """
        Read an entry.

        Returns:
            The entry, with its conflicting losers if any; ``None`` if it is absent (no slot, or the
            winner is a tombstone). Invalid keys are absent.

        """
        held = self._slots.get(key)
        if held is None:
            return None
        if type(held) is not dict:
            only: Slot = held  # type: ignore[assignment]
            if only.value is None:
                return None
            return Entry(key, only.value, only.t, only.writer)
        ranked = sorted(held.values(), key=self._order, reverse=True)
        winner = ranked[0]
        if winner.value is None:
            return None
        return Entry(key, winner.value, winner.t, winner.writer, tuple(ranked[1:]))

    def keys(self, prefix: str = "") -> list[str]:
        """Return the keys of live entries that start with ``prefix``, sorted (O(n log n))."""
        return sorted(k for k in self._slots if k.startswith(prefix) and self._is_live(k))

    def entries(self, prefix: str = "") -> Iterator[Entry]:
        """Yield the live entries whose keys start with ``prefix``, sorted by key."""
        for key in self.keys(prefix):
            entry = self.get(key)
            if entry is not None:
                yield entry

    @property
    def tombstones(self) -> int:
        """
        How many keys are deleted, their winning slot a tombstone (O(1)).

        A deletion keeps its key's slot in the document and the index (it has to beat older
        writes that arrive later), so memory grows with every key ever written, live or not:
        about 1.2 KiB per live key and 1.5 KiB per deleted one (set, then deleted), in yrs and the
        index (measured at 100,000 keys, and at 100 contexts of 400 deleted keys).
        """
        return len(self._slots) - self._live

    def __len__(self) -> int:
        """Return the number of live entries, in O(1)."""
        return self._live

    def __contains__(self, key: object) -> bool:
        """Return whether ``key`` is a live entry."""
        return isinstance(key, str) and self._is_live(key)

    def conflicts(self) -> list[Entry]:
        """Return the live entries that have conflicts, sorted by key (O(conflicted keys))."""
        found = (self.get(key) for key in sorted(self._conflicted))
        return [entry for entry in found if entry is not None]

    def pop_changes(self) -> list[EntryChange]:
        """
        Return and forget the changes since the last call, local and remote alike.

        Returns:
            One :class:`EntryChange` per key whose resolved state changed (its latest state), in the
            order keys were first affected (within one remote transaction pycrdt reports keys in
            no particular order). A key absent at the last call and absent now has no change,
            whatever happened between (a tombstone replacing another, a value set and deleted, a
            loser's slot showing for a moment within one remote transaction, depending on the
            order pycrdt reports slots in). Until called, at most one change per key is held.

        """
        changes = list(self._changes.values())
        self._changes.clear()
        return changes

    def pop_new_conflicts(self) -> list[str]:
        """Return and forget the keys that became conflicted (two or more slots) since the last call."""
        keys = [k for k in self._new_conflicts if k in self._conflicted]
        self._new_conflicts.clear()
        return keys

    def close(self) -> None:
        """Stop following the document. Reads still work, on a stale index; writes raise."""
        if not self._closed:
            self._closed = True
            self._subscription.drop()
            self._meta.unobserve(self._meta_subscription)
