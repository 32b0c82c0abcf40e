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
from typing import Any, Literal, TypeAlias, TypeVar, cast

import pycrdt

from ctxsync.errors import InvalidState, SchemaVersionError, StoreCorrupt, StoreError
from ctxsync.seal import ChecksumCipher, Cipher
from ctxsync.types import DocId

__all__ = ["Migration", "Store", "StoreKeyError", "StoreStats", "StoredContext", "migrate", "schema_version"]


class StoreKeyError(StoreError):
    """The store was sealed with another key or cipher than the one given; it is left untouched."""


_CHECK_PLAINTEXT = b"ctxsync store key check v1"
_CHECK_AAD = b"meta"

APPLICATION_ID = 0x63747873
"""``PRAGMA application_id`` of every ctxsync store ("ctxs"), set by the v1 schema."""

BUSY_TIMEOUT_S = 5.0
"""How long SQLite waits for a lock held by another connection, in seconds."""

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


@dataclass(slots=True, eq=False)
class _Op:
    """A write joins the next group-committed transaction; a call runs alone after it; close stops."""

    future: asyncio.Future[Any]
    kind: Literal["write", "call", "close"]
    fn: Callable[[sqlite3.Connection], Any] = lambda conn: None


_Job: TypeAlias = _Append | _Op
_Outcome: TypeAlias = tuple["asyncio.Future[Any]", Any, BaseException | None]


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
    """

    def __init__(
        self,
        path: str | Path,
        *,
        compact_threshold: int = 2000,
        cipher: Cipher | None = None,
    ) -> None:
        if compact_threshold < 1:
            raise ValueError("compact_threshold must be at least 1")
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
        closed = self._submit(_Op(self._future(), "close"), force=True)
        try:
            await closed
        finally:
            await asyncio.to_thread(self._thread.join)
            self._state = "closed"

    # -- public API (event loop thread) --------------------------------------------------------

    def append_nowait(self, doc_id: DocId, version: int, update: bytes) -> asyncio.Future[None]:
        """
        Queue one update for the next group commit, creating its context row if needed.

        Args:
            doc_id: Context the update belongs to.
            version: The context's version after this update.
            update: Yjs v1 update, unsealed.

        Returns:
            A future that completes once the update is committed, or fails with
            :class:`StoreError` (chaining the SQLite error) if its transaction failed.
        """
        job = _Append(self._future(), doc_id, version, bytes(update), _now_ms())
        return self._submit(job)

    async def append(self, doc_id: DocId, version: int, update: bytes) -> None:
        """
        Store one update durably: return only once it is committed.

        Arguments as for :meth:`append_nowait`. If the caller is cancelled, the update may
        still be committed.

        Raises:
            StoreError: If the transaction failed; nothing of it is stored.
        """
        await self.append_nowait(doc_id, version, update)

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
                jobs = [self._queue.get()]
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
            rows = self._log_rows.get(doc_id, 0)
            if rows > self.compact_threshold and rows >= self._retry_at.get(doc_id, 0) and self._log_is_large(doc_id):
                try:
                    self._compact_now(conn, doc_id)
                except Exception as exc:
                    self._compaction_failed(doc_id, str(self._error(exc, "compaction failed")))
        return close

    def _commit(self, conn: sqlite3.Connection, appends: list[_Append], writes: list[_Op]) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        rows: list[tuple[str, int, bytes]] = []
        contexts: dict[str, int] = {}
        sealed: list[_Append] = []
        for a in appends:
            try:
                rows.append((a.doc_id, a.version, self._seal(a.update, a.doc_id.encode())))
            except Exception as exc:
                error = StoreError(f"cannot seal an update of context {a.doc_id!r}: {exc}")
                error.__cause__ = exc
                outcomes.append((a.future, None, error))
                continue
            contexts.setdefault(a.doc_id, a.created_at_ms)
            sealed.append(a)
        committed: list[_Job] = [*sealed, *writes]
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT OR IGNORE INTO contexts (doc_id, created_at_ms) VALUES (?, ?)", contexts.items()
            )
            conn.executemany("INSERT INTO updates (doc_id, version, data) VALUES (?, ?, ?)", rows)
            for w in writes:
                w.fn(conn)
            conn.execute("COMMIT")
        except Exception as exc:
            self._rollback(conn)
            what = f"cannot commit {len(sealed)} updates and {len(writes)} writes"
            return outcomes + [(j.future, None, self._error(exc, what)) for j in committed]
        self._commits += 1
        self._appends += len(sealed)
        for a, row in zip(sealed, rows, strict=True):
            self._log_rows[a.doc_id] = self._log_rows.get(a.doc_id, 0) + 1
            self._log_bytes[a.doc_id] = self._log_bytes.get(a.doc_id, 0) + len(row[2])
        return outcomes + [(j.future, None, None) for j in committed]

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
                f"SELECT doc_id, created_at_ms FROM contexts {where} ORDER BY doc_id", args
            ).fetchall()
            checkpoints = {
                r[0]: r[1:] for r in conn.execute(f"SELECT doc_id, data, version, upto_seq FROM checkpoints {where}", args)
            }
            log: dict[str, list[tuple[int, int, bytes]]] = {}
            for doc_id, seq, version, data in conn.execute(
                f"SELECT doc_id, seq, version, data FROM updates {where} ORDER BY doc_id, seq", args
            ):
                log.setdefault(doc_id, []).append((seq, version, data))
        finally:
            conn.execute("COMMIT")
        loaded = []
        for doc_id, created_at_ms in contexts:
            updates, version, upto_seq = [], 0, 0
            if doc_id in checkpoints:
                data, version, upto_seq = checkpoints[doc_id]
                updates.append(self._unseal_or_corrupt(data, doc_id, "the checkpoint"))
            for seq, row_version, data in log.get(doc_id, []):
                if seq > upto_seq:
                    updates.append(self._unseal_or_corrupt(data, doc_id, f"update {seq}"))
                    version = max(version, row_version)
            loaded.append(StoredContext(DocId(doc_id), updates, version, created_at_ms))
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
        """Replay checkpoint + log, verify the merge, then swap it in; return whether it was written."""
        rows = conn.execute(
            "SELECT seq, version, data FROM updates WHERE doc_id = ? ORDER BY seq", (doc_id,)
        ).fetchall()
        if not rows:
            return False
        checkpoint = conn.execute(
            "SELECT data, version FROM checkpoints WHERE doc_id = ?", (doc_id,)
        ).fetchone()
        aad = doc_id.encode()
        try:
            sources = [self._unseal(checkpoint[0], aad)] if checkpoint is not None else []
            sources += [self._unseal(data, aad) for _, _, data in rows]
            replay: pycrdt.Doc[Any] = pycrdt.Doc()
            for source in sources:
                replay.apply_update(source)
            update, state_vector = replay.get_update(), replay.get_state()
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
            conn.execute(_PUT_CHECKPOINT, (doc_id, sealed_update, sealed_state_vector, version, upto_seq))
            conn.execute("DELETE FROM updates WHERE doc_id = ? AND seq <= ?", (doc_id, upto_seq))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(conn)
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
