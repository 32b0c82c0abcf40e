"""
Tests of the store's schema versions 2 and 3 (ctxsync/store.py, sql/migrations/0[23]-*.sql): history,
lineage, context reset, snapshots, webhooks, their sealing and the migration from version 1.

Real SQLite files in tmp_path, real ciphers (ctxsync.seal) and real Yjs updates from pycrdt.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pycrdt
import pytest

import ctxsync
from ctxsync import store as store_module
from ctxsync.errors import StoreError
from ctxsync.seal import AeadCipher, ChecksumCipher
from ctxsync.store import (
    LEGACY_LINEAGE,
    HistoryPage,
    Store,
    StoredSnapshot,
    StoredWebhook,
    migrate,
    schema_version,
)
from ctxsync.types import DocId

CTX = DocId("notes")
OTHER = DocId("other")
KEY = bytes(range(32))


class Writer:
    """A real pycrdt document whose every transaction's update is recorded."""

    def __init__(self) -> None:
        self.doc: pycrdt.Doc[Any] = pycrdt.Doc()
        self.entries = self.doc.get("entries", type=pycrdt.Map)
        self.updates: list[bytes] = []
        self.doc.observe(lambda event: self.updates.append(event.update))

    def set(self, key: str, value: Any) -> bytes:
        n = len(self.updates)
        self.entries[key] = json.dumps(value)
        assert len(self.updates) == n + 1
        return self.updates[-1]

    def set_many(self, values: dict[str, Any]) -> bytes:
        n = len(self.updates)
        with self.doc.transaction():
            for key, value in values.items():
                self.entries[key] = json.dumps(value)
        assert len(self.updates) == n + 1
        return self.updates[-1]


def record(key: str, value: Any, previous: Any = None, *, t_ms: int = 1_700_000_000_000) -> dict[str, Any]:
    """A history record as the mesh writes it (values are JSON text or None)."""
    return {
        "t_ms": t_ms,
        "origin": "node-a",
        "key": key,
        "value": None if value is None else json.dumps(value),
        "previous": None if previous is None else json.dumps(previous),
        "hlc": f"{t_ms}:0:node-a",
    }


def rebuild(updates: list[bytes]) -> dict[str, Any]:
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    for update in updates:
        doc.apply_update(update)
    entries: dict[str, Any] = doc.get("entries", type=pycrdt.Map).to_py()
    return entries


def versions(page: HistoryPage) -> list[tuple[int, int]]:
    return [(r.version, r.idx) for r in page.records]


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of the store (database, WAL, shared memory) that exists, by name."""
    return {p.name: p.read_bytes() for p in path.parent.glob(path.name + "*")}


def history_rows(path: Path, doc_id: str = CTX) -> list[tuple[int, int]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(
            "SELECT version, idx FROM history WHERE doc_id = ? ORDER BY version, idx", (doc_id,)
        ).fetchall()


# -- 1. history read back ------------------------------------------------------------------


async def test_history_reads_newest_cursor_key_and_limit_and_survives_reopen(tmp_path: Path) -> None:
    """read_history: newest N without since, oldest first after a cursor, by key, limited; durable."""
    path, writer = tmp_path / "store.db", Writer()
    async with Store(path) as store:
        for v in range(1, 11):
            key = "even" if v % 2 == 0 else "odd"
            await store.append(
                CTX, v, writer.set(key, v), history=[(0, record(key, v, v - 2 if v > 2 else None))]
            )
        # one version with two changes
        await store.append(
            CTX,
            11,
            writer.set_many({"odd": 11, "even": 11}),
            history=[(0, record("odd", 11)), (1, record("even", 11))],
        )

    async with Store(path) as store:
        newest = await store.read_history(CTX, limit=3)
        assert versions(newest) == [(10, 0), (11, 0), (11, 1)], "newest 3, oldest first"
        assert newest.history_from == 1
        assert newest.records[0].record == record("even", 10, 8)

        everything = await store.read_history(CTX)
        assert versions(everything) == [(v, 0) for v in range(1, 12)] + [(11, 1)]

        after = await store.read_history(CTX, since=4, limit=3)
        assert versions(after) == [(5, 0), (6, 0), (7, 0)], "a cursor gives the oldest after it"
        rest = await store.read_history(CTX, since=after.records[-1].version, limit=100)
        assert versions(rest) == [(8, 0), (9, 0), (10, 0), (11, 0), (11, 1)]
        assert versions(await store.read_history(CTX, since=11)) == []

        evens = await store.read_history(CTX, key="even", limit=2)
        assert versions(evens) == [(10, 0), (11, 1)], "newest 2 of that key"
        assert all(r.record["key"] == "even" for r in evens.records)
        odds_after = await store.read_history(CTX, key="odd", since=2, limit=2)
        assert versions(odds_after) == [(3, 0), (5, 0)], "oldest 2 of that key after the cursor"
        assert versions(await store.read_history(CTX, key="missing")) == []

        unknown = await store.read_history(DocId("nowhere"))
        assert unknown.records == [] and unknown.history_from == 1

        (loaded,) = await store.load_all()
        assert loaded.version == 11 and rebuild(loaded.updates) == {"odd": "11", "even": "11"}


# -- 2. and 3. the bound and history_from ----------------------------------------------------


async def test_history_is_bounded_and_history_from_marks_the_cut(tmp_path: Path) -> None:
    """With history_limit=5, 12 one-record versions keep the newest 5 and history_from = 8."""
    path, writer = tmp_path / "store.db", Writer()
    async with Store(path, history_limit=5) as store:
        for v in range(1, 13):
            await store.append(CTX, v, writer.set("k", v), history=[(0, record("k", v))])
            # Pruned in steps: never more than the limit + 10% (at least one) rows stored.
            assert min(v, 5) <= len(history_rows(path)) <= min(v, 6), f"bound after version {v}"
        page = await store.read_history(CTX, since=0, limit=100)
    assert versions(page) == [(v, 0) for v in range(8, 13)]
    assert page.history_from == 8
    # A reader at cursor 3 sees that versions 4..7 are gone; one at 7 does not.
    assert 3 < page.history_from - 1 and not 7 < page.history_from - 1

    async with Store(path, history_limit=5) as store:
        (loaded,) = await store.load_all()
        again = await store.read_history(CTX, since=0)
        # the bound holds across a reopen (the count is recomputed)
        await store.append(CTX, 13, writer.set("k", 13), history=[(0, record("k", 13))])
        after = await store.read_history(CTX, since=0)
    assert loaded.history_from <= 8 and loaded.version == 12  # the stored mark lags by the prune step
    assert versions(again) == versions(page) and again.history_from == 8
    assert versions(after) == [(v, 0) for v in range(9, 14)] and after.history_from == 9


async def test_missed_through_moves_history_from_past_a_version_never_stored(tmp_path: Path) -> None:
    """
    An append that says an earlier version's records will never come (its update was dropped)
    moves history_from past that version in its own transaction, even with no records of its own.
    """
    path, writer = tmp_path / "store.db", Writer()
    async with Store(path) as store:
        await store.append(CTX, 1, writer.set("k", 1), history=[(0, record("k", 1))])
        await store.append(CTX, 3, writer.set("k", 3), missed_through=2)  # version 2 never reached the store
        page = await store.read_history(CTX, since=0)
    assert page.history_from == 3 and versions(page) == [(1, 0)]  # what is kept stays readable; cursors are told of the gap
    async with Store(path) as store:
        again = await store.read_history(CTX, since=0)
        await store.append(CTX, 4, writer.set("k", 4), history=[(0, record("k", 4))], missed_through=1)  # an older gap: no move back
        after = await store.read_history(CTX, since=0)
    assert again.history_from == 3
    assert after.history_from == 3 and versions(after) == [(1, 0), (4, 0)]


async def test_cut_inside_a_version_moves_history_from_past_it(tmp_path: Path) -> None:
    """A cut that keeps only part of a version's records makes history_from that version + 1."""
    path, writer = tmp_path / "store.db", Writer()
    async with Store(path, history_limit=5) as store:
        await store.append(
            CTX,
            1,
            writer.set_many({"a": 1, "b": 1, "c": 1}),
            history=[(i, record(k, 1)) for i, k in enumerate("abc")],
        )
        page = await store.read_history(CTX, since=0)
        assert versions(page) == [(1, 0), (1, 1), (1, 2)] and page.history_from == 1
        await store.append(
            CTX,
            2,
            writer.set_many({"a": 2, "b": 2, "c": 2}),
            history=[(i, record(k, 2)) for i, k in enumerate("abc")],
        )
        page = await store.read_history(CTX, since=0)
    assert versions(page) == [(1, 1), (1, 2), (2, 0), (2, 1), (2, 2)], "newest 5 records kept"
    assert page.history_from == 2, "version 1 lost its record 0: it is no longer whole"
    async with Store(path, history_limit=5) as store:
        (loaded,) = await store.load_all()
        reread = await store.read_history(CTX, since=0)
    assert reread.history_from == 2 and loaded.version == 2


async def test_cut_at_a_version_boundary_keeps_that_version(tmp_path: Path) -> None:
    """A cut right before a version's record 0 makes history_from that version."""
    path, writer = tmp_path / "store.db", Writer()
    async with Store(path, history_limit=4) as store:
        for v in (1, 2, 3):
            await store.append(
                CTX, v, writer.set_many({"a": v, "b": v}), history=[(0, record("a", v)), (1, record("b", v))]
            )
        page = await store.read_history(CTX, since=0)
    assert versions(page) == [(2, 0), (2, 1), (3, 0), (3, 1)]
    assert page.history_from == 2


async def test_version_whose_first_records_were_left_out_moves_history_from(tmp_path: Path) -> None:
    """A first idx above 0 says earlier records of that version are missing: history_from passes it."""
    path, writer = tmp_path / "store.db", Writer()
    async with Store(path) as store:
        await store.append(CTX, 1, writer.set("a", 1), history=[(0, record("a", 1))])
        assert (await store.read_history(CTX)).history_from == 1
        await store.append(
            CTX,
            2,
            writer.set_many({"a": 2, "b": 2, "c": 2}),
            history=[(2, record("c", 2)), (3, record("d", 2))],
        )
        page = await store.read_history(CTX, since=0)
        assert versions(page) == [(1, 0), (2, 2), (2, 3)]
        assert page.history_from == 3
        await store.append(CTX, 3, writer.set("a", 3), history=[(0, record("a", 3))])
        assert (await store.read_history(CTX)).history_from == 3, "a whole version does not move it back"
        # An append without history records says nothing about the history.
        await store.append(CTX, 4, writer.set("a", 4))
        assert (await store.read_history(CTX)).history_from == 3
        # Several appends committed in one batch: the gap of the later one wins.
        await asyncio.gather(
            store.append_nowait(CTX, 5, writer.set("a", 5), history=[(1, record("a", 5))]),
            store.append_nowait(CTX, 6, writer.set("a", 6), history=[(0, record("a", 6))]),
            store.append_nowait(CTX, 7, writer.set("a", 7), history=[(4, record("a", 7))]),
        )
        assert (await store.read_history(CTX)).history_from == 8
    async with Store(path) as store:
        (loaded,) = await store.load_all()
    assert loaded.history_from == 8 and loaded.version == 7


async def test_rewritten_history_records_do_not_fail_the_append(tmp_path: Path) -> None:
    """
    history rows are written with INSERT OR REPLACE, so re-writing a version's records must
    neither break the bound nor fail the append (that would lose its update too).
    """
    path, writer = tmp_path / "store.db", Writer()
    async with Store(path, history_limit=5) as store:
        for i in range(8):
            try:
                await store.append(CTX, 1, writer.set("k", i), history=[(0, record("k", i))])
            except Exception as exc:  # noqa: BLE001 - the failure is what this test reports
                pytest.fail(
                    "BUG ctxsync/store.py Store._add_history: the cached history row count"
                    " (_history_rows) adds every record, also one that INSERT OR REPLACE only"
                    " replaced; once the count passes history_limit while fewer rows exist,"
                    " the OFFSET query returns None and unpacking it raises"
                    f" ({type(exc).__name__}: {exc}), failing the append {i} and losing its update"
                )
        page = await store.read_history(CTX, since=0)
        (loaded,) = await store.load_all()
    assert versions(page) == [(1, 0)] and page.records[0].record["value"] == json.dumps(7)
    assert len(loaded.updates) == 8 and rebuild(loaded.updates) == {"k": "7"}


# -- 4. atomicity and version ----------------------------------------------------------------


async def test_update_and_history_commit_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An append's update and history records are committed in one transaction: both or neither."""
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_S", 0.05)
    path, writer = tmp_path / "store.db", Writer()
    async with Store(path) as store:
        await store.append(CTX, 1, writer.set("a", 1), history=[(0, record("a", 1))])
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # holds the write lock: the next commit fails
            failed = writer.set("b", 2)
            with pytest.raises(StoreError):
                await store.append(CTX, 2, failed, history=[(0, record("b", 2))])
            blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        await asyncio.gather(
            store.append_nowait(CTX, 3, writer.set("c", 3), history=[(0, record("c", 3))]),
            store.append_nowait(
                CTX,
                4,
                writer.set_many({"c": 4, "d": 4}),
                history=[(0, record("c", 4, 3)), (1, record("d", 4))],
            ),
        )
    async with Store(path) as store:
        (loaded,) = await store.load_all()
        page = await store.read_history(CTX, since=0)
    assert versions(page) == [(1, 0), (3, 0), (4, 0), (4, 1)], "no history of the failed append"
    assert failed not in loaded.updates, "no update of the failed append"
    assert len(loaded.updates) == 3
    assert rebuild(loaded.updates) == {"a": "1", "c": "4", "d": "4"}
    assert loaded.version == 4


async def test_version_is_the_highest_stored_after_reload_and_compaction(tmp_path: Path) -> None:
    """StoredContext.version is the max version stored (log, checkpoint), also after a compaction."""
    path, writer = tmp_path / "store.db", Writer()
    updates = [writer.set(f"k{v}", v) for v in range(1, 8)]
    async with Store(path, compact_threshold=3) as store:
        # committed in one batch, in another order than their versions
        await asyncio.gather(*(store.append_nowait(CTX, v, updates[v - 1]) for v in (2, 1, 3)))
        for v in range(4, 8):
            await store.append(CTX, v, updates[v - 1])
        assert store.stats().compactions >= 1
    async with Store(path, compact_threshold=3) as store:
        (loaded,) = await store.load_all()
        assert loaded.version == 7
        assert await store.compact(CTX) in (True, False)
        (compacted,) = await store.load_all()
    assert compacted.version == 7 and len(compacted.updates) == 1
    assert rebuild(compacted.updates) == {f"k{v}": str(v) for v in range(1, 8)}


# -- 5. lineage and reset ------------------------------------------------------------------


async def test_lineage_is_set_by_the_first_append_only(tmp_path: Path) -> None:
    """The lineage given with the context's first append is kept; later ones do not change it."""
    path, writer, other = tmp_path / "store.db", Writer(), Writer()
    async with Store(path) as store:
        await store.append(CTX, 1, writer.set("a", 1), lineage="L1")
        await store.append(CTX, 2, writer.set("a", 2), lineage="L9")
        # two appends creating a context in one batch: the first one's lineage
        await asyncio.gather(
            store.append_nowait(OTHER, 1, other.set("x", 1), lineage="M1"),
            store.append_nowait(OTHER, 2, other.set("x", 2), lineage="M2"),
        )
        await store.append(DocId("plain"), 1, Writer().set("p", 1))
        by_id = {c.doc_id: c for c in await store.load_all()}
    assert (by_id[CTX].lineage, by_id[OTHER].lineage, by_id[DocId("plain")].lineage) == (
        "L1",
        "M1",
        LEGACY_LINEAGE,
    )
    async with Store(path) as store:
        await store.append(CTX, 3, writer.set("a", 3), lineage="L7")
        by_id = {c.doc_id: c for c in await store.load_all()}
    assert by_id[CTX].lineage == "L1" and by_id[OTHER].lineage == "M1"
    assert by_id[CTX].version == 3 and rebuild(by_id[CTX].updates) == {"a": "3"}


async def test_reset_context_drops_content_keeps_history_and_versions(tmp_path: Path) -> None:
    """reset_context: no log or checkpoint, history kept, new lineage, version >= base_version."""
    path, writer = tmp_path / "store.db", Writer()
    async with Store(path) as store:
        for v in range(1, 6):
            await store.append(CTX, v, writer.set("k", v), lineage="L1", history=[(0, record("k", v))])
        assert await store.compact(CTX) is True  # a checkpoint
        await store.append(
            CTX, 6, writer.set("k", 6), lineage="L1", history=[(0, record("k", 6))]
        )  # and a log row
        await store.append(OTHER, 1, Writer().set("o", 1), lineage="O1")
        await store.reset_context(CTX, "L2", base_version=6)
        reset = await store.load(CTX)
        assert reset is not None and reset.updates == [] and reset.lineage == "L2" and reset.version >= 6
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM updates WHERE doc_id = ?", (CTX,)).fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM checkpoints WHERE doc_id = ?", (CTX,)).fetchone()[0] == 0

    async with Store(path) as store:
        by_id = {c.doc_id: c for c in await store.load_all()}
        page = await store.read_history(CTX, since=0)
        assert by_id[CTX].updates == [] and by_id[CTX].lineage == "L2" and by_id[CTX].version >= 6
        assert versions(page) == [(v, 0) for v in range(1, 7)], "history stays"
        assert by_id[OTHER].lineage == "O1" and rebuild(by_id[OTHER].updates) == {"o": "1"}, (
            "others untouched"
        )
        # the context goes on under its new lineage
        fresh = Writer()
        await store.append(CTX, 7, fresh.set("new", 7), lineage="L3", history=[(0, record("new", 7))])
        # a lower base_version never moves versions back
        await store.reset_context(OTHER, "O2", base_version=0)
        await store.reset_context(OTHER, "O3", base_version=9)
        await store.reset_context(OTHER, "O4", base_version=2)
        # resetting an unknown context creates it
        await store.reset_context(DocId("adopted"), "A1", base_version=0)
    async with Store(path) as store:
        by_id = {c.doc_id: c for c in await store.load_all()}
    assert (
        by_id[CTX].lineage == "L2" and by_id[CTX].version == 7 and rebuild(by_id[CTX].updates) == {"new": "7"}
    )
    assert by_id[OTHER].lineage == "O4" and by_id[OTHER].version == 9 and by_id[OTHER].updates == []
    assert (by_id[DocId("adopted")].lineage, by_id[DocId("adopted")].updates) == ("A1", [])


# -- 6. migration from schema version 1 ----------------------------------------------------


def make_v1_store(path: Path) -> dict[str, dict[str, Any]]:
    """
    Write a schema version 1 store as a ctxsync from before schema 2 did (CRC-32 sealed blobs,
    no meta.cipher): context "a" with a log (versions 1..3), "b" with a checkpoint (version 7)
    plus a log (8, 9), "c" empty, "d" a checkpoint only (version 4). Returns the entries of each.
    """
    schema = (Path(ctxsync.__file__).parent / "sql" / "schema" / "01-tables.sql").read_text("utf-8")
    crc = ChecksumCipher()
    conn = sqlite3.connect(path, isolation_level=None)
    expected: dict[str, dict[str, Any]] = {}
    try:
        assert migrate(conn, schema, []) == 1
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1

        def add_log(doc_id: str, writer: Writer, vs: range) -> None:
            for v in vs:
                update = writer.set(f"{doc_id}{v}", v)
                conn.execute(
                    "INSERT INTO updates (doc_id, version, data) VALUES (?, ?, ?)",
                    (doc_id, v, crc.seal(update, doc_id.encode())),
                )

        def add_checkpoint(doc_id: str, writer: Writer, version: int) -> None:
            upto = conn.execute("SELECT coalesce(max(seq), 0) FROM updates").fetchone()[0]
            conn.execute(
                "INSERT INTO checkpoints (doc_id, data, state_vector, version, upto_seq) VALUES (?, ?, ?, ?, ?)",
                (
                    doc_id,
                    crc.seal(writer.doc.get_update(), doc_id.encode()),
                    crc.seal(writer.doc.get_state(), doc_id.encode()),
                    version,
                    upto,
                ),
            )
            conn.execute("DELETE FROM updates WHERE doc_id = ? AND seq <= ?", (doc_id, upto))

        for doc_id in "abcd":
            conn.execute(
                "INSERT INTO contexts (doc_id, created_at_ms) VALUES (?, ?)", (doc_id, 1_600_000_000_000)
            )
        wa, wb, wd = Writer(), Writer(), Writer()
        add_log("a", wa, range(1, 4))
        add_log("b", wb, range(1, 8))
        add_checkpoint("b", wb, 7)
        add_log("b", wb, range(8, 10))
        for v in range(1, 5):
            wd.set(f"d{v}", v)
        add_checkpoint("d", wd, 4)
        expected = {"a": wa.entries.to_py(), "b": wb.entries.to_py(), "c": {}, "d": wd.entries.to_py()}
    finally:
        conn.close()
    return expected


async def test_version_1_store_migrates_to_legacy_lineage_and_history_from(tmp_path: Path) -> None:
    """A version 1 store opens migrated: lineage 'legacy', history_from = its max version + 1."""
    path = tmp_path / "store.db"
    expected = make_v1_store(path)
    v1_copy = tmp_path / "copy.db"
    v1_copy.write_bytes(path.read_bytes())

    async with Store(path) as store:
        by_id = {c.doc_id: c for c in await store.load_all()}
        pages = {d: await store.read_history(DocId(d), since=0) for d in "abcd"}
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == schema_version() == 4
    assert {d: c.lineage for d, c in by_id.items()} == dict.fromkeys("abcd", LEGACY_LINEAGE)
    assert {d: c.history_from for d, c in by_id.items()} == {"a": 4, "b": 10, "c": 1, "d": 5}
    assert {d: c.version for d, c in by_id.items()} == {"a": 3, "b": 9, "c": 0, "d": 4}
    assert {d: p.history_from for d, p in pages.items()} == {"a": 4, "b": 10, "c": 1, "d": 5}
    assert all(p.records == [] for p in pages.values())
    assert {d: rebuild(c.updates) for d, c in by_id.items()} == expected

    # Writing on: the lineage stays legacy, history starts after the migrated versions.
    writer = Writer()
    for update in by_id[DocId("a")].updates:
        writer.doc.apply_update(update)
    async with Store(path) as store:
        await store.append(DocId("a"), 4, writer.set("a4", 4), lineage="new", history=[(0, record("a4", 4))])
        (a,) = [c for c in await store.load_all() if c.doc_id == "a"]
        page = await store.read_history(DocId("a"), since=0)
    assert a.lineage == LEGACY_LINEAGE and a.version == 4 and a.history_from == 4
    assert versions(page) == [(4, 0)] and page.history_from == 4

    # Migration and re-sealing on one open (a version 1 store opened with a key).
    async with Store(v1_copy, cipher=AeadCipher(KEY)) as store:
        assert store.resealed == 3 + 2 + 2 + 2  # a's log, b's checkpoint, SV and log, d's checkpoint and SV
        by_id = {c.doc_id: c for c in await store.load_all()}
    assert {d: (c.lineage, c.history_from, c.version) for d, c in by_id.items()} == {
        "a": ("legacy", 4, 3), "b": ("legacy", 10, 9), "c": ("legacy", 1, 0), "d": ("legacy", 5, 4)
    }  # fmt: skip
    assert {d: rebuild(c.updates) for d, c in by_id.items()} == expected


# -- 7. snapshots --------------------------------------------------------------------------


def snapshot(sid: str, doc_id: str = CTX, *, t: int, auto: bool, label: str | None = None) -> StoredSnapshot:
    return StoredSnapshot(
        sid,
        DocId(doc_id),
        t,
        t // 10,
        auto,
        {"label": label, "meta": {"by": "test", "n": t}, "reason": "auto" if auto else "named"},
        {"k": json.dumps(f"value at {t}"), "other": json.dumps({"nested": [1, 2, t]})},
    )


async def test_snapshots_put_list_get_delete(tmp_path: Path) -> None:
    """Snapshots round-trip; list leaves entries out; delete reports whether one existed."""
    path = tmp_path / "store.db"
    named = snapshot("s1", t=100, auto=False, label="before the migration")
    auto = snapshot("s2", t=200, auto=True)
    elsewhere = snapshot("s3", OTHER, t=150, auto=False, label="other")
    async with Store(path) as store:
        for s in (named, auto, elsewhere):
            await store.put_snapshot(s)
        with pytest.raises(ValueError):
            await store.put_snapshot(StoredSnapshot("s4", CTX, 1, 1, False, {}, None))
        with pytest.raises(StoreError):
            await store.put_snapshot(snapshot("s1", t=300, auto=False))  # the id is taken
    async with Store(path) as store:
        listed = await store.list_snapshots(CTX)
        every = await store.list_snapshots()
        got = await store.get_snapshot("s1")
        missing = await store.get_snapshot("nope")
        await store.delete_snapshot("s1")  # its return value: test_delete_reports_whether_it_existed
        after = await store.list_snapshots(CTX)
        assert await store.get_snapshot("s1") is None
    assert [s.id for s in listed] == ["s1", "s2"] and [s.id for s in every] == ["s1", "s3", "s2"]
    assert all(s.entries is None for s in every)
    assert listed[0] == StoredSnapshot("s1", CTX, 100, 10, False, named.info, None)
    assert listed[1].auto is True and listed[1].info == auto.info
    assert got == named and missing is None
    assert [s.id for s in after] == ["s2"]
    async with Store(path) as store:
        assert [s.id for s in await store.list_snapshots()] == ["s3", "s2"]


async def test_automatic_snapshot_retention(tmp_path: Path) -> None:
    """snapshot_keep=3 keeps the newest 3 automatic snapshots per context; named ones and other contexts stay."""
    path = tmp_path / "store.db"
    async with Store(path, snapshot_keep=3) as store:
        await store.put_snapshot(snapshot("named-old", t=1, auto=False, label="first"))
        for i in range(5):
            await store.put_snapshot(snapshot(f"other-auto{i}", OTHER, t=10 + i, auto=True))
        assert len(await store.list_snapshots(OTHER)) == 3
        for i in range(6):
            await store.put_snapshot(snapshot(f"auto{i}", t=100 + i, auto=True))
            if i == 2:
                await store.put_snapshot(snapshot("named-mid", t=150, auto=False, label="middle"))
        ids = [s.id for s in await store.list_snapshots(CTX)]
        other_ids = [s.id for s in await store.list_snapshots(OTHER)]
    assert ids == ["named-old", "auto3", "auto4", "auto5", "named-mid"]
    assert other_ids == ["other-auto2", "other-auto3", "other-auto4"], "another context's are its own"
    async with Store(path, snapshot_keep=3) as store:
        # equal creation times (same millisecond): the later written is the newer
        for i in range(4):
            await store.put_snapshot(snapshot(f"same{i}", t=1000, auto=True))
        ids = [s.id for s in await store.list_snapshots(CTX)]
        assert (await store.get_snapshot("named-old")) is not None
    assert ids == ["named-old", "named-mid", "same1", "same2", "same3"]


# -- 8. sealing ----------------------------------------------------------------------------

SECRETS = {
    "history_key": "HISTKEY-5b0e",
    "history_value": "HISTVALUE-93ac",
    "label": "SNAPLABEL-c1d7",
    "entries": "SNAPENTRY-44f2",
    "url": "https://hooks.example/WEBHOOKURL-0a9d",
    "secret": "WEBHOOKSECRET-e6b1",
    "body": "DEADLETTER-7c3f",
}


async def write_everything(store: Store, writer: Writer) -> None:
    hk, hv = SECRETS["history_key"], SECRETS["history_value"]
    for v in range(1, 4):
        await store.append(
            CTX, v, writer.set(f"{hk}-{v}", f"{hv}-{v}"), history=[(0, record(f"{hk}-{v}", f"{hv}-{v}"))]
        )
    await store.put_snapshot(
        StoredSnapshot(
            "snap-1", CTX, 1000, 3, False,
            {"label": SECRETS["label"], "meta": None, "reason": "named"},
            {f"{hk}-1": json.dumps(SECRETS["entries"])},
        )
    )  # fmt: skip
    await store.put_webhook(
        StoredWebhook(
            "hook-1", CTX, 1000, 0, {"url": SECRETS["url"], "prefix": "", "secret": SECRETS["secret"]}
        )
    )
    await store.advance_webhook(
        "hook-1", 3, {"body": {"changes": [SECRETS["body"]]}, "error": "HTTP 500", "attempts": 5}
    )


async def read_everything(store: Store) -> None:
    hk, hv = SECRETS["history_key"], SECRETS["history_value"]
    page = await store.read_history(CTX, since=0)
    assert [(r.record["key"], r.record["value"]) for r in page.records] == [
        (f"{hk}-{v}", json.dumps(f"{hv}-{v}")) for v in range(1, 4)
    ]
    snap = await store.get_snapshot("snap-1")
    assert snap is not None and snap.info["label"] == SECRETS["label"]
    assert snap.entries == {f"{hk}-1": json.dumps(SECRETS["entries"])}
    (hook,) = await store.list_webhooks()
    assert (
        hook.data["url"] == SECRETS["url"] and hook.data["secret"] == SECRETS["secret"] and hook.cursor == 3
    )
    ((_, wid, _, failure),) = await store.list_webhook_failures()
    assert wid == "hook-1" and failure["body"] == {"changes": [SECRETS["body"]]}
    (ctx,) = await store.load_all()
    assert rebuild(ctx.updates) == {f"{hk}-{v}": json.dumps(f"{hv}-{v}") for v in range(1, 4)}


def plaintext_in(files: dict[str, bytes]) -> list[tuple[str, str]]:
    return [(name, s) for name, data in files.items() for s in SECRETS.values() if s.encode() in data]


async def test_history_snapshots_and_webhooks_are_sealed_with_a_key(tmp_path: Path) -> None:
    """With an AeadCipher no history key/value, snapshot label/entries or webhook data is in any file."""
    path, writer = tmp_path / "store.db", Writer()
    async with Store(path, cipher=AeadCipher(KEY)) as store:
        await write_everything(store, writer)
        files_open = store_files(path)
    files_closed = store_files(path)
    assert "store.db-wal" in files_open  # the WAL was looked at, not just the main file
    assert plaintext_in(files_open) == [] and plaintext_in(files_closed) == []
    async with Store(path, cipher=AeadCipher(KEY)) as store:
        await read_everything(store)


async def test_crc_store_with_history_snapshots_webhooks_is_resealed(tmp_path: Path) -> None:
    """A CRC-32 store with history, snapshots and webhooks opened with a key is re-sealed; all reads back."""
    path, writer = tmp_path / "store.db", Writer()
    async with Store(path, cipher=ChecksumCipher()) as store:
        await write_everything(store, writer)
    assert {s for _, s in plaintext_in(store_files(path))} == set(SECRETS.values())  # the premise
    async with Store(path, cipher=AeadCipher(KEY)) as store:
        # 3 updates, 3 history records, snapshot info + entries, a webhook and a failure
        assert store.resealed == 3 + 3 + 2 + 1 + 1
        await read_everything(store)
    assert plaintext_in(store_files(path)) == []
    async with Store(path, cipher=AeadCipher(KEY)) as store:
        assert store.resealed == 0
        await read_everything(store)


# -- 9. webhooks ---------------------------------------------------------------------------


async def test_webhooks_put_list_advance_delete(tmp_path: Path) -> None:
    """Webhooks round-trip; the cursor only moves forward; failures are dead-lettered and deleted with it."""
    path = tmp_path / "store.db"
    one = StoredWebhook("w1", CTX, 100, 0, {"url": "https://a.example/hook", "prefix": "", "secret": "s1"})
    two = StoredWebhook(
        "w2", OTHER, 200, 5, {"url": "https://b.example/hook", "prefix": "cfg/", "secret": "s2"}
    )
    failure = {
        "body": {"context": CTX, "changes": [{"key": "k", "value": "1"}]},
        "error": "timeout",
        "attempts": 3,
    }
    async with Store(path) as store:
        await store.put_webhook(two)
        await store.put_webhook(one)
        assert await store.list_webhooks() == [one, two]
        await store.advance_webhook("w1", 7)
        await store.advance_webhook("w1", 3)  # never back
        await store.advance_webhook("w1", 9, failure)
        await store.advance_webhook("w1", 8, {**failure, "attempts": 4})  # dead-lettered, cursor stays
        await store.advance_webhook("w2", 6, {**failure, "error": "HTTP 410"})
    async with Store(path) as store:
        hooks = {h.id: h for h in await store.list_webhooks()}
        failures = await store.list_webhook_failures("w1")
        every = await store.list_webhook_failures()
        assert hooks["w1"].cursor == 9 and hooks["w2"].cursor == 6
        assert hooks["w1"].data == one.data and hooks["w2"].data == two.data
        assert [f[3] for f in failures] == [failure, {**failure, "attempts": 4}]
        assert all(w == "w1" and t > 0 for _, w, t, _ in failures)
        assert [w for _, w, _, _ in every] == ["w1", "w1", "w2"]
        assert [f[0] for f in every] == sorted(f[0] for f in every)
        # put replaces a webhook with the same id
        await store.put_webhook(StoredWebhook("w2", OTHER, 200, 1, {**two.data, "prefix": "x/"}))
        hooks = {h.id: h for h in await store.list_webhooks()}
        assert hooks["w2"].cursor == 1 and hooks["w2"].data["prefix"] == "x/"
        await store.delete_webhook("w1")  # its return value: test_delete_reports_whether_it_existed
    async with Store(path) as store:
        assert [h.id for h in await store.list_webhooks()] == ["w2"]
        assert await store.list_webhook_failures("w1") == []
        assert [w for _, w, _, _ in await store.list_webhook_failures()] == ["w2"]


async def test_delete_reports_whether_it_existed(tmp_path: Path) -> None:
    """delete_snapshot and delete_webhook return True when they deleted something, False otherwise."""
    async with Store(tmp_path / "store.db") as store:
        await store.put_snapshot(snapshot("s1", t=100, auto=False, label="x"))
        await store.put_webhook(
            StoredWebhook("w1", CTX, 100, 0, {"url": "https://a.example/", "prefix": "", "secret": "s"})
        )
        deleted_snapshot = await store.delete_snapshot("s1")
        deleted_webhook = await store.delete_webhook("w1")
        assert await store.get_snapshot("s1") is None and await store.list_webhooks() == []  # they are gone
        assert await store.delete_snapshot("s1") is False and await store.delete_webhook("w1") is False
    bug = (
        "BUG ctxsync/store.py Store._commit: a 'write' op's fn(conn) return value is dropped"
        " (`for w in writes: w.fn(conn)`, then every future is settled with None), so"
        " delete_snapshot/delete_webhook always return False, and Recovery.delete"
        " (ctxsync/recovery.py) raises NotFound for a snapshot it just deleted"
    )
    assert (deleted_snapshot, deleted_webhook) == (True, True), bug


# -- schema version 3: one history row per version --------------------------------------------


async def test_a_version_is_one_history_row_and_reads_back_record_by_record(tmp_path: Path) -> None:
    """A version's records are one sealed row (n = records); reads still filter and cut per record."""
    path, writer = tmp_path / "store.db", Writer()
    async with Store(path, history_limit=100) as store:
        await store.append(
            CTX, 1, writer.set_many({f"k{i}": i for i in range(40)}), history=[(i, record(f"k{i}", i)) for i in range(40)]
        )
        await store.append(CTX, 2, writer.set("k3", "x"), history=[(0, record("k3", "x", 3))])
        newest = await store.read_history(CTX, limit=3)
        oldest = await store.read_history(CTX, since=0, limit=3)
        mid = await store.read_history(CTX, since=1, limit=10)
        only_k3 = await store.read_history(CTX, key="k3", since=0)
        with pytest.raises(ValueError, match="consecutive"):
            store.append_nowait(CTX, 3, writer.set("k", 1), history=[(0, record("k", 1)), (2, record("j", 1))])
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT version, idx, n FROM history WHERE doc_id = ? ORDER BY version", (CTX,)).fetchall()
    assert rows == [(1, 0, 40), (2, 0, 1)]
    assert versions(newest) == [(1, 38), (1, 39), (2, 0)]
    assert versions(oldest) == [(1, 0), (1, 1), (1, 2)]
    assert versions(mid) == [(2, 0)]
    assert [(r.version, r.idx, r.record["value"]) for r in only_k3.records] == [(1, 3, "3"), (2, 0, '"x"')]


async def test_pruning_by_records_over_rows_of_many_records(tmp_path: Path) -> None:
    """Versions of 4 records with history_limit=10: rows go whole, reads show exactly the newest 10."""
    path, writer = tmp_path / "store.db", Writer()
    async with Store(path, history_limit=10) as store:
        for v in range(1, 31):
            values = {f"{k}": v for k in "abcd"}
            await store.append(CTX, v, writer.set_many(values), history=[(i, record(k, v)) for i, k in enumerate("abcd")])
            assert len(history_rows(path)) <= 5, f"rows bounded after version {v}"
            page = await store.read_history(CTX, since=0, limit=100)
            expected = [(w, i) for w in range(1, v + 1) for i in range(4)][-10:]
            assert versions(page) == expected, f"newest 10 records after version {v}"
            assert page.history_from == expected[0][0] + (expected[0][1] > 0)
        newest = await store.read_history(CTX, limit=5)
    assert versions(newest) == [(29, 3), (30, 0), (30, 1), (30, 2), (30, 3)]
    async with Store(path, history_limit=10) as store:  # the record count is recomputed on reopen
        for v in range(31, 41):
            values = {f"{k}": v for k in "abcd"}
            await store.append(CTX, v, writer.set_many(values), history=[(i, record(k, v)) for i, k in enumerate("abcd")])
        page = await store.read_history(CTX, since=0, limit=100)
        (loaded,) = await store.load_all()
    assert versions(page) == [(38, 2), (38, 3)] + [(w, i) for w in (39, 40) for i in range(4)]
    assert page.history_from == 39 and loaded.version == 40
    assert len(history_rows(path)) <= 5


async def test_history_rows_of_schema_version_2_still_read(tmp_path: Path) -> None:
    """A version 2 store (one sealed JSON object per record) migrates; old and new rows read as one history."""
    path, writer = tmp_path / "store.db", Writer()
    schema, migrations = store_module._scripts()
    crc = ChecksumCipher()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        assert migrate(conn, schema, migrations[:1]) == 2
        conn.execute("INSERT INTO contexts (doc_id, created_at_ms) VALUES (?, ?)", (CTX, 1_600_000_000_000))
        for v in (1, 2):
            update = writer.set_many({"a": v, "b": v})
            conn.execute("INSERT INTO updates (doc_id, version, data) VALUES (?, ?, ?)", (CTX, v, crc.seal(update, CTX.encode())))
            for i, k in enumerate("ab"):
                blob = json.dumps(record(k, v)).encode()
                conn.execute(
                    "INSERT INTO history (doc_id, version, idx, data) VALUES (?, ?, ?, ?)",
                    (CTX, v, i, crc.seal(blob, store_module.HISTORY_AAD + CTX.encode())),
                )
    finally:
        conn.close()
    async with Store(path, history_limit=5) as store:
        before = await store.read_history(CTX, since=0)
        await store.append(CTX, 3, writer.set_many({"a": 3, "b": 3}), history=[(0, record("a", 3)), (1, record("b", 3))])
        after = await store.read_history(CTX, since=0)
        only_b = await store.read_history(CTX, key="b")
    assert versions(before) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert [r.record["key"] for r in before.records] == ["a", "b", "a", "b"]
    assert versions(after) == [(1, 1), (2, 0), (2, 1), (3, 0), (3, 1)] and after.history_from == 2
    assert [(r.version, r.record["value"]) for r in only_b.records] == [(1, "1"), (2, "2"), (3, "3")]
