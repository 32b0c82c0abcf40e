"""
Durable storage of contexts in one SQLite file: an append-only log of updates per context,
compacted into one checkpoint per context.

Rule 1: every ``sqlite3`` call runs on the store's one worker thread, which owns the connection.
The event loop thread only queues jobs and awaits futures that the worker completes with
``loop.call_soon_threadsafe``. Appends queued together are committed in one transaction (group
commit); a write is acknowledged only after its ``COMMIT`` returned.

Rule 2: a file that is not a valid ctxsync store is refused (:class:`StoreCorrupt`,
:class:`SchemaVersionError`) and never deleted, repaired or overwritten.

The schema is ``sql/schema/*.sql`` (version 1) plus ``sql/migrations/NN-*.sql``, applied under
``PRAGMA user_version`` (see ``sql/migrations/README.md``).

Rule 3: every blob is sealed by the store's :class:`~ctxsync.seal.Cipher` (bound to its
context's doc id) before it is written. The cipher's name and a sealed check value are kept in
``meta``: a store is never opened with the wrong key, and a store sealed with the keyless
CRC-32 framing (written before encryption at rest) is re-sealed, then vacuumed, the first time
it is opened with a key.

This module imports only the standard library, pycrdt and the ctxsync leaves (errors, types)
and ``seal`` (pure).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias, TypeVar, cast

import pycrdt

from ctxsync.errors import InvalidState, SchemaVersionError, StoreCorrupt, StoreError
from ctxsync.seal import ChecksumCipher, Cipher
from ctxsync.types import DocId

__all__ = [
    "LEGACY_LINEAGE", "HistoryPage", "HistoryRecord", "Migration", "Store", "StoreKeyError", "StoreStats",
    "StoredContext", "StoredSnapshot", "StoredWebhook", "migrate", "schema_version",
]  # fmt: skip


class StoreKeyError(StoreError):
    """The store was sealed with another key or cipher than the one given; it is left untouched."""


_CHECK_PLAINTEXT = b"ctxsync store key check v1"
_CHECK_AAD = b"meta"

APPLICATION_ID = 0x63747873
"""``PRAGMA application_id`` of every ctxsync store ("ctxs"), set by the v1 schema."""

BUSY_TIMEOUT_S = 5.0
"""How long SQLite waits for a lock held by another connection, in seconds."""

_ROWS_NOW = (
    "(SELECT COALESCE(MAX(upto_seq), 0) FROM checkpoints WHERE doc_id = ?), "
    "(SELECT COALESCE(MAX(seq), 0) FROM updates WHERE doc_id = ?), "
    "(SELECT COUNT(*) FROM updates WHERE doc_id = ?)"
)
"""A context's rows as a record describes them: its checkpoint's upto_seq, its last log seq, its log rows."""

READER_TIMEOUT_S = 1.0
"""Seconds :meth:`Store.load_now` waits for a lock (it runs on the event loop; a WAL reader
waits only while SQLite recovers the log after a crash)."""

MAX_BATCH = 10_000
"""Most jobs the worker takes from its queue for one transaction."""

_SQLITE_MAGIC = b"SQLite format 3\x00"
_REQUIRED_TABLES = frozenset({"contexts", "updates", "checkpoints", "meta"})
_MIGRATION_NAME = re.compile(r"^(\d+)-[\w.-]+\.sql$")
_T = TypeVar("_T")
_SET_META = (
    "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
_PUT_CHECKPOINT = (
    "INSERT INTO checkpoints (doc_id, data, state_vector, version, upto_seq) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (doc_id) DO UPDATE SET data = excluded.data, state_vector = excluded.state_vector,"
    " version = excluded.version, upto_seq = excluded.upto_seq"
)


LEGACY_LINEAGE: Final = "legacy"
"""Lineage of the contexts stored before lineages existed (schema version 1)."""

HISTORY_AAD: Final = b"history\x00"
SNAPSHOT_AAD: Final = b"snapshot\x00"
WEBHOOK_AAD: Final = b"webhook\x00"
FAILURE_AAD: Final = b"webhook-failure\x00"
RECORD_AAD: Final = b"record\x00"
"""Prefixes of the associated data of sealed JSON blobs (then the doc id or webhook id)."""


@dataclass(frozen=True, slots=True)
class StoredContext:
    """One context as stored: apply ``updates`` in order to a fresh ``pycrdt.Doc`` to rebuild it."""

    doc_id: DocId
    updates: list[bytes]
    """Unsealed Yjs v1 updates: the checkpoint first (if any), then the log in commit order."""
    version: int
    """Highest version stored for this context, 0 if none."""
    created_at_ms: int
    """When the context was first stored, Unix time in milliseconds."""
    lineage: str = LEGACY_LINEAGE
    """The context's lineage id (see :meth:`Store.append_nowait`)."""
    history_from: int = 1
    """The lowest version from which every change is in the history."""


@dataclass(frozen=True, slots=True)
class StoredHead:
    """A stored context's version and lineage, with the record of it that is still valid, if any (:meth:`Store.heads`)."""

    doc_id: DocId
    version: int
    """Highest version stored for this context (as :attr:`StoredContext.version`)."""
    lineage: str
    record: dict[str, Any] | None
    """What :meth:`Store.put_record` stored for this very version and lineage; None if nothing
    was, or it is of an older version or another lineage, or cannot be unsealed."""


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    """One entry change as the history keeps it."""

    version: int
    """The context's local version of the change (several changes may share one)."""
    idx: int
    """Position among the changes of that version, from 0."""
    record: dict[str, Any]
    """``{"t_ms", "origin", "key", "value", "previous", "hlc"}``: applied here at ``t_ms`` (Unix
    ms), written by ``origin`` (node id) at HLC ``hlc``; values are JSON text or ``None``."""


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """What :meth:`Store.read_history` found."""

    records: list[HistoryRecord]
    history_from: int
    """Every change of a version ``>= history_from`` is kept; older ones may be gone."""


@dataclass(frozen=True, slots=True)
class StoredSnapshot:
    """One recovery point."""

    id: str
    doc_id: DocId
    created_at_ms: int
    version: int
    """The context's version when it was taken."""
    auto: bool
    """Made automatically (every ``snapshot_every`` changes, or before a restore or adopt)."""
    info: dict[str, Any]
    """``{"label": str | None, "meta": JSON value | None, "reason": str}``."""
    entries: dict[str, str] | None
    """``{key: value JSON text}``: the live entries then; ``None`` when listed without them."""


@dataclass(frozen=True, slots=True)
class StoredWebhook:
    """One webhook and its delivery cursor."""

    id: str
    doc_id: DocId
    created_at_ms: int
    cursor: int
    """Last version delivered (or dead-lettered): delivery resumes after it."""
    data: dict[str, Any]
    """``{"url", "prefix", "secret"}``; empty if the row could not be unsealed (see ``error``)."""
    error: str | None = None
    """Why the row's data could not be read (damaged, or sealed with another key); None if it could."""


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counters of one open store, since it was opened."""

    path: str
    size_bytes: int
    """Size of the database file plus its ``-wal`` and ``-shm`` files, in bytes."""
    appends: int
    """Updates committed."""
    commits: int
    """Write transactions committed for appends, ``create_context`` and ``set_meta``."""
    compactions: int
    compaction_failures: int
    last_compaction_error: str | None = None


@dataclass(frozen=True, slots=True)
class Migration:
    """One ``sql/migrations/NN-*.sql`` file: turns schema version ``version - 1`` into ``version``."""

    version: int
    name: str
    sql: str


def _sql_files(folder: str) -> list[tuple[str, str]]:
    root = resources.files("ctxsync") / "sql" / folder
    if not root.is_dir():
        return []
    return sorted((f.name, f.read_text("utf-8")) for f in root.iterdir() if f.name.endswith(".sql"))


@functools.cache
def _scripts() -> tuple[str, tuple[Migration, ...]]:
    schema = "\n".join(sql for _, sql in _sql_files("schema"))
    migrations = []
    for name, sql in _sql_files("migrations"):
        match = _MIGRATION_NAME.match(name)
        if match is None:
            raise StoreError(f"bad migration file name {name!r}: expected NN-description.sql")
        migrations.append(Migration(int(match.group(1)), name, sql))
    if [m.version for m in migrations] != list(range(2, 2 + len(migrations))):
        raise StoreError(
            f"migrations must be numbered 02, 03, ... without gaps: {[m.name for m in migrations]}"
        )
    return schema, tuple(migrations)


def schema_version() -> int:
    """Return the schema version this ctxsync writes: 1 plus the number of migrations."""
    return 1 + len(_scripts()[1])


def migrate(conn: sqlite3.Connection, schema: str, migrations: Sequence[Migration]) -> int:
    """
    Bring a database to the newest schema version, one transaction per version.

    Args:
        conn: Connection opened with ``isolation_level=None``, not in a transaction.
        schema: Version 1 schema, run only when ``user_version`` is 0.
        migrations: Scripts for versions 2, 3, ..., in order.

    Returns:
        The schema version after migrating.

    Raises:
        SchemaVersionError: If the database is newer than the last migration.
        sqlite3.Error: If a script fails; its transaction is rolled back.
    """
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    newest = migrations[-1].version if migrations else 1
    if version > newest:
        raise SchemaVersionError(f"schema version {version} is newer than {newest}: upgrade ctxsync")
    steps = [(1, schema)] if version == 0 else []
    steps += [(m.version, m.sql) for m in migrations if m.version > version]
    for target, sql in steps:
        try:
            conn.executescript(f"BEGIN IMMEDIATE;\n{sql}\n;\nPRAGMA user_version = {int(target)};\nCOMMIT;")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        version = target
    return version


def _translate(exc: sqlite3.Error | OSError, path: Path, what: str) -> StoreError:
    """Translate an SQLite or OS error to a StoreError (StoreCorrupt for a damaged file), chaining it."""
    code = getattr(exc, "sqlite_errorcode", -1) & 0xFF
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        error: StoreError = StoreCorrupt(f"{path}: {what}: {exc}; the file is kept as it is")
    else:
        error = StoreError(f"{path}: {what}: {exc}")
    error.__cause__ = exc
    return error


def _inspect(path: Path) -> int:
    """Check without writing to it that ``path`` holds a ctxsync store; return its version, 0 if new."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise StoreError(f"{path}: cannot read the store: {exc}") from exc
    refuse = f"{path}: not a valid ctxsync store, refusing to open it (the file is kept as it is)"
    if not path.is_file():
        raise StoreCorrupt(f"{refuse}: not a regular file")
    if st.st_size:
        with path.open("rb") as f:
            header = f.read(100)
        if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
            raise StoreCorrupt(f"{refuse}: not an SQLite database")
    try:
        # Without a WAL file there is nothing to recover: open immutable, so that refusing a
        # file does not leave new -wal/-shm files beside it.
        wal = path.with_name(path.name + "-wal").exists()
        query = "mode=ro" if wal else "mode=ro&immutable=1"
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?{query}", uri=True, timeout=BUSY_TIMEOUT_S)
    except sqlite3.Error as exc:
        raise _translate(exc, path, "cannot open the store") from exc
    try:
        app_id, version = (
            conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("application_id", "user_version")
        )
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if app_id == 0 and version == 0 and not tables:
            return 0  # an empty SQLite file: SQLite itself treats it as a new database
        if app_id != APPLICATION_ID:
            raise StoreCorrupt(f"{refuse}: an SQLite database of another application (id {app_id:#x})")
        if version > schema_version():
            raise SchemaVersionError(
                f"{path}: store schema version {version} is newer than {schema_version()}: upgrade ctxsync"
            )
        problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            found = "; ".join(" ".join(str(p).split()) for p in problems)  # one line, as stderr wants
            raise StoreCorrupt(f"{refuse}: quick_check failed: {found}")
        if version < 1 or not _REQUIRED_TABLES <= tables:
            missing = ", ".join(sorted(_REQUIRED_TABLES - tables)) or "none"
            raise StoreCorrupt(f"{refuse}: schema version {version}, missing tables: {missing}")
        return cast(int, version)
    except sqlite3.Error as exc:
        raise _translate(exc, path, "cannot read the store") from exc
    finally:
        conn.close()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True, eq=False)
class _Append:
    future: asyncio.Future[None]
    doc_id: DocId
    version: int
    update: bytes
    created_at_ms: int
    lineage: str = LEGACY_LINEAGE
    history: Sequence[tuple[int, dict[str, Any]]] = ()
    missed_through: int = 0


@dataclass(slots=True, eq=False)
class _Op:
    """A write joins the next group-committed transaction; a call runs alone after it; close stops."""

    future: asyncio.Future[Any]
    kind: Literal["write", "call", "close"]
    fn: Callable[[sqlite3.Connection], Any] = lambda conn: None


_Job: TypeAlias = _Append | _Op
_Outcome: TypeAlias = tuple["asyncio.Future[Any]", Any, BaseException | None]
_HistoryRow: TypeAlias = tuple[str, int, int, int, bytes]
"""A row of the history table: doc_id, version, idx of its first record, n records, sealed JSON array."""


def _settle(outcomes: list[_Outcome]) -> None:
    """Complete futures on the event loop thread; skip those whose waiter was cancelled."""
    for future, value, exc in outcomes:
        if not future.done():
            future.set_result(value) if exc is None else future.set_exception(exc)


COMPACT_RATIO = 4
"""A large context is compacted once its log is at least 1/COMPACT_RATIO of its checkpoint."""
COMPACT_RATIO_FROM_BYTES = 1 << 20
"""Checkpoint size (bytes) from which :data:`COMPACT_RATIO` applies; smaller ones compact by row count alone."""


class Store:
    """
    The SQLite store of one node, opened with ``async with Store(path) as store:``.

    Every method but :meth:`stats` and :meth:`check` raises :class:`InvalidState` when the store
    is not open.

    Args:
        path: Database file; created if missing. Its directory must exist.
        compact_threshold: Log rows a context may have since its checkpoint before the worker
            compacts it, after the next commit that touches it.
        cipher: Seals every blob before it is written (``aad`` = doc id in UTF-8) and unseals
            it when read; called on the worker thread. :class:`~ctxsync.seal.ChecksumCipher`
            (CRC-32 framing: integrity only, no secrecy) by default; the daemon passes an
            :class:`~ctxsync.seal.AeadCipher` with the node's store key.
        history_limit: History records kept per context (newest first; default 1,000). Reads
            show exactly that many; the table prunes in steps, holding up to 10% more.
        snapshot_keep: Automatic snapshots kept per context (default 20).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        compact_threshold: int = 2000,
        cipher: Cipher | None = None,
        history_limit: int = 1000,
        snapshot_keep: int = 20,
    ) -> None:
        if compact_threshold < 1:
            raise ValueError("compact_threshold must be at least 1")
        if history_limit < 1 or snapshot_keep < 1:
            raise ValueError("history_limit and snapshot_keep must be at least 1")
        self.history_limit = history_limit
        """History records kept per context (the newest)."""
        self.snapshot_keep = snapshot_keep
        """Automatic snapshots kept per context (the newest); named ones are kept until deleted."""
        self._history_rows: dict[str, int] = {}  # worker only: history rows per context, once counted
        self.path = Path(path)
        """The database file."""
        self.compact_threshold = compact_threshold
        """Log rows per context that trigger a compaction."""
        self.cipher: Cipher = cipher or ChecksumCipher()
        """The cipher sealing this store's blobs."""
        self._seal = self.cipher.seal
        self._unseal = self.cipher.unseal
        self.resealed = 0
        """Blobs re-sealed when this store was opened (moved off CRC-32 framing to the cipher)."""
        self._state = "new"  # new -> opening -> open -> closing -> closed
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._log_rows: dict[str, int] = {}  # worker only: log rows since the checkpoint
        self._log_bytes: dict[str, int] = {}  # worker only: bytes of those rows
        self._checkpoint_bytes: dict[str, int] = {}  # worker only: size of each checkpoint
        self._retry_at: dict[str, int] = {}  # worker only: log rows before retrying a failed compaction
        self._appends = self._commits = self._compactions = self._compaction_failures = 0
        self._last_compaction_error: str | None = None
        self._reader: sqlite3.Connection | None = None  # event loop thread only: see load_now()

    @classmethod
    def check(cls, path: str | Path) -> None:
        """
        Check that ``path`` holds a readable ctxsync store, without writing to it.

        Synchronous: for the CLI, not for the event loop thread of a running daemon.

        Raises:
            StoreCorrupt: If the file is not a ctxsync store or fails ``PRAGMA quick_check``.
            SchemaVersionError: If the store was written by a newer ctxsync.
            StoreError: If there is no store at ``path`` or it cannot be read.
        """
        if _inspect(Path(path)) == 0:
            raise StoreError(f"{path}: no ctxsync store here")

    @classmethod
    def sealed_with(cls, path: str | Path) -> str | None:
        """
        Tell, without writing to it, which cipher the store at ``path`` is sealed with.

        Synchronous (a quick read-only look, for startup).

        Returns:
            The cipher's name (``meta.cipher``), ``"crc32"`` for a store written before
            encryption at rest, or ``None`` if there is no store at ``path`` yet.

        Raises:
            StoreCorrupt, SchemaVersionError, StoreError: As :meth:`check`.
        """
        path = Path(path)
        if _inspect(path) == 0:
            return None
        wal = path.with_name(path.name + "-wal").exists()
        query = "mode=ro" if wal else "mode=ro&immutable=1"
        try:
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?{query}", uri=True, timeout=BUSY_TIMEOUT_S)
            try:
                row = conn.execute("SELECT value FROM meta WHERE key = 'cipher'").fetchone()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise _translate(exc, path, "cannot read the store") from exc
        return str(row[0]) if row else ChecksumCipher.name

    # -- lifecycle (event loop thread) ---------------------------------------------------------

    async def __aenter__(self) -> Store:
        """
        Open, create or migrate the store on a new worker thread.

        Raises:
            StoreCorrupt: If the file is not a valid ctxsync store; it is left untouched.
            SchemaVersionError: If the store was written by a newer ctxsync.
            StoreError: If SQLite cannot open the file.
            InvalidState: If this store was already opened.
        """
        if self._state != "new":
            raise InvalidState(f"store {self.path} was already opened")
        self._loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(opened,), name="ctxsync-store", daemon=True)
        self._state = "opening"
        self._thread.start()
        try:
            await opened
        except BaseException:
            self._state = "closed"
            await asyncio.to_thread(self._thread.join)
            raise
        self._state = "open"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Commit everything queued, close the connection and join the worker thread."""
        if self._state != "open" or self._thread is None:
            return
        self._state = "closing"
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        closed = self._submit(_Op(self._future(), "close"), force=True)
        try:
            await closed
        finally:
            await asyncio.to_thread(self._thread.join)
            self._state = "closed"

    # -- public API (event loop thread) --------------------------------------------------------

    def append_nowait(
        self,
        doc_id: DocId,
        version: int,
        update: bytes,
        *,
        lineage: str = LEGACY_LINEAGE,
        history: Sequence[tuple[int, dict[str, Any]]] = (),
        missed_through: int = 0,
    ) -> asyncio.Future[None]:
        """
        Queue one update for the next group commit, creating its context row if needed.

        The update and its history records are committed in one transaction: a crash keeps
        both or neither. History beyond :attr:`history_limit` records per context is dropped,
        oldest first, in that transaction, and the context's ``history_from`` moves past it.

        Args:
            doc_id: Context the update belongs to.
            version: The context's version after this update.
            update: Yjs v1 update, unsealed.
            lineage: The context's lineage id, stored when this creates the context row.
            history: ``(idx, record)`` per entry change of this version (see
                :class:`HistoryRecord`), with consecutive ``idx``; they are stored as one
                row. A first ``idx`` above 0 says the earlier ones were left out:
                ``history_from`` then moves past this version.
            missed_through: A version of this context whose records will never be stored (its
                update was dropped: ``store.retention_full``); 0 if none. ``history_from`` moves
                past it in the same transaction, so a reader is told it missed changes instead
                of passing the version silently.

        Returns:
            A future that completes once the update is committed, or fails with
            :class:`StoreError` (chaining the SQLite error) if its transaction failed.

        Raises:
            ValueError: If the ``idx`` values of ``history`` are not consecutive.
        """
        if any(idx != history[0][0] + i for i, (idx, _) in enumerate(history)):
            raise ValueError(f"history of version {version} must have consecutive idx values")
        job = _Append(self._future(), doc_id, version, bytes(update), _now_ms(), lineage, tuple(history), missed_through)
        return self._submit(job)

    async def append(
        self,
        doc_id: DocId,
        version: int,
        update: bytes,
        *,
        lineage: str = LEGACY_LINEAGE,
        history: Sequence[tuple[int, dict[str, Any]]] = (),
        missed_through: int = 0,
    ) -> None:
        """
        Store one update durably: return only once it is committed.

        Arguments as for :meth:`append_nowait`. If the caller is cancelled, the update may
        still be committed.

        Raises:
            StoreError: If the transaction failed; nothing of it is stored.
        """
        await self.append_nowait(doc_id, version, update, lineage=lineage, history=history, missed_through=missed_through)

    # -- history, snapshots, lineage, webhooks ---------------------------------------------------

    async def read_history(
        self, doc_id: DocId, *, since: int | None = None, key: str | None = None, limit: int = 100
    ) -> HistoryPage:
        """
        Read a context's history, oldest first.

        Args:
            since: Only changes with a version above it, the oldest ``limit`` of them (a cursor);
                ``None`` for the newest ``limit`` changes.
            key: Only changes of this entry key.
            limit: Most records returned.

        Raises:
            StoreCorrupt: If a record cannot be unsealed.
            StoreError: If the read failed.
        """

        def read(conn: sqlite3.Connection) -> HistoryPage:
            row = conn.execute("SELECT history_from FROM contexts WHERE doc_id = ?", (doc_id,)).fetchone()
            if row is None:
                return HistoryPage([], 1)
            history_from = int(row[0])
            sql = "SELECT version, idx, data FROM history WHERE doc_id = ?"
            args: list[Any] = [doc_id]
            # The table may hold up to 10% more than history_limit between two prunes (and the
            # older records of the row at the cut): show exactly the newest history_limit
            # records, as if pruned already.
            first: tuple[int, int] = (0, 0)
            cut = self._history_cut(conn, doc_id)
            if cut is not None:
                cut_version, row_idx, first_kept = cut
                sql += " AND (version > ? OR (version = ? AND idx >= ?))"
                args += [cut_version, cut_version, row_idx]
                first = (cut_version, first_kept)
                history_from = max(history_from, cut_version if first_kept == 0 else cut_version + 1)
            if since is not None:
                sql += " AND version > ?"
                args.append(since)
            sql += " ORDER BY version, idx" if since is not None else " ORDER BY version DESC, idx DESC"
            aad = HISTORY_AAD + doc_id.encode()
            found: list[HistoryRecord] = []
            for version, row_idx, data in conn.execute(sql, args):
                records = self._unseal_json(data, aad, doc_id, f"history of version {version}")
                if isinstance(records, dict):
                    records = [records]  # a row from before schema version 3: one record
                indexed = list(enumerate(records, row_idx))
                for idx, record in indexed if since is not None else reversed(indexed):
                    if (version, idx) >= first and (key is None or record.get("key") == key):
                        found.append(HistoryRecord(version, idx, record))
                if len(found) >= limit:
                    break
            if since is None:
                found = found[:limit]
                found.reverse()
            else:
                del found[limit:]
            return HistoryPage(found, history_from)

        return await self._call(read)

    async def reset_context(self, doc_id: DocId, lineage: str, base_version: int) -> None:
        """
        Forget a context's content (log and checkpoint) and give it another lineage, in one
        transaction (``ctxsync context adopt``). History, snapshots and webhooks stay.

        Args:
            base_version: The context's version now; versions stay monotonic across the reset.

        Raises:
            StoreError: If the transaction failed; nothing changed.
        """

        def reset(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO contexts (doc_id, created_at_ms, lineage) VALUES (?, ?, ?)",
                (doc_id, _now_ms(), lineage),
            )
            conn.execute("DELETE FROM updates WHERE doc_id = ?", (doc_id,))
            conn.execute("DELETE FROM checkpoints WHERE doc_id = ?", (doc_id,))
            conn.execute("DELETE FROM context_records WHERE doc_id = ?", (doc_id,))
            conn.execute(
                "UPDATE contexts SET lineage = ?, base_version = max(base_version, ?) WHERE doc_id = ?",
                (lineage, base_version, doc_id),
            )
            self._log_rows.pop(doc_id, None)
            self._log_bytes.pop(doc_id, None)
            self._checkpoint_bytes.pop(doc_id, None)

        await self._submit(_Op(self._future(), "write", reset))

    async def put_snapshot(self, snapshot: StoredSnapshot) -> None:
        """
        Store a snapshot durably; then drop the oldest automatic snapshots of its context beyond
        :attr:`snapshot_keep`, in the same transaction.

        Raises:
            StoreError: If it could not be sealed or committed.
        """
        if snapshot.entries is None:
            raise ValueError("a snapshot to store needs its entries")
        aad = SNAPSHOT_AAD + snapshot.id.encode()
        row = (
            snapshot.id, snapshot.doc_id, snapshot.created_at_ms, snapshot.version, int(snapshot.auto),
            self._seal_json(snapshot.info, aad + b"\x00info"), self._seal_json(snapshot.entries, aad + b"\x00entries"),
        )  # fmt: skip
        keep = self.snapshot_keep

        def put(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO snapshots (id, doc_id, created_at_ms, version, auto, info, entries) VALUES (?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            conn.execute(
                "DELETE FROM snapshots WHERE doc_id = ? AND auto = 1 AND id NOT IN"
                " (SELECT id FROM snapshots WHERE doc_id = ? AND auto = 1 ORDER BY created_at_ms DESC, rowid DESC LIMIT ?)",
                (snapshot.doc_id, snapshot.doc_id, keep),
            )

        await self._submit(_Op(self._future(), "write", put))

    async def list_snapshots(self, doc_id: DocId | None = None) -> list[StoredSnapshot]:
        """Every snapshot (of ``doc_id``, or all), oldest first, without their entries."""

        def read(conn: sqlite3.Connection) -> list[StoredSnapshot]:
            where, args = ("WHERE doc_id = ?", (doc_id,)) if doc_id is not None else ("", ())
            rows = conn.execute(
                f"SELECT id, doc_id, created_at_ms, version, auto, info FROM snapshots {where} ORDER BY created_at_ms, rowid",
                args,
            ).fetchall()
            return [
                StoredSnapshot(
                    i, DocId(d), t, v, bool(a),
                    self._unseal_json(info, SNAPSHOT_AAD + i.encode() + b"\x00info", d, f"snapshot {i}"), None,
                )  # fmt: skip
                for i, d, t, v, a, info in rows
            ]

        return await self._call(read)

    async def get_snapshot(self, snapshot_id: str) -> StoredSnapshot | None:
        """One snapshot with its entries, or ``None``. Raises StoreCorrupt, StoreError."""

        def read(conn: sqlite3.Connection) -> StoredSnapshot | None:
            row = conn.execute(
                "SELECT id, doc_id, created_at_ms, version, auto, info, entries FROM snapshots WHERE id = ?",
                (snapshot_id,),
            ).fetchone()
            if row is None:
                return None
            i, d, t, v, a, info, entries = row
            aad = SNAPSHOT_AAD + i.encode()
            return StoredSnapshot(
                i, DocId(d), t, v, bool(a),
                self._unseal_json(info, aad + b"\x00info", d, f"snapshot {i}"),
                self._unseal_json(entries, aad + b"\x00entries", d, f"snapshot {i}"),
            )  # fmt: skip

        return await self._call(read)

    async def delete_snapshot(self, snapshot_id: str) -> bool:
        """Delete a snapshot durably; return whether it existed. Raises StoreError."""
        return bool(
            await self._submit(
                _Op(
                    self._future(), "write",
                    lambda conn: conn.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,)).rowcount,
                )
            )
        )  # fmt: skip

    async def put_webhook(self, webhook: StoredWebhook) -> None:
        """Store a webhook durably, replacing one with the same id. Raises StoreError."""
        row = (
            webhook.id, webhook.doc_id, webhook.created_at_ms, webhook.cursor,
            self._seal_json(webhook.data, WEBHOOK_AAD + webhook.id.encode()),
        )  # fmt: skip
        sql = "INSERT OR REPLACE INTO webhooks (id, doc_id, created_at_ms, cursor, data) VALUES (?, ?, ?, ?, ?)"
        await self._submit(_Op(self._future(), "write", lambda conn: conn.execute(sql, row)))

    async def list_webhooks(self) -> list[StoredWebhook]:
        """
        Every webhook, oldest first.

        A row whose data cannot be unsealed is listed too, with empty ``data`` and the reason in
        ``error``, so that one damaged row neither hides the others nor keeps them from being
        delivered, and can still be seen and deleted.

        Raises:
            StoreError: If the table could not be read.
        """

        def read(conn: sqlite3.Connection) -> list[StoredWebhook]:
            rows = conn.execute("SELECT id, doc_id, created_at_ms, cursor, data FROM webhooks ORDER BY created_at_ms, id")
            out = []
            for i, d, t, c, data in rows.fetchall():
                try:
                    out.append(StoredWebhook(i, DocId(d), t, c, self._unseal_json(data, WEBHOOK_AAD + i.encode(), d, f"webhook {i}")))
                except StoreCorrupt as exc:
                    out.append(StoredWebhook(i, DocId(d), t, c, {}, error=str(exc)))
            return out

        return await self._call(read)

    async def delete_webhook(self, webhook_id: str) -> bool:
        """Delete a webhook and its dead letters durably; return whether it existed. Raises StoreError."""

        def delete(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM webhook_failures WHERE webhook_id = ?", (webhook_id,))
            return bool(conn.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id,)).rowcount)

        return bool(await self._submit(_Op(self._future(), "write", delete)))

    async def advance_webhook(self, webhook_id: str, cursor: int, failure: dict[str, Any] | None = None) -> None:
        """
        Move a webhook's cursor to ``cursor`` durably, and (given ``failure``) keep the batch it
        could not deliver in the dead-letter list, in the same transaction.

        Args:
            failure: ``{"body": JSON object sent, "error": str, "attempts": int}``.

        Raises:
            StoreError: If it could not be sealed or committed.
        """
        sealed = None if failure is None else self._seal_json(failure, FAILURE_AAD + webhook_id.encode())
        now = _now_ms()

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE webhooks SET cursor = max(cursor, ?) WHERE id = ?", (cursor, webhook_id))
            if sealed is not None:
                conn.execute(
                    "INSERT INTO webhook_failures (webhook_id, failed_at_ms, data) VALUES (?, ?, ?)",
                    (webhook_id, now, sealed),
                )

        await self._submit(_Op(self._future(), "write", write))

    async def list_webhook_failures(self, webhook_id: str | None = None) -> list[tuple[int, str, int, dict[str, Any]]]:
        """
        The dead-letter list, oldest first: ``(seq, webhook_id, failed_at_ms, failure)``.

        A failure whose data cannot be unsealed is listed as ``{"error": "unreadable: <why>"}``
        rather than failing the whole list.

        Raises:
            StoreError: If the table could not be read.
        """

        def read(conn: sqlite3.Connection) -> list[tuple[int, str, int, dict[str, Any]]]:
            where, args = ("WHERE webhook_id = ?", (webhook_id,)) if webhook_id is not None else ("", ())
            rows = conn.execute(
                f"SELECT seq, webhook_id, failed_at_ms, data FROM webhook_failures {where} ORDER BY seq", args
            ).fetchall()
            out: list[tuple[int, str, int, dict[str, Any]]] = []
            for seq, w, t, data in rows:
                try:
                    failure = self._unseal_json(data, FAILURE_AAD + w.encode(), w, f"webhook failure {seq}")
                except StoreCorrupt as exc:
                    failure = {"error": f"unreadable: {exc}"}
                out.append((seq, w, t, failure))
            return out

        return await self._call(read)

    def _seal_json(self, obj: Any, aad: bytes) -> bytes:
        try:
            return self._seal(json.dumps(obj, separators=(",", ":")).encode(), aad)
        except Exception as exc:
            raise StoreError(f"cannot seal a record: {exc}") from exc

    def _unseal_json(self, blob: bytes, aad: bytes, owner: str, what: str) -> Any:
        try:
            return json.loads(self._unseal(blob, aad))
        except Exception as exc:
            raise StoreCorrupt(f"{self.path}: cannot unseal {what} of {owner!r}: {exc}") from exc

    async def create_context(self, doc_id: DocId) -> None:
        """
        Store an empty context durably; do nothing if it exists.

        Raises:
            StoreError: If the transaction failed.
        """
        sql, row = "INSERT OR IGNORE INTO contexts (doc_id, created_at_ms) VALUES (?, ?)", (doc_id, _now_ms())
        await self._submit(_Op(self._future(), "write", lambda conn: conn.execute(sql, row)))

    async def set_meta(self, key: str, value: str) -> None:
        """
        Store one node-wide setting durably, replacing any previous value.

        Raises:
            StoreError: If the transaction failed.
        """
        await self._submit(_Op(self._future(), "write", lambda conn: conn.execute(_SET_META, (key, value))))

    async def get_meta(self, key: str) -> str | None:
        """Return a node-wide setting, ``None`` if unset. Raises StoreError if the read failed."""
        row = await self._call(
            lambda conn: conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        )
        return None if row is None else cast(str, row[0])

    async def load_all(self) -> list[StoredContext]:
        """
        Read every context, ordered by doc id.

        Raises:
            StoreCorrupt: If a stored blob cannot be unsealed.
            StoreError: If the read failed.
        """
        return await self._call(self._load_all)

    def put_record(self, doc_id: DocId, version: int, lineage: str, record: dict[str, Any]) -> asyncio.Future[None]:
        """
        Store what a context unloaded from memory keeps (any JSON object), for the version and
        lineage it has now, replacing an older record; committed with the next batch. A record
        is a cache: :meth:`heads` gives it back only while that version and lineage are still the
        context's stored ones.

        Returns:
            A future of the commit (a StoreError if it failed; nothing else depends on it).
        """
        blob = self._seal_json(record, RECORD_AAD + doc_id.encode())
        # The rows it describes, as they are when the record is committed (after every append
        # queued before it): rows lost or added since make it stale even at the same version.
        sql = f"""INSERT OR REPLACE INTO context_records (doc_id, version, lineage, data, upto_seq, last_seq, log_rows)
                  SELECT ?, ?, ?, ?, {_ROWS_NOW}"""
        args = (doc_id, version, lineage, blob, doc_id, doc_id, doc_id)
        return self._submit(_Op(self._future(), "write", lambda conn: conn.execute(sql, args)))

    def mark_history_gap(self, doc_id: DocId, version: int, *, lineage: str = LEGACY_LINEAGE) -> asyncio.Future[None]:
        """
        Say that ``version`` of a context will never have its history records stored (its update
        was dropped): ``history_from`` moves past it, committed with the next batch, so a reader
        from before is told it missed changes. What :meth:`append_nowait`'s ``missed_through``
        does, for when no update of the context comes to carry it. Creates the context's row (with
        ``lineage``) if the dropped update was its first.

        Returns:
            A future of the commit (a StoreError if it failed).
        """

        def mark(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO contexts (doc_id, created_at_ms, lineage) VALUES (?, ?, ?)",
                (doc_id, _now_ms(), lineage),
            )
            conn.execute("UPDATE contexts SET history_from = max(history_from, ?) WHERE doc_id = ?", (version + 1, doc_id))

        return self._submit(_Op(self._future(), "write", mark))

    async def heads(self) -> list[StoredHead]:
        """
        Every stored context's version and lineage, and its record if still valid (see
        :meth:`put_record`), ordered by doc id, without reading any update.

        Raises:
            StoreError: If the read failed.
        """

        def read(conn: sqlite3.Connection) -> list[StoredHead]:
            rows = conn.execute(
                f"""SELECT c.doc_id, c.lineage, c.base_version, c.history_from,
                          (SELECT version FROM checkpoints k WHERE k.doc_id = c.doc_id),
                          (SELECT MAX(version) FROM updates u WHERE u.doc_id = c.doc_id),
                          (SELECT MAX(version) FROM history h WHERE h.doc_id = c.doc_id),
                          r.version, r.lineage, r.data, r.upto_seq, r.last_seq, r.log_rows,
                          {_ROWS_NOW.replace("?", "c.doc_id")}
                   FROM contexts c LEFT JOIN context_records r ON r.doc_id = c.doc_id
                   ORDER BY c.doc_id"""
            ).fetchall()
            heads = []
            for row in rows:
                doc_id, lineage, base, history_from, checkpoint, logged, recorded, r_version, r_lineage, data = row[:10]
                version = max(checkpoint or 0, logged or 0, base, history_from - 1, recorded or 0)
                record = None
                if data is not None and r_version == version and r_lineage == lineage and row[10:13] == row[13:16]:
                    try:
                        record = self._unseal_json(data, RECORD_AAD + doc_id.encode(), doc_id, "the record")
                    except StoreCorrupt:
                        record = None  # a cache: rebuilt from the log instead
                heads.append(StoredHead(DocId(doc_id), version, lineage, record if isinstance(record, dict) else None))
            return heads

        return await self._call(read)

    async def check_sealed(self, doc_id: DocId) -> int:
        """
        Check that every blob a rebuild of ``doc_id`` would read (its checkpoint and the log rows
        after it) unseals: the store's cipher checks each is what this store wrote (an AEAD tag
        under the store key; a CRC-32 for a store without one, :class:`ChecksumCipher`). What
        a start does for a context it takes from its record (:meth:`heads`) instead of
        rebuilding it, so that a damaged store is still refused at start; it costs a read and
        an unseal per row, not the replay and indexing of a rebuild.

        Returns:
            How many bytes were checked.

        Raises:
            StoreCorrupt: If a blob cannot be unsealed (naming the context and the row).
            StoreError: If the read failed.
        """

        def check(conn: sqlite3.Connection) -> int:
            checked = 0
            checkpoint = conn.execute("SELECT data, upto_seq FROM checkpoints WHERE doc_id = ?", (doc_id,)).fetchone()
            upto_seq = 0
            if checkpoint is not None:
                checked += len(self._unseal_or_corrupt(checkpoint[0], doc_id, "the checkpoint"))
                upto_seq = checkpoint[1]
            for seq, data in conn.execute(
                "SELECT seq, data FROM updates WHERE doc_id = ? AND seq > ? ORDER BY seq", (doc_id, upto_seq)
            ):
                checked += len(self._unseal_or_corrupt(data, doc_id, f"update {seq}"))
            return checked

        return await self._call(check)

    async def load(self, doc_id: DocId) -> StoredContext | None:
        """
        Read one context (after every write queued before this call), or None if it is not stored.

        Raises:
            StoreCorrupt: If a stored blob cannot be unsealed.
            StoreError: If the read failed.
        """
        for stored in await self._call(lambda conn: self._load_all(conn, only=doc_id)):
            return stored
        return None

    def load_now(self, doc_id: DocId) -> StoredContext | None:
        """
        Read one context's committed rows on the calling thread (the event loop's), without
        waiting for the worker: for a context unloaded from memory that is needed again by a
        synchronous path (a peer's update, a read). Rows still queued for the worker are not
        seen, so call it only for a context none of whose versions is waiting to be committed.

        Reads go through a second, read-only connection opened on first use. In WAL mode a
        reader sees the last committed transaction and waits for no writer (a compaction under
        way on the worker is seen either before or after, never half done), so this blocks the
        caller only for the read itself: measured about 1 ms per 100 KiB stored.

        Returns:
            The context's checkpoint and log (as :meth:`load`), or None if it is not stored.

        Raises:
            StoreCorrupt: If a stored blob cannot be unsealed.
            StoreError: If the read failed.
            InvalidState: If the store is not open.
        """
        if self._state != "open":
            raise InvalidState(f"store {self.path} is not open ({self._state})")
        try:
            if self._reader is None:
                reader = sqlite3.connect(self.path, isolation_level=None, timeout=READER_TIMEOUT_S)
                reader.execute("PRAGMA query_only = ON")
                self._reader = reader
            for stored in self._load_all(self._reader, only=doc_id):
                return stored
        except sqlite3.Error as exc:
            raise _translate(exc, self.path, "cannot read the store") from exc
        return None

    def stored_bytes(self, doc_id: DocId) -> int:
        """Bytes of a context's checkpoint and log rows (sealed), from counters kept in memory; no I/O."""
        return self._checkpoint_bytes.get(doc_id, 0) + self._log_bytes.get(doc_id, 0)

    async def compact(self, doc_id: DocId) -> bool:
        """
        Merge a context's checkpoint and log into a new, verified checkpoint now.

        Returns:
            Whether a checkpoint was written: ``False`` if there was no log to merge or the
            merge failed verification (see :meth:`stats`); the log is then kept.

        Raises:
            StoreError: If the transaction failed.
        """
        return await self._call(lambda conn: self._compact_now(conn, doc_id))

    def compaction_due(self, doc_id: DocId, min_rows: int) -> bool:
        """
        Tell whether a context's log is worth compacting (the automatic compaction after a
        commit asks with ``compact_threshold + 1``, idle compaction with 64): it has at least
        ``min_rows`` rows since the checkpoint, it is large enough next to
        the checkpoint (the rule of automatic compactions, so a big context is not replayed for
        a few rows), and no compaction of it failed since its log last grew by
        ``compact_threshold`` rows.

        Every row of the log is read, unsealed and applied again at each start
        (:meth:`load_all`): a context written a few hundred times and then left alone would
        otherwise cost that at every restart for as long as it lives. The answer comes from
        counters kept in memory; no I/O.
        """
        rows = self._log_rows.get(doc_id, 0)
        return rows >= max(1, min_rows) and rows >= self._retry_at.get(doc_id, 0) and self._log_is_large(doc_id)

    async def pragmas(self) -> dict[str, Any]:
        """Return the connection's ``journal_mode``, ``synchronous`` (2 = FULL) and ``foreign_keys``."""
        names = ("journal_mode", "synchronous", "foreign_keys")
        return await self._call(lambda conn: {n: conn.execute(f"PRAGMA {n}").fetchone()[0] for n in names})

    def stats(self) -> StoreStats:
        """Return the store's counters and current size on disk."""
        files = [f"{self.path}{suffix}" for suffix in ("", "-wal", "-shm")]
        size = sum(os.path.getsize(f) for f in files if os.path.exists(f))  # racy, but only for stats
        return StoreStats(
            str(self.path), size, self._appends, self._commits, self._compactions,
            self._compaction_failures, self._last_compaction_error,
        )  # fmt: skip

    def _future(self) -> asyncio.Future[Any]:
        if self._loop is None:
            raise InvalidState(f"store {self.path} is not open")
        return self._loop.create_future()

    def _submit(self, job: _Job, *, force: bool = False) -> asyncio.Future[Any]:
        if self._state != "open" and not force:
            raise InvalidState(f"store {self.path} is not open ({self._state})")
        self._queue.put(job)
        return job.future

    async def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        return cast(_T, await self._submit(_Op(self._future(), "call", fn)))

    # -- worker thread -------------------------------------------------------------------------

    def _resolve(self, outcomes: list[_Outcome]) -> None:
        if outcomes and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(_settle, outcomes)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _error(self, exc: BaseException, what: str) -> BaseException:
        return _translate(exc, self.path, what) if isinstance(exc, sqlite3.Error | OSError) else exc

    def _run(self, opened: asyncio.Future[None]) -> None:
        try:
            conn = self._open()
        except Exception as exc:
            self._resolve([(opened, None, self._error(exc, "cannot open the store"))])
            return
        self._resolve([(opened, None, None)])
        close: _Op | None = None
        jobs: list[_Job] = []
        try:
            while close is None:
                jobs = []  # let the last batch go before waiting: its updates can be megabytes
                jobs.append(self._queue.get())
                while len(jobs) < MAX_BATCH:
                    try:
                        jobs.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                close = self._handle(conn, jobs)
        except BaseException as exc:  # a bug: fail every waiter rather than leave it hanging
            self._state = "closed"
            while not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            self._resolve([(j.future, None, StoreError(f"store worker failed: {exc!r}")) for j in jobs])
            raise
        finally:
            conn.close()
        self._resolve([(close.future, None, None)])

    def _open(self) -> sqlite3.Connection:
        _inspect(self.path)
        try:  # a new store is private from its first byte (SQLite gives -wal/-shm the same mode)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot create the store: {exc.strerror}") from exc
        schema, migrations = _scripts()
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        try:
            # A new store frees the pages of compacted log rows (incremental_vacuum after each
            # compaction) instead of keeping them; this only takes effect before the first table.
            if conn.execute("PRAGMA page_count").fetchone()[0] == 0:  # setting it on an existing file writes its header
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"{self.path}: cannot use WAL journal mode (got {mode!r})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            migrate(conn, schema, migrations)
            self._check_cipher(conn)
            self._log_rows, self._log_bytes = {}, {}
            for doc_id, rows, size in conn.execute(
                "SELECT doc_id, COUNT(*), SUM(LENGTH(data)) FROM updates GROUP BY doc_id"
            ):
                self._log_rows[doc_id], self._log_bytes[doc_id] = rows, size or 0
            self._checkpoint_bytes = dict(conn.execute("SELECT doc_id, LENGTH(data) FROM checkpoints").fetchall())
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_cipher(self, conn: sqlite3.Connection) -> None:
        """
        Make sure this store's blobs open with :attr:`cipher`, re-sealing CRC-32 ones.

        ``meta.cipher`` names the cipher of every blob and ``meta.cipher_check`` holds a known
        value sealed with it (hex). A store without them was written before encryption at
        rest, with CRC-32 framing.

        Raises:
            StoreKeyError: The store is sealed with another cipher or key (nothing is written).
        """
        meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('cipher', 'cipher_check')").fetchall())
        stored = meta.get("cipher", ChecksumCipher.name)
        if stored == self.cipher.name and "cipher_check" in meta:
            try:
                ok = self._unseal(bytes.fromhex(meta["cipher_check"]), _CHECK_AAD) == _CHECK_PLAINTEXT
            except ValueError:
                ok = False
            if not ok:
                raise StoreKeyError(
                    f"{self.path}: the store key does not open this store (sealed with another key);"
                    " give the key it was created with ([store] key_file or key_env), the store is left untouched"
                )
            return
        if stored not in (self.cipher.name, ChecksumCipher.name):
            raise StoreKeyError(
                f"{self.path}: the store is sealed with {stored} but no key for it was given"
                " (is store.key missing? see [store] key_file / key_env); the store is left untouched"
            )
        check = self._seal(_CHECK_PLAINTEXT, _CHECK_AAD).hex()
        try:
            conn.execute("BEGIN IMMEDIATE")
            if stored != self.cipher.name:
                self._reseal(conn, ChecksumCipher())
            conn.executemany(_SET_META, [("cipher", self.cipher.name), ("cipher_check", check)])
            conn.execute("COMMIT")
        except BaseException:
            self._rollback(conn)
            raise
        if self.resealed:
            # The old blobs are gone from the tables, not yet from free pages and the WAL.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _reseal(self, conn: sqlite3.Connection, old: Cipher) -> None:
        """Unseal every blob with ``old`` and seal it with :attr:`cipher`, inside the caller's transaction."""

        def convert(blob: bytes, doc_id: str, what: str) -> bytes:
            try:
                plain = old.unseal(blob, doc_id.encode())
            except ValueError as exc:
                raise StoreCorrupt(f"{self.path}: cannot unseal {what} of context {doc_id!r}: {exc}") from exc
            self.resealed += 1
            return self._seal(plain, doc_id.encode())

        for seq, doc_id, data in conn.execute("SELECT seq, doc_id, data FROM updates").fetchall():
            conn.execute("UPDATE updates SET data = ? WHERE seq = ?", (convert(data, doc_id, f"update {seq}"), seq))
        for doc_id, data, sv in conn.execute("SELECT doc_id, data, state_vector FROM checkpoints").fetchall():
            conn.execute(
                "UPDATE checkpoints SET data = ?, state_vector = ? WHERE doc_id = ?",
                (convert(data, doc_id, "the checkpoint"), convert(sv, doc_id, "the state vector"), doc_id),
            )

        def convert_aad(blob: bytes, aad: bytes, what: str) -> bytes:
            try:
                plain = old.unseal(blob, aad)
            except ValueError as exc:
                raise StoreCorrupt(f"{self.path}: cannot unseal {what}: {exc}") from exc
            self.resealed += 1
            return self._seal(plain, aad)

        for doc_id, version, idx, data in conn.execute("SELECT doc_id, version, idx, data FROM history").fetchall():
            conn.execute(
                "UPDATE history SET data = ? WHERE doc_id = ? AND version = ? AND idx = ?",
                (convert_aad(data, HISTORY_AAD + doc_id.encode(), f"history of {doc_id!r}"), doc_id, version, idx),
            )
        for sid, info, entries in conn.execute("SELECT id, info, entries FROM snapshots").fetchall():
            aad = SNAPSHOT_AAD + sid.encode()
            conn.execute(
                "UPDATE snapshots SET info = ?, entries = ? WHERE id = ?",
                (convert_aad(info, aad + b"\x00info", f"snapshot {sid}"),
                 convert_aad(entries, aad + b"\x00entries", f"snapshot {sid}"), sid),
            )  # fmt: skip
        conn.execute("DELETE FROM context_records")  # a cache: rewritten at the next unloads
        for wid, data in conn.execute("SELECT id, data FROM webhooks").fetchall():
            conn.execute("UPDATE webhooks SET data = ? WHERE id = ?", (convert_aad(data, WEBHOOK_AAD + wid.encode(), f"webhook {wid}"), wid))
        for seq, wid, data in conn.execute("SELECT seq, webhook_id, data FROM webhook_failures").fetchall():
            conn.execute(
                "UPDATE webhook_failures SET data = ? WHERE seq = ?",
                (convert_aad(data, FAILURE_AAD + wid.encode(), f"webhook failure {seq}"), seq),
            )

    def _handle(self, conn: sqlite3.Connection, jobs: list[_Job]) -> _Op | None:
        """Commit the batch's writes, answer its calls, then compact what grew too long."""
        appends = [j for j in jobs if isinstance(j, _Append)]
        ops = [j for j in jobs if isinstance(j, _Op)]
        writes = [op for op in ops if op.kind == "write"]
        if appends or writes:
            self._resolve(self._commit(conn, appends, writes))
        outcomes: list[_Outcome] = []
        for op in ops:
            if op.kind == "call":
                try:
                    outcomes.append((op.future, op.fn(conn), None))
                except Exception as exc:
                    outcomes.append((op.future, None, self._error(exc, "store request failed")))
        self._resolve(outcomes)
        close = next((op for op in ops if op.kind == "close"), None)
        for doc_id in {a.doc_id for a in appends} if close is None else ():
            if self.compaction_due(doc_id, self.compact_threshold + 1):  # more rows than the threshold
                try:
                    self._compact_now(conn, doc_id)
                except StoreError:
                    pass  # counted by _compact_now; the appends themselves are committed
                except Exception as exc:
                    self._compaction_failed(doc_id, str(self._error(exc, "compaction failed")))
        return close

    def _commit(self, conn: sqlite3.Connection, appends: list[_Append], writes: list[_Op]) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        rows: list[tuple[str, int, bytes]] = []
        history: list[_HistoryRow] = []
        gaps: dict[str, int] = {}
        contexts: dict[str, tuple[int, str]] = {}
        sealed: list[_Append] = []
        for a in appends:
            try:
                row: tuple[str, int, bytes] = (a.doc_id, a.version, self._seal(a.update, a.doc_id.encode()))
                records = self._history_row(a)
            except Exception as exc:
                error = StoreError(f"cannot seal an update of context {a.doc_id!r}: {exc}")
                error.__cause__ = exc
                outcomes.append((a.future, None, error))
                continue
            rows.append(row)
            history += records
            if a.history and a.history[0][0] > 0:  # the first changes of this version were left out
                gaps[a.doc_id] = max(gaps.get(a.doc_id, 0), a.version + 1)
            if a.missed_through:  # an earlier version's records will never come
                gaps[a.doc_id] = max(gaps.get(a.doc_id, 0), a.missed_through + 1)
            contexts.setdefault(a.doc_id, (a.created_at_ms, a.lineage))
            sealed.append(a)
        committed: list[_Job] = [*sealed, *writes]
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT OR IGNORE INTO contexts (doc_id, created_at_ms, lineage) VALUES (?, ?, ?)",
                [(d, t, lineage) for d, (t, lineage) in contexts.items()],
            )
            conn.executemany("INSERT INTO updates (doc_id, version, data) VALUES (?, ?, ?)", rows)
            if history or gaps:
                self._add_history(conn, history, gaps)
            results = [w.fn(conn) for w in writes]
            conn.execute("COMMIT")
        except Exception as exc:
            self._rollback(conn)
            self._history_rows.clear()  # recount after a rollback
            what = f"cannot commit {len(sealed)} updates and {len(writes)} writes"
            return outcomes + [(j.future, None, self._error(exc, what)) for j in committed]
        self._commits += 1
        self._appends += len(sealed)
        for a, row in zip(sealed, rows, strict=True):
            self._log_rows[a.doc_id] = self._log_rows.get(a.doc_id, 0) + 1
            self._log_bytes[a.doc_id] = self._log_bytes.get(a.doc_id, 0) + len(row[2])
        return (
            outcomes
            + [(a.future, None, None) for a in sealed]
            + [(w.future, r, None) for w, r in zip(writes, results, strict=True)]
        )

    def _history_row(self, a: _Append) -> list[_HistoryRow]:
        """The history row of one append (none if it has no records): its records as one sealed JSON array."""
        if not a.history:
            return []
        first = a.history[0][0]
        blob = json.dumps([r for _, r in a.history], separators=(",", ":")).encode()
        return [(a.doc_id, a.version, first, len(a.history), self._seal(blob, HISTORY_AAD + a.doc_id.encode()))]

    def _add_history(self, conn: sqlite3.Connection, rows: list[_HistoryRow], gaps: dict[str, int]) -> None:
        """
        Insert history rows, then drop the oldest beyond :attr:`history_limit` records (inside
        the caller's transaction).

        Pruning works in steps of 10% of the limit (not an index walk per commit) and by whole
        rows: the row holding the limit-th newest record stays whole, and
        :meth:`read_history` hides its older records as if they were gone.
        """
        conn.executemany("INSERT OR REPLACE INTO history (doc_id, version, idx, n, data) VALUES (?, ?, ?, ?, ?)", rows)
        added: dict[str, int] = {}
        for doc_id, _, _, n, _ in rows:
            added[doc_id] = added.get(doc_id, 0) + n
        limit = self.history_limit
        for doc_id, n in added.items():
            count = self._history_rows.get(doc_id)
            count = self._count_history(conn, doc_id) if count is None else count + n
            if count > limit + max(1, limit // 10):
                cut = self._history_cut(conn, doc_id)
                if cut is None:  # the cached count ran ahead (rows replaced, not added): recount
                    self._history_rows[doc_id] = self._count_history(conn, doc_id)
                    continue
                version, row_idx, first_kept = cut
                conn.execute(
                    "DELETE FROM history WHERE doc_id = ? AND (version < ? OR (version = ? AND idx < ?))",
                    (doc_id, version, version, row_idx),
                )
                count = limit  # (plus the hidden older records of the cut row, if any)
                gaps[doc_id] = max(gaps.get(doc_id, 0), version if first_kept == 0 else version + 1)
            self._history_rows[doc_id] = count
        conn.executemany(
            "UPDATE contexts SET history_from = max(history_from, ?) WHERE doc_id = ?",
            [(v, d) for d, v in gaps.items()],
        )

    @staticmethod
    def _count_history(conn: sqlite3.Connection, doc_id: str) -> int:
        return int(conn.execute("SELECT COALESCE(SUM(n), 0) FROM history WHERE doc_id = ?", (doc_id,)).fetchone()[0])

    def _history_cut(self, conn: sqlite3.Connection, doc_id: str) -> tuple[int, int, int] | None:
        """
        Where the newest :attr:`history_limit` records of a context begin, if it holds more.

        Returns:
            ``(version, row_idx, first_kept)``: the row (by its version and first idx) holding
            the limit-th newest record, and that record's idx. None if the context holds no more
            than the limit.
        """
        row = conn.execute(
            "SELECT version, idx, total FROM (SELECT version, idx, SUM(n) OVER"
            " (ORDER BY version DESC, idx DESC ROWS UNBOUNDED PRECEDING) AS total FROM history WHERE doc_id = ?)"
            " WHERE total >= ? LIMIT 1",
            (doc_id, self.history_limit),
        ).fetchone()
        if row is None:
            return None
        version, row_idx, total = row
        has_older = total > self.history_limit or conn.execute(
            "SELECT 1 FROM history WHERE doc_id = ? AND (version < ? OR (version = ? AND idx < ?)) LIMIT 1",
            (doc_id, version, version, row_idx),
        ).fetchone() is not None
        if not has_older:
            return None
        return version, row_idx, row_idx + total - self.history_limit

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite already rolled back (e.g. after an I/O error)

    def _unseal_or_corrupt(self, blob: bytes, doc_id: str, what: str) -> bytes:
        try:
            return self._unseal(blob, doc_id.encode())
        except Exception as exc:
            raise StoreCorrupt(f"{self.path}: cannot unseal {what} of context {doc_id!r}: {exc}") from exc

    def _load_all(self, conn: sqlite3.Connection, only: str | None = None) -> list[StoredContext]:
        where, args = ("WHERE doc_id = ?", (only,)) if only is not None else ("", ())
        conn.execute("BEGIN")
        try:
            contexts = conn.execute(
                f"SELECT doc_id, created_at_ms, lineage, history_from, base_version FROM contexts {where} ORDER BY doc_id",
                args,
            ).fetchall()
            checkpoints = {
                r[0]: r[1:] for r in conn.execute(f"SELECT doc_id, data, version, upto_seq FROM checkpoints {where}", args)
            }
            recorded = dict(conn.execute(f"SELECT doc_id, MAX(version) FROM history {where} GROUP BY doc_id", args).fetchall())
            log: dict[str, list[tuple[int, int, bytes]]] = {}
            for doc_id, seq, version, data in conn.execute(
                f"SELECT doc_id, seq, version, data FROM updates {where} ORDER BY doc_id, seq", args
            ):
                log.setdefault(doc_id, []).append((seq, version, data))
        finally:
            conn.execute("COMMIT")
        loaded = []
        for doc_id, created_at_ms, lineage, history_from, base_version in contexts:
            updates, version, upto_seq = [], 0, 0
            if doc_id in checkpoints:
                data, version, upto_seq = checkpoints[doc_id]
                updates.append(self._unseal_or_corrupt(data, doc_id, "the checkpoint"))
            for seq, row_version, data in log.get(doc_id, []):
                if seq > upto_seq:
                    updates.append(self._unseal_or_corrupt(data, doc_id, f"update {seq}"))
                    version = max(version, row_version)
            version = max(version, base_version, history_from - 1, recorded.get(doc_id) or 0)
            loaded.append(StoredContext(DocId(doc_id), updates, version, created_at_ms, lineage, history_from))
        return loaded

    def _log_is_large(self, doc_id: str) -> bool:
        """
        Tell whether the log is worth merging: a compaction replays the whole context, so once
        its checkpoint passes :data:`COMPACT_RATIO_FROM_BYTES` it waits until the log is at
        least 1/:data:`COMPACT_RATIO` of the checkpoint (amortised O(1) per write; a restart
        replays at most that much log).
        """
        checkpoint = self._checkpoint_bytes.get(doc_id, 0)
        return checkpoint < COMPACT_RATIO_FROM_BYTES or self._log_bytes.get(doc_id, 0) * COMPACT_RATIO >= checkpoint

    def _compaction_failed(self, doc_id: str, reason: str) -> None:
        self._compaction_failures += 1
        self._last_compaction_error = f"{doc_id}: {reason}"
        self._retry_at[doc_id] = self._log_rows.get(doc_id, 0) + self.compact_threshold

    def _compact_now(self, conn: sqlite3.Connection, doc_id: str) -> bool:
        """
        Replay checkpoint + log, verify the merge, then swap it in; return whether it was written.

        Every failure is counted (:meth:`_compaction_failed`: the context waits for
        ``compact_threshold`` more rows before it is tried again); an SQLite one is raised too.
        """
        try:
            rows = conn.execute(
                "SELECT seq, version, data FROM updates WHERE doc_id = ? ORDER BY seq", (doc_id,)
            ).fetchall()
            checkpoint = conn.execute(
                "SELECT data, version FROM checkpoints WHERE doc_id = ?", (doc_id,)
            ).fetchone()
        except sqlite3.Error as exc:
            self._compaction_failed(doc_id, f"cannot read the log: {exc}")
            raise _translate(exc, self.path, f"cannot read the log of {doc_id!r}") from exc
        if not rows:
            return False
        aad = doc_id.encode()
        try:
            sources = [self._unseal(checkpoint[0], aad)] if checkpoint is not None else []
            sources += [self._unseal(data, aad) for _, _, data in rows]
            replay: pycrdt.Doc[Any] = pycrdt.Doc()
            for source in sources:
                replay.apply_update(source)
            update, state_vector = replay.get_update(), replay.get_state()
            # A row that builds on an update the store lacks (one dropped while the store was
            # failing, store.retention_full) stays pending in pycrdt: get_update() leaves it
            # out, and the check below cannot see it. So every source must be covered by the
            # replay's state vector: its diff against it (Yjs diffUpdate, in Rust) must hold no
            # struct, i.e. start with a client count of 0. (A pending deletion of structs the
            # store lacks is not caught: a delete set has no clocks to compare.)
            for source in sources:
                if pycrdt.get_update(source, state_vector)[:1] != b"\x00":
                    self._compaction_failed(doc_id, "a log row builds on an update the store does not hold")
                    return False
            # Verify by content, not bytes: pycrdt encodes map values in no fixed key order.
            # The checkpoint comes from the replay, so it holds nothing more; it holds nothing
            # less if every source, applied on top of it, changes nothing (deletions included).
            check: pycrdt.Doc[Any] = pycrdt.Doc()
            check.apply_update(update)
            changes: list[bytes] = []
            subscription = check.observe(lambda event: changes.append(event.update))
            try:
                for source in sources:
                    check.apply_update(source)
            finally:
                # pycrdt keeps an observed Doc alive until it is unobserved: without this every
                # compaction leaked a document's worth of memory.
                check.unobserve(subscription)
            if any(c != b"\x00\x00" for c in changes):
                self._compaction_failed(doc_id, "the merged checkpoint does not hold everything in the log")
                return False
            sealed_update, sealed_state_vector = self._seal(update, aad), self._seal(state_vector, aad)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # pycrdt panics are BaseExceptions
            self._compaction_failed(doc_id, f"{type(exc).__name__}: {exc}")
            return False
        upto_seq = rows[-1][0]
        version = max([checkpoint[1] if checkpoint else 0, *(r[1] for r in rows)])
        try:
            conn.execute("BEGIN IMMEDIATE")
            before = conn.execute(f"SELECT {_ROWS_NOW}", (doc_id,) * 3).fetchone()
            conn.execute(_PUT_CHECKPOINT, (doc_id, sealed_update, sealed_state_vector, version, upto_seq))
            conn.execute("DELETE FROM updates WHERE doc_id = ? AND seq <= ?", (doc_id, upto_seq))
            # Same content, other rows: a record that described the rows before still describes the context.
            conn.execute(
                f"UPDATE context_records SET (upto_seq, last_seq, log_rows) = (SELECT {_ROWS_NOW}) "
                "WHERE doc_id = ? AND (upto_seq, last_seq, log_rows) = (?, ?, ?)",
                (doc_id, doc_id, doc_id, doc_id, *before),
            )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(conn)
            self._compaction_failed(doc_id, f"cannot write the checkpoint: {exc}")
            raise _translate(exc, self.path, f"cannot write the checkpoint of {doc_id!r}") from exc
        self._log_rows[doc_id] = self._log_rows.get(doc_id, 0) - len(rows)
        self._log_bytes[doc_id] = max(0, self._log_bytes.get(doc_id, 0) - sum(len(r[2]) for r in rows))
        self._checkpoint_bytes[doc_id] = len(sealed_update)
        self._retry_at.pop(doc_id, None)
        self._compactions += 1
        try:  # give the freed pages back and keep the WAL from growing with big checkpoints
            conn.executescript("PRAGMA incremental_vacuum;")  # execute() would free one page only
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass  # only space is at stake; the next compaction tries again
        return True
