"""Tests of ctxsync.store against real SQLite files in tmp_path and real pycrdt documents."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import random
import shutil
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Doc, Map, Text, TransactionEvent

from ctxsync import store as store_module
from ctxsync.errors import InvalidState, SchemaVersionError, StoreCorrupt, StoreError
from ctxsync.seal import AeadCipher, ChecksumCipher
from ctxsync.store import Migration, Store, StoreKeyError, migrate, schema_version
from ctxsync.types import DocId

from tests.helpers import wait_until

CTX = DocId("notes")
TIMEOUT_S = 30.0 * float(os.environ.get("CTXSYNC_TESTS_TIMEOUT_FACTOR", "1"))


class Writer:
    """A real pycrdt document that records every update it makes."""

    def __init__(self) -> None:
        self.doc: Doc[Any] = Doc()
        self.entries = self.doc.get("entries", type=Map)
        self.text = self.doc.get("text", type=Text)
        self.updates: list[bytes] = []
        self.doc.observe(self._on_transaction)

    def _on_transaction(self, event: TransactionEvent) -> None:
        self.updates.append(event.update)

    def set(self, key: str, value: str) -> bytes:
        self.entries[key] = value
        return self.updates[-1]

    def delete(self, key: str) -> bytes:
        del self.entries[key]
        return self.updates[-1]

    def type(self, text: str) -> bytes:
        self.text += text
        return self.updates[-1]


def rebuild(updates: list[bytes]) -> Doc[Any]:
    doc: Doc[Any] = Doc()
    for update in updates:
        doc.apply_update(update)
    return doc


def assert_same(doc: Doc[Any], writer: Writer) -> None:
    assert doc.get_state() == writer.doc.get_state()
    assert doc.get("entries", type=Map).to_py() == writer.entries.to_py()
    assert str(doc.get("text", type=Text)) == str(writer.text)


def log_rows(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM updates").fetchone()[0])


async def make_store(path: Path, updates: int = 300, size: int = 1000) -> Writer:
    writer = Writer()
    async with Store(path) as store:
        for version in range(1, updates + 1):
            await store.append(CTX, version, writer.set(f"k{version}", random.randbytes(size).hex()))
    return writer


async def test_append_close_reopen_rebuilds_identical_document(tmp_path: Path) -> None:
    """Rebuilds the same document, state vector and versions after a reopen."""
    path, writer = tmp_path / "store.db", Writer()
    async with Store(path) as store:
        await store.create_context(CTX)
        for version in range(1, 41):
            await store.append(CTX, version, writer.set(f"k{version % 15}", f"value {version}"))
        await store.append(CTX, 41, writer.delete("k3"))
        await store.append(CTX, 42, writer.type("hello"))
        await store.create_context(CTX)
        await store.create_context(DocId("empty"))
    async with Store(path) as store:
        empty, notes = await store.load_all()
    assert (empty.doc_id, empty.updates, empty.version) == ("empty", [], 0)
    assert notes.doc_id == CTX and notes.version == 42 and notes.updates == writer.updates
    assert 0 < notes.created_at_ms <= empty.created_at_ms
    assert_same(rebuild(notes.updates), writer)


async def test_load_now_reads_what_is_committed_on_the_calling_thread(tmp_path: Path) -> None:
    """load_now() reads a context as load() does, without the worker, even while the worker compacts it."""
    path, writer = tmp_path / "store.db", Writer()
    store = Store(path, compact_threshold=5)
    with pytest.raises(InvalidState):
        store.load_now(CTX)
    async with store:
        await store.create_context(CTX)
        for version in range(1, 13):  # compacted twice on the way
            await store.append(CTX, version, writer.set(f"k{version % 4}", f"value {version}"))
        compaction = asyncio.ensure_future(store.compact(CTX))
        now = store.load_now(CTX)
        await compaction
        assert now is not None and (now.version, now.lineage) == (12, (await store.load(CTX)).lineage)  # type: ignore[union-attr]
        assert_same(rebuild(now.updates), writer)
        assert store.load_now(DocId("missing")) is None
        assert store.stored_bytes(CTX) > 0 and store.stored_bytes(DocId("missing")) == 0
    with pytest.raises(InvalidState):
        store.load_now(CTX)


async def test_a_record_is_valid_only_for_the_version_and_lineage_it_was_made_for(tmp_path: Path) -> None:
    """heads() gives a context's record back only while its stored version and lineage are the record's."""
    path, writer = tmp_path / "store.db", Writer()
    async with Store(path) as store:
        await store.append(CTX, 1, writer.set("k", "1"), lineage="L1")
        await store.append(CTX, 2, writer.set("k", "2"), lineage="L1")
        await store.append(DocId("other"), 1, Writer().set("k", "1"), lineage="L2")
        await store.put_record(CTX, 2, "L1", {"any": ["json"]})
        await store.put_record(DocId("other"), 1, "L2", {"n": 1})
        heads = {h.doc_id: h for h in await store.heads()}
        assert (heads[CTX].version, heads[CTX].lineage, heads[CTX].record) == (2, "L1", {"any": ["json"]})
        await store.append(CTX, 3, writer.set("k", "3"), lineage="L1")  # a later version: stale
        await store.reset_context(DocId("other"), "L3", 1)  # same version, another lineage: gone
        heads = {h.doc_id: h for h in await store.heads()}
        assert (heads[CTX].version, heads[CTX].record) == (3, None)
        assert (heads[DocId("other")].version, heads[DocId("other")].lineage, heads[DocId("other")].record) == (1, "L3", None)
        await store.put_record(CTX, 3, "L1", {"n": 3})
        assert await store.compact(CTX)  # same content and version, other rows: still valid
    async with Store(path) as store:
        assert [(h.doc_id, h.record) for h in await store.heads()] == [(CTX, {"n": 3}), (DocId("other"), None)]
        await store.append(CTX, 4, writer.set("k", "4"), lineage="L1")
        await store.append(CTX, 5, writer.set("k", "5"), lineage="L1")
        await store.put_record(CTX, 5, "L1", {"n": 5})
    with sqlite3.connect(path) as db:  # a row lost from outside, the version kept by the next: stale
        db.execute("DELETE FROM updates WHERE version = 4")
    async with Store(path) as store:
        assert [(h.version, h.record) for h in await store.heads()] == [(5, None), (1, None)]
        await store.put_record(CTX, 5, "L1", {"n": 5})
    with sqlite3.connect(path) as db:  # a record that cannot be unsealed is only a missing cache
        db.execute("UPDATE context_records SET data = x'00'")
    async with Store(path) as store:
        assert [(h.version, h.record) for h in await store.heads()] == [(5, None), (1, None)]


async def test_check_sealed_reads_what_a_rebuild_would_and_refuses_a_damaged_blob(tmp_path: Path) -> None:
    """check_sealed() unseals the checkpoint and the log rows after it, and names a damaged one."""
    path, writer = tmp_path / "store.db", Writer()
    async with Store(path, compact_threshold=1000) as store:
        for version in range(1, 5):
            await store.append(CTX, version, writer.set(f"k{version}", "v" * 50))
        assert await store.compact(CTX)
        await store.append(CTX, 5, writer.set("k5", "v"))
        await store.append(CTX, 6, writer.set("k6", "v"))
        stored = await store.load(CTX)
        assert stored is not None and await store.check_sealed(CTX) == sum(map(len, stored.updates))
        assert await store.check_sealed(DocId("missing")) == 0
    with sqlite3.connect(path) as db:
        seq, data = db.execute("SELECT seq, data FROM updates ORDER BY seq DESC LIMIT 1").fetchone()
        db.execute("UPDATE updates SET data = ? WHERE seq = ?", (data[:8] + bytes(len(data) - 8), seq))  # zeroed, as by a bad disk
    async with Store(path) as store:
        with pytest.raises(StoreCorrupt, match=f"cannot unseal update {seq} of context 'notes'"):
            await store.check_sealed(CTX)
    with sqlite3.connect(path) as db:
        (data,) = db.execute("SELECT data FROM checkpoints").fetchone()
        db.execute("UPDATE checkpoints SET data = ?", (data[:-1] + bytes([data[-1] ^ 1]),))  # one bit flipped
    async with Store(path) as store:
        with pytest.raises(StoreCorrupt, match="cannot unseal the checkpoint of context 'notes'"):
            await store.check_sealed(CTX)


async def test_meta_round_trips(tmp_path: Path) -> None:
    """Stores, replaces and reloads node-wide settings."""
    async with Store(tmp_path / "store.db") as store:
        assert await store.get_meta("node_name") is None
        await store.set_meta("node_name", "alice")
        await store.set_meta("node_name", "bob")
    async with Store(tmp_path / "store.db") as store:
        assert await store.get_meta("node_name") == "bob"


async def test_concurrent_appends_share_commits(tmp_path: Path) -> None:
    """Commits 200 concurrent appends in fewer transactions, all durable."""
    path, writer = tmp_path / "store.db", Writer()
    updates = [writer.set(f"k{i}", "v" * 100) for i in range(200)]
    async with Store(path) as store:
        await asyncio.gather(*(store.append(CTX, v, u) for v, u in enumerate(updates, 1)))
        stats = store.stats()
    assert stats.appends == 200 and stats.commits < stats.appends
    async with Store(path) as store:
        (loaded,) = await store.load_all()
    assert loaded.updates == updates and loaded.version == 200
    assert_same(rebuild(loaded.updates), writer)


async def test_append_nowait_completes_on_commit(tmp_path: Path) -> None:
    """Returns a future that completes once the update is committed."""
    writer = Writer()
    async with Store(tmp_path / "store.db") as store:
        future = store.append_nowait(CTX, 1, writer.set("k", "v"))
        await asyncio.wait_for(future, TIMEOUT_S)
        assert future.done() and future.result() is None
        assert log_rows(tmp_path / "store.db") == 1


async def test_an_idle_store_holds_no_committed_update(tmp_path: Path) -> None:
    """Once committed, an append's update and history are let go while the store waits for work."""
    writer = Writer()
    async with Store(tmp_path / "store.db") as store:
        await store.append(CTX, 1, writer.set("big", "v" * 100_000), history=[(0, {"key": "big"})])

        def appends_held() -> int:
            gc.collect()
            return sum(1 for o in gc.get_objects() if type(o) is store_module._Append)

        await wait_until(lambda: appends_held() == 0, TIMEOUT_S)
        assert log_rows(tmp_path / "store.db") == 1


async def test_failed_commit_fails_every_future_of_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fails every append of a batch whose transaction failed, and acknowledges none."""
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_S", 0.05)
    path, writer = tmp_path / "store.db", Writer()
    async with Store(path) as store:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # holds the write lock
        futures = [store.append_nowait(CTX, v, writer.set(f"k{v}", "v")) for v in range(1, 21)]
        results = await asyncio.gather(*futures, return_exceptions=True)
        blocker.execute("ROLLBACK")
        blocker.close()
        assert all(isinstance(r, StoreError) for r in results)
        assert all(isinstance(r.__cause__, sqlite3.OperationalError) for r in results if r is not None)
        await store.append(CTX, 21, writer.set("after", "v"))
        assert store.stats().appends == 1
    async with Store(path) as store:
        (loaded,) = await store.load_all()
    assert loaded.version == 21 and len(loaded.updates) == 1


async def test_compaction_bounds_log_and_preserves_document(tmp_path: Path) -> None:
    """Keeps the log under the threshold and reloads the same document and version."""
    path, writer = tmp_path / "store.db", Writer()
    async with Store(path, compact_threshold=50) as store:
        for version in range(1, 501):
            await store.append(CTX, version, writer.set(f"k{version % 120}", f"value {version}"))
        stats = store.stats()
        assert log_rows(path) <= 50
    assert stats.compactions == 9 and stats.compaction_failures == 0
    async with Store(path, compact_threshold=50) as store:
        (loaded,) = await store.load_all()
        assert loaded.version == 500 and len(loaded.updates) <= 51
        assert_same(rebuild(loaded.updates), writer)
        assert await store.compact(CTX) is True
        assert await store.compact(CTX) is False
        (compacted,) = await store.load_all()
    assert log_rows(path) == 0 and compacted.version == 500 and len(compacted.updates) == 1
    (checkpoint,) = compacted.updates
    replay = rebuild(writer.updates)
    assert checkpoint == replay.get_update()
    assert_same(rebuild([checkpoint]), writer)
    with sqlite3.connect(path) as conn:
        row = conn.execute("SELECT state_vector, version, upto_seq FROM checkpoints").fetchone()
    # Blobs are framed with a CRC-32 by default (ChecksumCipher).
    assert (ChecksumCipher().unseal(row[0], CTX.encode()), row[1], row[2]) == (replay.get_state(), 500, 500)


async def test_compaction_due_for_a_log_left_alone(tmp_path: Path) -> None:
    """compaction_due: from min_rows rows, not below, not again once compacted, and not for a
    big checkpoint with a small log (the ratio rule of automatic compactions)."""
    path, writer, big = tmp_path / "store.db", Writer(), Writer()
    async with Store(path) as store:
        for version in range(1, 64):
            await store.append(CTX, version, writer.set(f"k{version % 7}", f"value {version}"))
        assert not store.compaction_due(CTX, 64) and store.compaction_due(CTX, 63)
        await store.append(CTX, 64, writer.set("k0", "last"))
        assert store.compaction_due(CTX, 64)
        assert await store.compact(CTX) is True
        assert not store.compaction_due(CTX, 1) and log_rows(path) == 0
        # A context whose checkpoint is past 1 MiB waits until its log is a quarter of it.
        other = DocId("big")
        with big.doc.transaction():
            for i in range(12_000):
                big.entries[f"b{i}"] = "x" * 100
        await store.append(other, 1, big.updates[-1])
        assert await store.compact(other) is True
        for version in range(2, 102):
            await store.append(other, version, big.set(f"b{version}", "y"))
        assert not store.compaction_due(other, 64)
        assert not store.compaction_due(DocId("never-written"), 1)
    async with Store(path) as store:
        loaded = {c.doc_id: c for c in await store.load_all()}
    assert_same(rebuild(loaded[CTX].updates), writer)
    assert len(loaded[CTX].updates) == 1 and len(loaded[DocId("big")].updates) == 101


async def test_compaction_keeps_a_log_row_that_builds_on_a_missing_update(tmp_path: Path) -> None:
    """A row whose dependency the store lacks (dropped while the store failed) would stay pending in
    the replay and be left out of the checkpoint: the compaction fails, counted, and keeps the log."""
    path, writer = tmp_path / "store.db", Writer()
    first, missing, later = writer.set("x", "1"), writer.set("y", "2"), writer.set("z", "3")
    async with Store(path) as store:
        await store.append(CTX, 1, first)
        await store.append(CTX, 3, later)  # builds on `missing` (the same client's clock 1)
        assert await store.compact(CTX) is False
        stats = store.stats()
        assert stats.compaction_failures == 1 and "does not hold" in (stats.last_compaction_error or "")
        assert log_rows(path) == 2 and not store.compaction_due(CTX, 1)  # not tried again until it grows
        await store.append(CTX, 2, missing)  # the update comes back (from a peer's resync)
        assert not store.compaction_due(CTX, 1)  # idle compaction waits for compact_threshold more rows
        assert await store.compact(CTX) is True  # an explicit one goes ahead: nothing is missing now
        (loaded,) = await store.load_all()
    assert len(loaded.updates) == 1
    assert_same(rebuild(loaded.updates), writer)


async def test_failed_checkpoint_write_is_counted_and_not_retried_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An SQLite error while writing the checkpoint: StoreError, a counted failure, the log kept, and
    compaction_due false until the log grows by compact_threshold rows."""
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_S", 0.05)
    path, writer = tmp_path / "store.db", Writer()
    async with Store(path, compact_threshold=10) as store:
        for version in range(1, 10):
            await store.append(CTX, version, writer.set(f"k{version}", "v"))
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # holds the write lock
        try:
            with pytest.raises(StoreError, match="cannot write the checkpoint"):
                await store.compact(CTX)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        stats = store.stats()
        assert stats.compaction_failures == 1 and stats.compactions == 0
        assert log_rows(path) == 9 and not store.compaction_due(CTX, 1)
        (loaded,) = await store.load_all()
    assert_same(rebuild(loaded.updates), writer)


class ToyCipher:
    name = "toy"

    def seal(self, blob: bytes, aad: bytes) -> bytes:
        return bytes(b ^ 0x5A for b in blob) + hashlib.sha256(aad + blob).digest()[:8]

    def unseal(self, blob: bytes, aad: bytes) -> bytes:
        plain = bytes(b ^ 0x5A for b in blob[:-8])
        if hashlib.sha256(aad + plain).digest()[:8] != blob[-8:]:
            raise ValueError("bad tag")
        return plain


async def test_seal_wraps_every_blob(tmp_path: Path) -> None:
    """Seals updates and checkpoints on disk and unseals them on load."""
    path, writer = tmp_path / "store.db", Writer()
    async with Store(path, compact_threshold=10, cipher=ToyCipher()) as store:
        for version in range(1, 26):
            await store.append(CTX, version, writer.set(f"k{version}", "secret"))
        (loaded,) = await store.load_all()
    assert_same(rebuild(loaded.updates), writer)
    with sqlite3.connect(path) as conn:
        blobs = [
            r[0] for r in conn.execute("SELECT data FROM updates UNION ALL SELECT data FROM checkpoints")
        ]
    assert len(blobs) == 4 and not any(b"secret" in blob for blob in blobs)


async def test_unreadable_log_is_kept(tmp_path: Path) -> None:
    """Refuses to load or compact blobs it cannot unseal, and keeps the log."""
    path = tmp_path / "store.db"
    await make_store(path, updates=20, size=10)

    class DamagedBlobs(ChecksumCipher):
        def unseal(self, blob: bytes, aad: bytes) -> bytes:
            if aad == b"meta":  # the key check still opens: only the data blobs are bad
                return super().unseal(blob, aad)
            raise ValueError("bad tag")

    async with Store(path, cipher=DamagedBlobs()) as store:
        with pytest.raises(StoreCorrupt, match="cannot unseal"):
            await store.load_all()
        assert await store.compact(CTX) is False
        stats = store.stats()
    assert stats.compaction_failures == 1 and "bad tag" in (stats.last_compaction_error or "")
    assert log_rows(path) == 20


def corrupt_random(path: Path) -> None:
    path.write_bytes(random.randbytes(8192))


def corrupt_truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 17])


def corrupt_page(path: Path) -> None:
    data = bytearray(path.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    data[page_size : 2 * page_size] = random.randbytes(page_size)  # page 2, a b-tree page
    path.write_bytes(bytes(data))


def foreign_database(path: Path) -> None:
    path.unlink()
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
    conn.close()


def missing_table(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE meta")
    conn.close()


@pytest.mark.parametrize(
    "damage", [corrupt_random, corrupt_truncated, corrupt_page, foreign_database, missing_table]
)
async def test_invalid_store_is_refused_and_kept(tmp_path: Path, damage: Any) -> None:
    """Refuses a file that is not a valid store, names it, and leaves its bytes unchanged."""
    path = tmp_path / "store.db"
    await make_store(path)
    damage(path)
    before = path.read_bytes()
    with pytest.raises(StoreCorrupt, match=str(path)):
        Store.check(path)
    with pytest.raises(StoreCorrupt, match=str(path)):
        async with Store(path):
            pass
    assert path.read_bytes() == before


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """Refuses a store written by a newer ctxsync and leaves it unchanged."""
    path = tmp_path / "store.db"
    await make_store(path, updates=5)
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {schema_version() + 1}")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(SchemaVersionError, match="upgrade ctxsync"):
        Store.check(path)
    with pytest.raises(SchemaVersionError):
        async with Store(path):
            pass
    assert path.read_bytes() == before


async def test_check_accepts_a_valid_store(tmp_path: Path) -> None:
    """Accepts a valid store and rejects a missing one."""
    await make_store(tmp_path / "store.db", updates=3)
    Store.check(tmp_path / "store.db")
    with pytest.raises(StoreError, match="no ctxsync store"):
        Store.check(tmp_path / "missing.db")


def test_migrate_applies_numbered_scripts_in_order(tmp_path: Path) -> None:
    """Applies each migration in its own transaction under user_version, and rolls back a failed one."""
    schema = store_module._scripts()[0]
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    try:
        migrations = [
            Migration(2, "02-snapshots.sql", "CREATE TABLE snapshots (name TEXT PRIMARY KEY);"),
            Migration(3, "03-snapshot-data.sql", "ALTER TABLE snapshots ADD COLUMN data BLOB;"),
        ]
        assert migrate(conn, schema, migrations[:1]) == 2
        assert migrate(conn, schema, migrations) == 3
        broken = Migration(4, "04-broken.sql", "CREATE TABLE t4 (x); CREATE TABLE snapshots (x);")
        with pytest.raises(sqlite3.OperationalError):
            migrate(conn, schema, [*migrations, broken])
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        assert conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 't4'").fetchone()[0] == 0
        with pytest.raises(SchemaVersionError):
            migrate(conn, schema, migrations[:1])
    finally:
        conn.close()


async def test_journal_is_wal_and_synchronous_full(tmp_path: Path) -> None:
    """Runs in WAL mode with synchronous=FULL and foreign keys on."""
    path = tmp_path / "store.db"
    async with Store(path) as store:
        assert await store.pragmas() == {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1}
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
        assert store.stats().size_bytes > 0


async def test_append_outside_lifetime_raises(tmp_path: Path) -> None:
    """Raises InvalidState before the store is opened and after it is closed."""
    store = Store(tmp_path / "store.db")
    with pytest.raises(InvalidState):
        await store.append(CTX, 1, b"\x00\x00")
    async with store:
        pass
    with pytest.raises(InvalidState):
        await store.append(CTX, 1, b"\x00\x00")
    with pytest.raises(InvalidState):
        store.append_nowait(CTX, 1, b"\x00\x00")


CRASH_CHILD = """
import asyncio, sys
from pycrdt import Doc, Map
from ctxsync.store import Store
from ctxsync.types import DocId

async def main(path):
    doc = Doc()
    entries = doc.get("entries", type=Map)
    updates = []
    doc.observe(lambda event: updates.append(event.update))
    async with Store(path, compact_threshold=300) as store:
        async def one(version, update):
            await store.append(DocId("crash"), version, update)
            print(version, flush=True)
        for batch in range(5000):
            jobs = []
            for i in range(10):
                version = batch * 10 + i + 1
                entries[f"k{version}"] = version
                jobs.append(one(version, updates[-1]))
            await asyncio.gather(*jobs)

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
async def test_acknowledged_updates_survive_sigkill(tmp_path: Path) -> None:
    """Keeps every acknowledged update when the writing process is killed."""
    path = tmp_path / "store.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASH_CHILD, str(path), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    acked: list[int] = []
    try:
        while len(acked) < 1000:
            line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT_S)
            assert line, "the writer exited early"
            acked.append(int(line))
    finally:
        proc.send_signal(signal.SIGKILL)
        acked += [int(x) for x in (await proc.stdout.read()).split()]
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    async with Store(path) as store:
        (loaded,) = await store.load_all()
    entries = rebuild(loaded.updates).get("entries", type=Map).to_py()
    assert all(entries.get(f"k{v}") == v for v in acked)
    assert loaded.version >= max(acked)


async def test_store_dir_must_exist(tmp_path: Path) -> None:
    """Raises StoreError naming the path when the directory is missing."""
    with pytest.raises(StoreError, match="nope"):
        async with Store(tmp_path / "nope" / "store.db"):
            pass


async def test_copy_of_closed_store_opens(tmp_path: Path) -> None:
    """Opens a plain copy of a closed store (everything checkpointed into the main file)."""
    writer = await make_store(tmp_path / "a.db", updates=10)
    shutil.copy(tmp_path / "a.db", tmp_path / "b.db")
    async with Store(tmp_path / "b.db") as store:
        (loaded,) = await store.load_all()
    assert rebuild(loaded.updates).get_state() == writer.doc.get_state()


async def test_damaged_blob_is_reported_not_dropped(tmp_path: Path) -> None:
    """A byte flipped inside a stored update fails its checksum: load_all raises StoreCorrupt instead of losing entries."""
    path = tmp_path / "store.db"
    writer = Writer()
    async with Store(path) as store:
        await store.append(CTX, 1, writer.set("k", "a value long enough to find"))
    with sqlite3.connect(path) as conn:
        (blob,) = conn.execute("SELECT data FROM updates").fetchone()
        damaged = bytearray(blob)
        damaged[-3] ^= 0x01
        conn.execute("UPDATE updates SET data = ?", (bytes(damaged),))
    async with Store(path) as store:
        with pytest.raises(StoreCorrupt, match="checksum"):
            await store.load_all()


# -- encryption at rest ------------------------------------------------------------------

SECRET = "correct horse battery staple 7f3a"
KEY_A, KEY_B = bytes(range(32)), bytes(range(1, 33))


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of the store (database, WAL, shared memory, journal) that exists, by name."""
    return {p.name: p.read_bytes() for p in path.parent.glob(path.name + "*")}


async def write_secrets(path: Path, cipher: object, *, n: int = 30, compact_threshold: int = 10) -> Writer:
    writer = Writer()
    async with Store(path, compact_threshold=compact_threshold, cipher=cipher) as store:  # type: ignore[arg-type]
        for version in range(1, n + 1):
            await store.append(CTX, version, writer.set(f"k{version}", f"{SECRET} #{version}"))
    return writer


async def test_aead_store_holds_no_plaintext(tmp_path: Path) -> None:
    """With a key, no file of the store holds a written value, while it is open or after."""
    path = tmp_path / "store.db"
    writer = Writer()
    async with Store(path, compact_threshold=10, cipher=AeadCipher(KEY_A)) as store:
        for version in range(1, 31):
            await store.append(CTX, version, writer.set(f"k{version}", f"{SECRET} #{version}"))
        files_open = store_files(path)
    files_closed = store_files(path)
    assert "store.db-wal" in files_open  # the WAL was looked at, not just the main file
    for name, data in {**files_open, **{k + " (closed)": v for k, v in files_closed.items()}}.items():
        assert SECRET.encode() not in data, name
        assert b"correct horse" not in data, name
    async with Store(path, cipher=AeadCipher(KEY_A)) as store:
        (loaded,) = await store.load_all()
    assert_same(rebuild(loaded.updates), writer)


async def test_wrong_key_is_refused_and_store_untouched(tmp_path: Path) -> None:
    """Another key, or no key at all, is refused before anything is written."""
    path = tmp_path / "store.db"
    await write_secrets(path, AeadCipher(KEY_A))
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(StoreKeyError, match="does not open this store"):
        async with Store(path, cipher=AeadCipher(KEY_B)):
            pass
    with pytest.raises(StoreKeyError, match="no key for it was given"):
        async with Store(path):
            pass
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    async with Store(path, cipher=AeadCipher(KEY_A)) as store:
        (loaded,) = await store.load_all()
    assert len(rebuild(loaded.updates).get("entries", type=Map)) == 30


async def test_plaintext_store_is_resealed_with_a_key(tmp_path: Path) -> None:
    """A store written before encryption at rest is re-sealed and vacuumed on its first keyed open."""
    path = tmp_path / "store.db"
    writer = await write_secrets(path, ChecksumCipher(), n=25, compact_threshold=10)
    assert any(SECRET.encode() in data for data in store_files(path).values())  # the premise
    async with Store(path, cipher=AeadCipher(KEY_A)) as store:
        resealed = store.resealed
        (loaded,) = await store.load_all()
    assert resealed >= 3  # a checkpoint, its state vector and the log rows after it
    assert_same(rebuild(loaded.updates), writer)
    for name, data in store_files(path).items():
        assert SECRET.encode() not in data, name
    with pytest.raises(StoreKeyError):
        async with Store(path):  # no going back to plaintext by accident
            pass
