"""Tests for ctxsync.entries: HLC, slot keys, and the multi-value register over real pycrdt docs."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Map, Text

from ctxsync.entries import (
    MAX_KEY_CHARS,
    SEPARATOR,
    Clock,
    Entry,
    EntryChange,
    EntryMap,
    Slot,
    Strategy,
    format_hlc,
    parse_hlc,
    resolve,
    slot_key,
    split_slot_key,
    validate_key,
)
from ctxsync.errors import EntryError, InvalidState
from ctxsync.types import ENTRIES_ROOT, NodeId

A, B, C = NodeId("node-a"), NodeId("node-b"), NodeId("node-c")


class Wall:
    """A wall clock in milliseconds that tests set by hand."""

    def __init__(self, ms: int = 1_000_000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


class Node:
    """One replica: a doc, its entry map and a hand-set wall clock."""

    def __init__(self, node_id: NodeId, ms: int = 1_000_000) -> None:
        self.node_id = node_id
        self.wall = Wall(ms)
        self.clock = Clock(self.wall)
        self.doc: Doc[Any] = Doc()
        self.entries = EntryMap(self.doc, node_id, self.clock)

    def update_since(self, state_vector: bytes) -> bytes:
        return self.doc.get_update(state_vector)

    def receive(self, *updates: bytes) -> None:
        for update in updates:
            with self.doc.transaction(origin="remote"):
                self.doc.apply_update(update)


def sync(*nodes: Node) -> None:
    """Exchange missing updates between every ordered pair, so all nodes converge."""
    for src, dst in itertools.permutations(nodes, 2):
        dst.receive(src.update_since(dst.doc.get_state()))


def raw_slots(doc: Doc[Any], key: str) -> dict[str, Any]:
    """Return the root map's slots of ``key``, as stored."""
    root = doc.get(ENTRIES_ROOT, type=Map)
    return {name: root[name] for name in root.keys() if name.rpartition(SEPARATOR)[0] == key}


def state(entries: EntryMap) -> list[Entry]:
    return list(entries.entries())


def fresh(updates: Iterable[bytes], node_id: NodeId = NodeId("observer")) -> EntryMap:
    """Apply ``updates`` in order to a new doc that already has an entry map, and return it."""
    doc: Doc[Any] = Doc()
    entries = EntryMap(doc, node_id, Clock(Wall(0)))
    for update in updates:
        doc.apply_update(update)
    return entries


# -- HLC ---------------------------------------------------------------------------------------


def test_tick_is_strictly_monotonic_when_wall_clock_stalls_or_goes_back() -> None:
    """Ticks keep increasing while the wall clock is stuck or moves backwards."""
    wall = Wall(5_000)
    clock = Clock(wall)
    ticks = [clock.tick() for _ in range(3)]
    wall.ms = 4_000
    ticks += [clock.tick() for _ in range(3)]
    wall.ms = 6_000
    ticks.append(clock.tick())
    assert ticks == sorted(set(ticks))
    assert [parse_hlc(t) for t in ticks] == [
        (5_000, 0), (5_000, 1), (5_000, 2), (5_000, 3), (5_000, 4), (5_000, 5), (6_000, 0)
    ]
    assert clock.latest == ticks[-1]


def test_observe_pushes_clock_forward_and_never_back() -> None:
    """Observing a newer timestamp makes the next tick greater than it; an older one is ignored."""
    clock = Clock(Wall(1_000))
    remote = format_hlc(9_000, 7)
    clock.observe(remote)
    assert clock.latest == remote
    assert parse_hlc(clock.tick()) == (9_000, 8)
    clock.observe(format_hlc(2_000, 0))
    assert parse_hlc(clock.tick()) == (9_000, 9)


def test_counter_overflow_moves_wall_part_ahead() -> None:
    """Past counter 0xffff the wall part moves one millisecond ahead and the counter restarts."""
    clock = Clock(Wall(1_000))
    clock.observe(format_hlc(1_000, 0xFFFE))
    assert parse_hlc(clock.tick()) == (1_000, 0xFFFF)
    assert parse_hlc(clock.tick()) == (1_001, 0)
    assert parse_hlc(clock.tick()) == (1_001, 1)


@pytest.mark.parametrize(
    "bad",
    ["", "zz", "0000000000001", "00000000000100000", "00000000000A0000", " 000000000010000", None, 12, b"0" * 16],
)
def test_malformed_timestamps_are_ignored_by_observe_and_rejected_by_parse(bad: Any) -> None:
    """A malformed timestamp leaves the clock alone and makes parse_hlc raise EntryError."""
    clock = Clock(Wall(1_000))
    clock.observe(bad)
    assert clock.latest == "0" * 16
    with pytest.raises(EntryError):
        parse_hlc(bad)


def test_observe_ignores_timestamps_beyond_max_drift() -> None:
    """A timestamp too far ahead of the wall clock is ignored unless max_drift_ms is None."""
    far = format_hlc(1_000 + 86_400_001, 0)
    bounded, unbounded = Clock(Wall(1_000)), Clock(Wall(1_000), max_drift_ms=None)
    bounded.observe(far)
    unbounded.observe(far)
    assert bounded.latest == "0" * 16
    assert unbounded.latest == far


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("tick"), st.integers(0, 3)),
            st.tuples(st.just("wall"), st.integers(-3, 3)),
            st.tuples(st.just("observe"), st.integers(-2, 4), st.integers(0, 0xFFFF)),
        ),
        max_size=40,
    )
)
def test_tick_matches_the_hlc_rule_through_wall_moves_and_observes(steps: list[tuple[int, ...]]) -> None:
    """
    Every tick is what the HLC rule gives (the clock keeps the wall part's hex digits between
    ticks): max(wall, last) with the counter bumped, or the next millisecond past counter 0xffff.
    """
    wall = Wall(1_000)
    clock = Clock(wall)
    last = (0, 0)
    for step in steps:
        if step[0] == "wall":
            wall.ms = max(0, wall.ms + step[1])
        elif step[0] == "observe":
            ts = (max(0, wall.ms + step[1]), step[2])
            clock.observe(format_hlc(*ts))
            last = max(last, ts)
        else:
            for _ in range(step[1]):
                if wall.ms > last[0]:
                    last = (wall.ms, 0)
                elif last[1] < 0xFFFF:
                    last = (last[0], last[1] + 1)
                else:
                    last = (last[0] + 1, 0)
                assert clock.tick() == format_hlc(*last)
        assert clock.latest == format_hlc(*last)


def test_tick_refuses_to_pass_the_end_of_time() -> None:
    """The clock raises EntryError rather than wrap around past 2**48 - 1 ms."""
    clock = Clock(Wall(0), max_drift_ms=None)
    clock.observe("ffffffffffffffff")
    with pytest.raises(EntryError):
        clock.tick()
    assert clock.latest == "ffffffffffffffff"  # the refused tick changed nothing
    with pytest.raises(EntryError):
        clock.tick()


@settings(max_examples=50, deadline=None)
@given(
    st.tuples(st.integers(0, 2**48 - 1), st.integers(0, 0xFFFF)),
    st.tuples(st.integers(0, 2**48 - 1), st.integers(0, 0xFFFF)),
)
def test_hlc_encoding_is_fixed_width_and_order_preserving(x: tuple[int, int], y: tuple[int, int]) -> None:
    """Encoded timestamps are 16 characters, round-trip, and compare like (wall_ms, counter)."""
    ex, ey = format_hlc(*x), format_hlc(*y)
    assert len(ex) == len(ey) == 16
    assert parse_hlc(ex) == x
    assert (ex < ey) == (x < y)


# -- keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "a\x1fb", SEPARATOR, "k" * (MAX_KEY_CHARS + 1), 5])
def test_invalid_keys_are_rejected(key: Any) -> None:
    """Empty, too long, non-string and separator-bearing keys raise EntryError and write nothing."""
    with pytest.raises(EntryError):
        validate_key(key)
    node = Node(A)
    before = node.doc.get_state()
    with pytest.raises(EntryError):
        node.entries.set(key, "1")
    with pytest.raises(EntryError):
        node.entries.set_many([("ok", "1"), (key, "2")])
    assert node.doc.get_state() == before


@pytest.mark.parametrize("key", ["k", "k" * MAX_KEY_CHARS, "a/b c.d", "ünï😀", "x\x00y", "\n"])
def test_slot_keys_round_trip(key: str) -> None:
    """Any valid key and writer split back from their slot key."""
    validate_key(key)
    assert split_slot_key(slot_key(key, A)) == (key, A)


@pytest.mark.parametrize("slot", ["plain", "k\x1f", "\x1fnode", "a\x1fb\x1fnode", "k" * 1025 + "\x1fn"])
def test_unparsable_slot_keys_split_to_none(slot: str) -> None:
    """Slot keys without a valid entry key and writer give None."""
    assert split_slot_key(slot) is None


def test_resolve_takes_latest_timestamp_then_greatest_writer() -> None:
    """The winner is the greatest (t, writer); tombstones take part; no slots give None."""
    old, new = format_hlc(1, 0), format_hlc(2, 0)
    assert resolve([Slot(C, old, "1"), Slot(A, new, None)]) == Slot(A, new, None)
    assert resolve([Slot(A, new, "1"), Slot(B, new, "2")]) == Slot(B, new, "2")
    assert resolve([]) is None


# -- one node ----------------------------------------------------------------------------------


def test_set_get_delete_keys_and_len() -> None:
    """Entries can be written, read, listed by prefix, counted and deleted."""
    entries = Node(A).entries
    entries.set("app/b", '"two"')
    entries.set("app/a", "1")
    entries.set("other", "null")
    assert entries.keys() == ["app/a", "app/b", "other"]
    assert entries.keys("app/") == ["app/a", "app/b"]
    assert [e.key for e in entries.entries("app/")] == ["app/a", "app/b"]
    assert len(entries) == 3 and "other" in entries
    got = entries.get("app/b")
    assert got is not None and (got.value, got.writer, got.conflicts) == ('"two"', A, ())
    entries.set("app/b", "2")
    assert entries.get("app/b") == Entry("app/b", "2", entries.get("app/b").t, A)  # type: ignore[union-attr]
    assert entries.delete("app/a") is True
    assert entries.get("app/a") is None and "app/a" not in entries
    assert entries.keys() == ["app/b", "other"] and len(entries) == 2
    entries.set("app/a", "3")
    assert len(entries) == 3


@pytest.mark.parametrize(
    "text", ["3", "3.0", "12345678901234567890", "1e400", '{"a": [1, 2.5]}', '"\\u00e9"', "[]", "  true "]
)
def test_json_text_is_preserved_exactly(text: str) -> None:
    """A value reads back as the very JSON text written, on this node and on a peer."""
    a, b = Node(A), Node(B)
    a.entries.set("k", text)
    sync(a, b)
    assert a.entries.get("k").value == text  # type: ignore[union-attr]
    assert b.entries.get("k").value == text  # type: ignore[union-attr]


def test_deleting_an_absent_key_writes_nothing() -> None:
    """delete() of a missing or already deleted key returns False and leaves the doc unchanged."""
    node = Node(A)
    assert node.entries.delete("missing") is False
    node.entries.set("k", "1")
    assert node.entries.delete("k") is True
    before = node.doc.get_state()
    assert node.entries.delete("k") is False
    assert node.entries.set_many([("k", None), ("missing", None)]) == 0
    assert node.doc.get_state() == before


def test_set_many_is_one_transaction_and_applies_in_order() -> None:
    """set_many writes and deletes in one transaction, in order, and counts the writes."""
    node = Node(A)
    node.entries.set("gone", "0")
    node.entries.pop_changes()
    updates: list[bytes] = []
    node.doc.observe(lambda event: updates.append(event.update))
    count = node.entries.set_many([("a", "1"), ("b", "2"), ("a", "3"), ("gone", None), ("never", None)])
    assert count == 4 and len(updates) == 1
    assert node.entries.keys() == ["a", "b"]
    assert node.entries.get("a").value == "3"  # type: ignore[union-attr]
    assert list(raw_slots(node.doc, "a")) == [slot_key("a", A)]
    assert [(c.key, c.value) for c in node.entries.pop_changes()] == [("a", "3"), ("b", "2"), ("gone", None)]


def test_writes_join_the_callers_transaction() -> None:
    """Writes inside an outer transaction reuse it and its origin, and see each other."""
    node = Node(A)
    origins: list[Any] = []
    root = node.doc.get(ENTRIES_ROOT, type=Map)
    root.observe(lambda event: origins.append(event.transaction.origin))
    with node.doc.transaction(origin="local"):
        node.entries.set("k", "1")
        node.entries.set("k", "2")
        assert node.entries.delete("k") is True
        node.entries.set("k", "3")
    assert origins == ["local"]
    assert node.entries.get("k").value == "3"  # type: ignore[union-attr]
    assert list(raw_slots(node.doc, "k")) == [slot_key("k", A)]


def test_entry_map_indexes_existing_content_and_observes_its_timestamps() -> None:
    """A new EntryMap over a filled doc reads its entries and moves its clock past them."""
    a = Node(A, ms=5_000)
    a.entries.set("k", "1")
    a.entries.set("gone", "1")
    a.entries.delete("gone")
    clock = Clock(Wall(1_000))
    entries = EntryMap(a.doc, B, clock)
    assert entries.keys() == ["k"] and len(entries) == 1
    assert clock.latest == a.clock.latest
    assert entries.pop_changes() == []


def test_invalid_node_id_is_rejected() -> None:
    """A node id that is empty or holds the separator cannot write slots."""
    for bad in ("", "n\x1fm"):
        with pytest.raises(EntryError):
            EntryMap(Doc(), NodeId(bad), Clock())


def test_close_stops_indexing_and_writes() -> None:
    """After close() remote updates are no longer indexed and writes raise InvalidState."""
    a, b = Node(A), Node(B)
    b.entries.close()
    b.entries.close()
    a.entries.set("k", "1")
    sync(a, b)
    assert b.entries.get("k") is None
    with pytest.raises(InvalidState):
        b.entries.set("k", "2")


# -- two or more nodes -------------------------------------------------------------------------


def test_sequential_writes_leave_one_slot_and_the_later_wins() -> None:
    """A write made after seeing another replaces it, even from a node whose wall clock is behind."""
    a, b = Node(A, ms=9_000_000), Node(B, ms=1_000_000)
    a.entries.set("k", '"from a"')
    sync(a, b)
    assert b.clock.latest == a.clock.latest  # b's clock observed a's write
    b.entries.set("k", '"from b"')
    assert b.clock.latest > a.clock.latest
    sync(a, b)
    for node in (a, b):
        assert list(raw_slots(node.doc, "k")) == [slot_key("k", B)]
        assert node.entries.get("k") == Entry("k", '"from b"', b.clock.latest, B)
    a.entries.set("k", '"from a again"')
    sync(a, b)
    assert state(a.entries) == state(b.entries) == [Entry("k", '"from a again"', a.clock.latest, A)]


@pytest.mark.parametrize(
    ("writers", "latest"), [(ws, w) for ws in ((A, B), (A, B, C)) for w in ws]
)
def test_concurrent_writes_converge_to_the_latest_in_every_delivery_order(
    writers: tuple[NodeId, ...], latest: NodeId
) -> None:
    """Concurrent writes resolve to the one with the latest HLC, whatever the node ids and order."""
    nodes = [Node(w, ms=500_000) for w in writers]
    nodes[0].entries.set("k", '"base"')
    sync(*nodes)
    base_update, base = nodes[0].doc.get_update(), nodes[0].doc.get_state()
    for i, node in enumerate(nodes):
        node.wall.ms = 2_000_000 if node.node_id == latest else 1_000_000 + i
        node.entries.set("k", f'"{node.node_id}"')
    updates = [node.update_since(base) for node in nodes]
    losers = sorted((n for n in nodes if n.node_id != latest), key=lambda n: n.clock.latest, reverse=True)
    results = []
    for order in itertools.permutations(updates):
        entries = fresh([base_update, *order])
        got = entries.get("k")
        assert got is not None
        assert got.value == f'"{latest}"' and got.writer == latest
        assert got.conflicts == tuple(Slot(n.node_id, n.clock.latest, f'"{n.node_id}"') for n in losers)
        assert entries.conflicts() == [got] and len(entries) == 1
        results.append(got)
    assert all(r == results[0] for r in results)
    sync(*nodes)
    assert all(state(n.entries) == [results[0]] for n in nodes)
    loser = next(n for n in nodes if n.node_id != latest)
    loser.entries.set("k", '"resolved"')
    sync(*nodes)
    for node in nodes:
        assert node.entries.get("k") == Entry("k", '"resolved"', loser.clock.latest, loser.node_id)
        assert node.entries.conflicts() == [] and len(raw_slots(node.doc, "k")) == 1


def test_equal_timestamps_are_broken_by_node_id() -> None:
    """Two writes with the same HLC resolve to the greater node id on every node."""
    a, b = Node(A, ms=7_000), Node(B, ms=7_000)
    a.entries.set("k", '"a"')
    b.entries.set("k", '"b"')
    assert a.clock.latest == b.clock.latest
    sync(a, b)
    assert state(a.entries) == state(b.entries)
    assert a.entries.get("k").writer == B  # type: ignore[union-attr]


@pytest.mark.parametrize("deleter_is_later", [True, False])
def test_concurrent_delete_and_write_resolve_to_the_later(deleter_is_later: bool) -> None:
    """A delete racing a write wins if it is later, and loses if it is earlier."""
    a, b = Node(A, ms=1_000_000), Node(B, ms=1_000_000)
    a.entries.set("k", '"v0"')
    sync(a, b)
    (a if deleter_is_later else b).wall.ms = 2_000_000
    assert a.entries.delete("k") is True
    b.entries.set("k", '"v1"')
    sync(a, b)
    assert state(a.entries) == state(b.entries)
    if deleter_is_later:
        assert a.entries.get("k") is None and len(a.entries) == 0
    else:
        got = a.entries.get("k")
        assert got is not None and got.value == '"v1"'
        assert [(s.writer, s.value) for s in got.conflicts] == [(A, None)]


def test_writes_to_different_keys_never_conflict() -> None:
    """Concurrent writes to distinct keys all survive, without conflicts."""
    nodes = [Node(A), Node(B), Node(C)]
    for i, node in enumerate(nodes):
        node.entries.set(f"k{i}", str(i))
        node.entries.set("shared/" + node.node_id, "true")
    sync(*nodes)
    for node in nodes:
        assert node.entries.keys() == ["k0", "k1", "k2", "shared/node-a", "shared/node-b", "shared/node-c"]
        assert node.entries.conflicts() == [] and len(node.entries) == 6


def test_pop_changes_reports_local_and_remote_changes() -> None:
    """pop_changes gives each changed key once, first-affected first, with its resolved state."""
    a, b = Node(A, ms=1_000_000), Node(B, ms=1_000_000)
    a.entries.set("x", "1")
    a.entries.set("y", "2")
    a.entries.set("x", "3")
    assert [(c.key, c.value) for c in a.entries.pop_changes()] == [("x", "3"), ("y", "2")]
    assert a.entries.pop_changes() == []
    sync(a, b)
    # Within one remote transaction pycrdt reports keys in hash order: compare as a set.
    assert sorted(b.entries.pop_changes(), key=lambda c: c.key) == [
        EntryChange("x", "3", A, a.entries.get("x").t),  # type: ignore[union-attr]
        EntryChange("y", "2", A, a.entries.get("y").t),  # type: ignore[union-attr]
    ]
    a.entries.delete("y")
    sync(a, b)
    assert b.entries.pop_changes() == [EntryChange("y", None, A, a.clock.latest, previous="2")]
    a.entries.pop_changes()
    a.entries.set("x", "4")
    a.entries.set("x", "5")
    assert [(c.key, c.value, c.previous) for c in a.entries.pop_changes()] == [("x", "5", "3")]


def test_origin_priority_strategy_converges_and_reports_the_switch() -> None:
    """With origin-priority every node picks the preferred writer's slot, whatever the clocks say."""
    a, b = Node(A, ms=1_000_000), Node(B, ms=2_000_000)
    a.entries.set("k", '"from-a"')
    b.entries.set("k", '"from-b"')  # later HLC: wins under latest-wins
    sync(a, b)
    assert a.entries.get("k").value == b.entries.get("k").value == '"from-b"'  # type: ignore[union-attr]
    assert a.entries.pop_new_conflicts() == ["k"] and b.entries.pop_new_conflicts() == ["k"]
    a.entries.pop_changes()
    b.entries.pop_changes()
    a.entries.set_strategy(Strategy("origin-priority", (A, B)))
    assert a.entries.strategy == Strategy("origin-priority", (A, B))
    assert [(c.key, c.value, c.previous) for c in a.entries.pop_changes()] == [("k", '"from-a"', '"from-b"')]
    sync(a, b)
    assert b.entries.strategy.name == "origin-priority"
    for node in (a, b):
        entry = node.entries.get("k")
        assert entry is not None and entry.value == '"from-a"' and entry.writer == A
        assert [s.writer for s in entry.conflicts] == [B]
    assert [(c.key, c.value) for c in b.entries.pop_changes()] == [("k", '"from-a"')]
    assert a.entries.pop_new_conflicts() == []  # still the same conflict, not a new one


def test_a_malformed_strategy_reads_as_the_default() -> None:
    """A hostile peer's garbage strategy is read the same way (the default) everywhere."""
    assert Strategy.parse({"name": "chaos"}) == Strategy()
    assert Strategy.parse({"name": "origin-priority", "priority": [1, 2]}) == Strategy()
    assert Strategy.parse("latest-wins") == Strategy()
    assert Strategy.parse({"name": "origin-priority", "priority": ["x"]}) == Strategy("origin-priority", ("x",))  # type: ignore[arg-type]
    with pytest.raises(EntryError):
        Node(A, ms=1).entries.set_strategy(Strategy("chaos"))


def test_an_older_concurrent_write_arriving_changes_nothing_visible() -> None:
    """A losing concurrent write makes a conflict but no change record on the winner's node."""
    a, b = Node(A, ms=1_000_000), Node(B, ms=2_000_000)
    a.entries.set("k", '"old"')
    b.entries.set("k", '"new"')
    b.entries.pop_changes()
    sync(a, b)
    assert b.entries.pop_changes() == []
    assert [s.value for s in b.entries.get("k").conflicts] == ['"old"']  # type: ignore[union-attr]
    assert a.entries.pop_changes() == [EntryChange("k", '"new"', B, b.clock.latest)]


@pytest.mark.parametrize("reverse", [False, True])
def test_a_key_absent_before_and_after_a_remote_update_has_no_change_in_either_order(reverse: bool) -> None:
    """
    pycrdt reports one transaction's slots in no fixed order. b holds k absent (its tombstone
    beats a's older live slot); a's update replaces a's slot with a later tombstone and deletes
    b's. Taken slot by slot, one order shows a's live slot for a moment: that must not leave a
    deletion of a key that was never visible.
    """
    a, b = Node(A, ms=1_000_000), Node(B, ms=1_000_000)
    a.entries.set("k", '"v0"')
    sync(a, b)
    a.entries.set("k", '"x"')  # concurrent with b's deletion, which is later
    b.wall.ms += 1
    assert b.entries.delete("k")
    sync(a, b)
    assert a.entries.get("k") is None and b.entries.get("k") is None
    assert {w: s.value for w, s in b.entries._slots["k"].items()} == {B: None, A: '"x"'}  # type: ignore[union-attr]
    a.wall.ms += 2
    a.entries.set_many([("k", '"y"'), ("k", None)])  # a's tombstone, the latest; b's slot deleted
    a.entries.pop_changes()
    b.entries.pop_changes()
    index_changes = b.entries._index_changes
    b.entries._index_changes = lambda changes: index_changes(dict(sorted(changes.items(), reverse=reverse)))  # type: ignore[method-assign]
    b.receive(a.update_since(b.doc.get_state()))
    assert b.entries.get("k") is None
    assert b.entries.pop_changes() == []


def test_a_key_set_and_deleted_in_one_transaction_has_no_change() -> None:
    """Absent before and after the transaction: nothing to report, locally or on a peer."""
    a, b = Node(A), Node(B)
    a.entries.set("kept", "1")
    a.entries.set_many([("k", "1"), ("k", None)])
    assert [(c.key, c.value) for c in a.entries.pop_changes()] == [("kept", "1")]
    sync(a, b)
    assert [(c.key, c.value) for c in b.entries.pop_changes()] == [("kept", "1")]
    assert a.entries.get("k") is None and b.entries.get("k") is None


def test_malformed_remote_slots_are_ignored() -> None:
    """Bad slots written by a buggy peer never crash reads and never count as entries."""
    good = {"v": "1", "t": format_hlc(1_000, 0)}
    bad: dict[str, Any] = {
        slot_key("int", A): 42,
        slot_key("string", A): "text",
        slot_key("no-t", A): {"v": "1"},
        slot_key("int-t", A): {"v": "1", "t": 5},
        slot_key("short-t", A): {"v": "1", "t": "0001"},
        slot_key("upper-t", A): {"v": "1", "t": "00000000000A0000"},
        slot_key("number-v", A): {"v": 1.5, "t": good["t"]},
        slot_key("no-v", A): {"t": good["t"]},
        slot_key("false-deleted", A): {"t": good["t"], "deleted": False},
        slot_key("nested", A): Map(good),
        slot_key("mixed", A): 7,
        "no separator": good,
        SEPARATOR + "node-a": good,
        "k" + SEPARATOR: good,
        "a" + SEPARATOR + "b" + SEPARATOR + "node-a": good,
        slot_key("ok", A): good,
        slot_key("mixed", B): good,
    }
    remote: Doc[Any] = Doc()
    remote_root = remote.get(ENTRIES_ROOT, type=Map)
    with remote.transaction():
        for name, value in bad.items():
            remote_root[name] = value
    update = remote.get_update()
    local = Node(C)  # indexes the slots as they arrive
    local.receive(update)
    late_doc: Doc[Any] = Doc()
    late_doc.apply_update(update)
    late = EntryMap(late_doc, C, Clock())  # indexes the slots already there
    for entries in (local.entries, late):
        assert entries.keys() == ["mixed", "ok"] and len(entries) == 2
        assert entries.get("int") is None and entries.get("nested") is None
        assert entries.get("mixed") == Entry("mixed", "1", good["t"], B)
        assert [e.key for e in entries.entries()] == ["mixed", "ok"] and entries.conflicts() == []
    local.entries.set("mixed", "2")
    assert local.entries.get("mixed") == Entry("mixed", "2", local.clock.latest, C)


def test_text_root_syncs_untouched_alongside_entries() -> None:
    """A Y.Text root in the same doc is neither read nor disturbed by the entry map."""
    a, b = Node(A), Node(B)
    text_a = a.doc.get("notes", type=Text)
    text_a += "hello"
    a.entries.set("k", "1")
    sync(a, b)
    text_b = b.doc.get("notes", type=Text)
    text_b += " world"
    b.entries.set("k", "2")
    sync(a, b)
    assert str(text_a) == str(text_b) == "hello world"
    assert state(a.entries) == state(b.entries) and a.entries.get("k").value == "2"  # type: ignore[union-attr]
    assert a.entries.pop_changes()[-1].value == "2"


# -- property: convergence and index consistency -------------------------------------------------

_op = st.tuples(
    st.integers(0, 2),  # node
    st.sampled_from(["a", "b", "c"]),  # key
    st.one_of(st.none(), st.integers(0, 9).map(str)),  # value; None deletes
    st.integers(0, 3),  # wall clock step in ms
    st.booleans(),  # sync everyone afterwards
)


@settings(max_examples=40, deadline=None)
@given(st.lists(_op, max_size=25))
def test_random_histories_converge_and_keep_the_index_exact(ops: list[tuple[int, str, str | None, int, bool]]) -> None:
    """After any history and a full sync, all nodes agree, and each index equals a fresh one."""
    nodes = [Node(A, ms=1_000), Node(B, ms=1_000), Node(C, ms=1_000)]
    for index, key, value, step, sync_after in ops:
        node = nodes[index]
        node.wall.ms += step
        if value is None:
            node.entries.delete(key)
        else:
            node.entries.set(key, value)
        if sync_after:
            sync(*nodes)
    sync(*nodes)
    expected = state(nodes[0].entries)
    for node in nodes:
        rebuilt = EntryMap(node.doc, node.node_id, Clock())
        assert state(node.entries) == state(rebuilt) == expected
        assert len(node.entries) == len(rebuilt) == len(expected)
        assert node.entries.conflicts() == rebuilt.conflicts()
        changes = {c.key: c for c in node.entries.pop_changes()}
        for key in changes:
            entry = node.entries.get(key)
            assert changes[key].value == (entry.value if entry else None)


# -- the raw observer ---------------------------------------------------------------------------


def test_index_failure_is_raised_after_the_transaction_commits_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """An indexing error (a bug) is raised by the transaction, as pycrdt's own observers do, and
    the transaction still committed whole: its update is produced and the next events index."""
    a, b = Node(A), Node(B)
    a.entries.set("k", '"v1"')
    captured: list[bytes] = []
    sub = b.doc.observe(lambda event: captured.append(event.update))

    def broken(changes: Any) -> None:
        raise RuntimeError("index bug")

    with monkeypatch.context() as patch:
        patch.setattr(b.entries, "_index_changes", broken)
        with pytest.raises(ExceptionGroup) as raised:
            b.receive(a.update_since(b.doc.get_state()))
    assert [str(e) for e in raised.value.exceptions] == ["index bug"]
    assert len(captured) == 1, "the transaction's update was still produced"
    assert b.doc.get(ENTRIES_ROOT, type=Map)[slot_key("k", A)]["v"] == '"v1"'
    a.entries.set("k2", '"v2"')
    b.receive(a.update_since(b.doc.get_state()))
    assert b.entries.get("k2") is not None and b.entries.get("k2").value == '"v2"'  # type: ignore[union-attr]
    b.doc.unobserve(sub)


def test_own_writes_are_indexed_once_and_a_peer_slot_in_the_same_key_still_is() -> None:
    """A write indexes its slot at once (the observer skips it); a peer's slot of that key arriving
    later is indexed by the observer, and both stay visible as a conflict when concurrent."""
    a, b = Node(A), Node(B)
    a.entries.set("k", '"from-a"')
    b.entries.set("k", '"from-b"')
    assert [e.value for e in state(b.entries)] == ['"from-b"']
    sync(a, b)
    entry_a, entry_b = a.entries.get("k"), b.entries.get("k")
    assert entry_a == entry_b and entry_a is not None
    assert {entry_a.writer, *(s.writer for s in entry_a.conflicts)} == {A, B}


def loaded(updates: Iterable[bytes]) -> EntryMap:
    """An entry map built over a doc that already holds ``updates`` (the index is loaded, not observed)."""
    doc: Doc[Any] = Doc()
    for update in updates:
        doc.apply_update(update)
    return EntryMap(doc, NodeId("observer"), Clock(Wall(0)))


def test_a_conflict_shrinks_slot_by_slot_and_reads_as_a_rebuilt_index() -> None:
    """Three concurrent slots, then two, then one: observed and loaded indexes agree at every step."""
    a, b, c = Node(A, ms=1_000), Node(B, ms=2_000), Node(C, ms=3_000)
    for node in (a, b, c):
        node.entries.set("k", f'"{node.node_id}"')
    only_b, only_c = b.doc.get_update(), c.doc.get_update()
    sync(a, b, c)
    watcher_doc: Doc[Any] = Doc()
    watcher = EntryMap(watcher_doc, NodeId("observer"), Clock(Wall(0)))
    watcher_doc.apply_update(a.doc.get_update())
    got = watcher.get("k")
    assert got is not None and got.writer == C and [s.writer for s in got.conflicts] == [B, A]
    # d sees only b's and c's slots, so its write replaces those two and a's slot stays.
    d = Node(NodeId("node-d"), ms=4_000)
    d.receive(only_b, only_c)
    d.entries.set("k", '"d"')
    watcher_doc.apply_update(d.update_since(watcher_doc.get_state()))
    got = watcher.get("k")
    assert got is not None and (got.value, [s.writer for s in got.conflicts]) == ('"d"', [A])
    assert state(watcher) == state(loaded([watcher_doc.get_update()]))
    assert watcher.conflicts() == [got]
    # a sees everything: its write leaves one slot.
    a.receive(d.update_since(a.doc.get_state()))
    a.wall.ms = 5_000
    a.entries.set("k", '"last"')
    watcher_doc.apply_update(a.update_since(watcher_doc.get_state()))
    assert watcher.get("k") == Entry("k", '"last"', a.clock.latest, A)
    assert watcher.conflicts() == [] and len(watcher) == 1
    assert state(watcher) == state(loaded([watcher_doc.get_update()]))
    assert a.entries.delete("k") is True
    watcher_doc.apply_update(a.update_since(watcher_doc.get_state()))
    assert watcher.get("k") is None and watcher.keys() == [] and len(watcher) == 0


def test_a_writer_id_is_held_once_however_many_slots_it_wrote() -> None:
    """The index shares one string per writer, not one per slot (memory at 100,000 keys)."""
    b = Node(NodeId("".join(["node-", "b"])))
    b.entries.set_many([(f"k{i}", str(i)) for i in range(3)])
    for entries in (fresh([b.doc.get_update()]), loaded([b.doc.get_update()])):
        writers = [entries.get(f"k{i}").writer for i in range(3)]  # type: ignore[union-attr]
        assert writers == [B] * 3
        assert writers[0] is writers[1] is writers[2]


def test_joining_update_moves_the_clock_past_its_newest_acceptable_timestamp() -> None:
    """
    New keys arriving in one update are indexed at once; the clock ends past the newest of their
    timestamps, and one too far ahead (refused by the clock) does not keep it from the others.
    """
    wall = Wall(1_000_000)
    source: Doc[Any] = Doc()
    raw = source.get(ENTRIES_ROOT, type=Map)
    near = [format_hlc(1_000_000 + i, 0) for i in range(50)]
    far = format_hlc(1_000_000 + 86_400_001, 0)
    with source.transaction():
        for i, t in enumerate(near):
            raw[slot_key(f"k{i}", NodeId("p"))] = {"v": str(i), "t": t}
        raw[slot_key("far", NodeId("p"))] = {"v": "1", "t": far}
    doc: Doc[Any] = Doc()
    clock = Clock(wall)
    entries = EntryMap(doc, NodeId("r"), clock)
    doc.apply_update(source.get_update())
    assert len(entries) == 51
    assert clock.latest == max(near)
    assert {c.key for c in entries.pop_changes()} == {f"k{i}" for i in range(50)} | {"far"}
    entries.close()


_group = st.tuples(
    st.integers(0, 2),  # node
    st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.one_of(st.none(), st.integers(0, 9).map(str))), max_size=4),
    st.booleans(),  # sync everyone afterwards
)


@settings(max_examples=40, deadline=None)
@given(st.lists(_group, max_size=12))
def test_writes_grouped_in_one_exclusive_transaction_keep_the_index_exact(
    groups: list[tuple[int, list[tuple[str, str | None]], bool]],
) -> None:
    """
    Writes grouped in ``EntryMap.transaction()`` (the observer skips its event: each write was
    indexed as it was made), the same key written twice in one, deletions and peers' slots
    replaced: every index still equals one rebuilt from the document.
    """
    nodes = [Node(A, ms=1_000), Node(B, ms=1_000), Node(C, ms=1_000)]
    for index, items, sync_after in groups:
        node = nodes[index]
        node.wall.ms += 1
        with node.entries.transaction(origin="local"):
            for key, value in items:
                node.entries.set_many([(key, value)])
        rebuilt = EntryMap(node.doc, node.node_id, Clock())
        assert state(node.entries) == state(rebuilt)
        assert len(node.entries) == len(rebuilt)
        rebuilt.close()
        if sync_after:
            sync(*nodes)
    sync(*nodes)
    expected = state(nodes[0].entries)
    for node in nodes:
        assert state(node.entries) == expected
        assert node.entries.conflicts() == EntryMap(node.doc, node.node_id, Clock()).conflicts()


def test_a_transaction_nested_in_another_indexes_what_else_it_holds() -> None:
    """Inside a transaction opened elsewhere (here one that also applies a peer's update), the
    observer indexes the event as usual: the peer's slots are not lost."""
    a, b = Node(A), Node(B)
    a.entries.set("from-a", "1")
    with b.doc.transaction(origin="mixed"):
        b.doc.apply_update(a.update_since(b.doc.get_state()))
        with b.entries.transaction(origin="mixed"):
            b.entries.set("from-b", "2")
    assert {e.key for e in state(b.entries)} == {"from-a", "from-b"}
    assert state(b.entries) == state(EntryMap(b.doc, B, Clock()))
    with pytest.raises(RuntimeError), b.entries.transaction(origin="local"):
        b.entries.set("k", "3")
        raise RuntimeError("the caller failed")
    assert b.entries.get("k") is not None  # written and committed before the error
    a.entries.set("late", "4")  # after the error, a peer's write is indexed again
    b.receive(a.update_since(b.doc.get_state()))
    assert b.entries.get("late") is not None
    assert state(b.entries) == state(EntryMap(b.doc, B, Clock()))


def test_tombstones_count_deleted_keys_whoever_deleted_them() -> None:
    """``tombstones``: keys whose winning slot is a deletion, local or remote; a later write revives one."""
    a, b = Node(A), Node(B)
    for key in ("x", "y", "z"):
        a.entries.set(key, "1")
    assert (len(a.entries), a.entries.tombstones) == (3, 0)
    a.entries.delete("x")
    a.entries.delete("y")
    assert (len(a.entries), a.entries.tombstones) == (1, 2)
    sync(a, b)
    assert (len(b.entries), b.entries.tombstones) == (1, 2)
    b.wall.ms += 10
    b.entries.set("x", "2")  # a later write beats the tombstone
    b.entries.delete("z")
    sync(a, b)
    for node in (a, b):
        assert (len(node.entries), node.entries.tombstones) == (1, 2)
        assert EntryMap(node.doc, node.node_id, Clock()).tombstones == 2  # a rebuilt index agrees


@pytest.mark.parametrize("key, value", [("k\udc80", '"v"'), ("k", '"v\ud800"')])
def test_lone_surrogates_are_refused_before_pycrdt_sees_them(key: str, value: str) -> None:
    """pycrdt panics on a string UTF-8 cannot encode: the entry map refuses it with EntryError, and
    a key another writer holds is left as it was (nothing half-written)."""
    a, b = Node(A), Node(B)
    b.entries.set("k", '"from-b"')
    sync(a, b)
    for write in (lambda: a.entries.set(key, value), lambda: a.entries.set_many([("other", "1"), (key, value)])):
        with pytest.raises(EntryError, match="lone surrogate"):
            write()
    assert a.entries.get("k") == b.entries.get("k") and a.entries.get("other") is None
    assert state(a.entries) == state(EntryMap(a.doc, A, Clock()))
