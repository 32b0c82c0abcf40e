"""
Recovery points: snapshots of a context's entries, diffs between them, and restore.

A *snapshot* is an immutable copy of a context's live entries (``{key: value JSON text}``) at
one version, kept in the store (sealed) on this node only: snapshots are local recovery points,
not replicated. Named snapshots are made on request (``ctxsync snapshot create``), and one
before an adopt; they are kept until deleted. Automatic ones are made before every restore and
every ``[contexts] snapshot_every`` versions, or, for a context with more entries than that,
every as many versions as it has entries (so copying costs about one entry per change at
most); the newest ``snapshot_keep`` of them are kept per context.

A *restore* makes the context equal to a snapshot as **one new forward write**: every key whose
value differs is set, every key the snapshot lacks is deleted, in one transaction. It therefore
reaches every peer like any other write, merges with concurrent writes elsewhere like any
write (latest wins per key), works offline, and can itself be undone by restoring the automatic
recovery point taken just before it.

Only the entries are snapshotted and restored: other root types a Yjs application keeps in the
same document (a ``Y.Text``) are not (docs/contexts.md).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

import structlog

from ctxsync.config import ContextsConfig
from ctxsync.errors import EntryError, NotFound
from ctxsync.mesh import Context, Mesh
from ctxsync.store import Store, StoredSnapshot
from ctxsync.types import DocId, NodeId

log = structlog.get_logger("ctxsync.recovery")

MAX_LABEL_CHARS = 200
"""Longest snapshot label, in characters."""
MAX_META_BYTES = 65_536
"""Largest snapshot metadata, in bytes of JSON."""


def new_snapshot_id() -> str:
    """A snapshot id: ``snap-`` then 12 hex digits of milliseconds and 6 random hex digits (time ordered)."""
    return f"snap-{time.time_ns() // 1_000_000:012x}{secrets.token_hex(3)}"


def diff_entries(old: dict[str, str], new: dict[str, str]) -> dict[str, Any]:
    """
    Compare two entry maps (``{key: value JSON text}``).

    Returns:
        ``{"added": {key: new}, "removed": {key: old}, "changed": {key: [old, new]}}``, values
        as JSON text, keys sorted.
    """
    added = {k: new[k] for k in sorted(new.keys() - old.keys())}
    removed = {k: old[k] for k in sorted(old.keys() - new.keys())}
    changed = {k: [old[k], new[k]] for k in sorted(old.keys() & new.keys()) if old[k] != new[k]}
    return {"added": added, "removed": removed, "changed": changed}


def snapshot_json(snap: StoredSnapshot) -> dict[str, Any]:
    """A snapshot's description as the API shows it (no entries)."""
    return {
        "id": snap.id,
        "context": snap.doc_id,
        "created_at_ms": snap.created_at_ms,
        "time": _iso(snap.created_at_ms),
        "version": snap.version,
        "label": snap.info.get("label"),
        "meta": snap.info.get("meta"),
        "auto": snap.auto,
        "reason": snap.info.get("reason"),
        "entries": snap.info.get("entries"),
    }


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


class Recovery:
    """
    Snapshots, diff and restore for every context of one node.

    Args:
        mesh: The node's mesh (contexts are read and written through it).
        store: The node's store (snapshots are kept there).
        config: ``[contexts]`` (``snapshot_every``; the store applies ``snapshot_keep``).
    """

    def __init__(self, mesh: Mesh, store: Store, config: ContextsConfig) -> None:
        self.mesh = mesh
        self.store = store
        self.config = config
        self._tasks: set[asyncio.Task[Any]] = set()
        mesh.on_version.append(self._on_version)

    def _on_version(self, ctx: Context) -> None:
        every = self.config.snapshot_every
        # A snapshot copies every entry: for a context larger than snapshot_every, wait as many
        # versions as it has entries, so the copying costs at most about one entry per change.
        if every and ctx.version - ctx.snapshot_at >= max(every, len(ctx.entries)):
            ctx.snapshot_at = ctx.version
            entries = {e.key: e.value for e in ctx.entries.entries()}
            task = asyncio.get_running_loop().create_task(
                self._store(ctx.doc_id, ctx.version, entries, label=None, meta=None, auto=True,
                            reason=f"every {every} changes", quiet=True)
            )  # fmt: skip
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Wait for automatic snapshots being written (at shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def create(
        self,
        doc_id: DocId,
        *,
        label: str | None = None,
        meta: Any = None,
        auto: bool = False,
        reason: str = "requested",
    ) -> dict[str, Any]:
        """
        Take a snapshot of a context's live entries now, durably.

        Args:
            label: A name for people (at most :data:`MAX_LABEL_CHARS`).
            meta: Any JSON value (at most :data:`MAX_META_BYTES` encoded), kept with it.
            auto: An automatic recovery point (subject to retention) rather than a named one.
            reason: Why it was taken (shown in lists).

        Returns:
            The snapshot's description (see :func:`snapshot_json`).

        Raises:
            NotFound: No such context.
            EntryError: Label or metadata too large.
            StoreError: It could not be stored.
        """
        if label is not None and len(label) > MAX_LABEL_CHARS:
            raise EntryError(f"label is {len(label)} characters; the limit is {MAX_LABEL_CHARS}")
        if meta is not None and len(json.dumps(meta)) > MAX_META_BYTES:
            raise EntryError(f"metadata is over {MAX_META_BYTES} bytes of JSON")
        entries = {e.key: e.value for e in self.mesh.entries(doc_id)}
        return await self._store(doc_id, self.mesh.version_of(doc_id), entries, label=label, meta=meta, auto=auto, reason=reason)

    async def _store(
        self,
        doc_id: DocId,
        version: int,
        entries: dict[str, str],
        *,
        label: str | None,
        meta: Any,
        auto: bool,
        reason: str,
        quiet: bool = False,
    ) -> dict[str, Any]:
        info = {"label": label, "meta": meta, "reason": reason, "entries": len(entries)}
        snap = StoredSnapshot(new_snapshot_id(), doc_id, time.time_ns() // 1_000_000, version, auto, info, entries)
        try:
            await self.store.put_snapshot(snap)
        except Exception as exc:
            if not quiet:
                raise
            log.error("snapshot.failed", doc_id=doc_id, version=version, error=str(exc))
            return snapshot_json(snap)
        log.info(
            "snapshot.created", doc_id=doc_id, snapshot_id=snap.id, version=version, entries=len(entries),
            auto=auto, reason=reason,
        )  # fmt: skip
        return snapshot_json(snap)

    async def list(self, doc_id: DocId | None = None) -> list[dict[str, Any]]:
        """Every snapshot (of ``doc_id``, or of all contexts), oldest first. Raises StoreError."""
        return [snapshot_json(s) for s in await self.store.list_snapshots(doc_id)]

    async def get(self, snapshot_id: str) -> StoredSnapshot:
        """
        One snapshot with its entries.

        Raises:
            NotFound: No snapshot with that id.
            StoreError: It could not be read.
        """
        snap = await self.store.get_snapshot(snapshot_id)
        if snap is None:
            raise NotFound(f"no snapshot {snapshot_id!r} (see ctxsync snapshot list)")
        return snap

    async def diff(self, snapshot_id: str, other_id: str | None = None) -> dict[str, Any]:
        """
        What changed from a snapshot to another snapshot of the same context, or to the
        context as it is now (``other_id`` None).

        Returns:
            ``{"from", "to", "context", "added", "removed", "changed"}`` (see :func:`diff_entries`).

        Raises:
            NotFound: A snapshot or the context is missing.
            EntryError: The two snapshots are of different contexts.
        """
        old = await self.get(snapshot_id)
        assert old.entries is not None
        if other_id is None:
            new_entries = {e.key: e.value for e in self.mesh.entries(old.doc_id)}
            to: str = "current"
        else:
            new = await self.get(other_id)
            if new.doc_id != old.doc_id:
                raise EntryError(f"{snapshot_id} is of context {old.doc_id!r} and {other_id} of {new.doc_id!r}")
            assert new.entries is not None
            new_entries, to = new.entries, new.id
        return {"context": old.doc_id, "from": old.id, "to": to, **diff_entries(old.entries, new_entries)}

    async def restore(self, doc_id: DocId, snapshot_id: str) -> dict[str, Any]:
        """
        Make a context equal to a snapshot, as one new forward write (see the module docstring).

        An automatic recovery point of the context as it is is taken first; restoring that
        point undoes the restore.

        Returns:
            ``{"context", "snapshot", "version", "changed", "recovery_point"}``: the version the
            restore made (the current one if nothing differed), how many entries it changed,
            and the id of the recovery point (``None`` if nothing differed).

        Raises:
            NotFound: No such snapshot or context.
            EntryError: The snapshot is of another context.
            StoreError: The recovery point or the write could not be stored (nothing changed).
        """
        snap = await self.get(snapshot_id)
        if snap.doc_id != doc_id:
            raise EntryError(f"snapshot {snapshot_id} is of context {snap.doc_id!r}, not {doc_id!r}")
        assert snap.entries is not None
        current = {e.key: e.value for e in self.mesh.entries(doc_id)}
        items: list[tuple[str, str | None]] = [(k, v) for k, v in sorted(snap.entries.items()) if current.get(k) != v]
        items += [(k, None) for k in sorted(current.keys() - snap.entries.keys())]
        if not items:
            version = self.mesh.version_of(doc_id)
            return {"context": doc_id, "snapshot": snapshot_id, "version": version, "changed": 0, "recovery_point": None}
        point = await self._store(
            doc_id, self.mesh.version_of(doc_id), current, label=f"before restoring {snapshot_id}",
            meta=None, auto=True, reason="before restore",
        )  # fmt: skip
        version, changed = await self.mesh.write(doc_id, items)
        log.info(
            "context.restored", doc_id=doc_id, snapshot_id=snapshot_id, version=version, changed=changed,
            recovery_point=point["id"],
        )  # fmt: skip
        return {"context": doc_id, "snapshot": snapshot_id, "version": version, "changed": changed, "recovery_point": point["id"]}

    async def adopt(self, doc_id: DocId, peer_id: NodeId) -> dict[str, Any]:
        """
        Take a peer's lineage of a context (:meth:`Mesh.adopt`), after a named snapshot of
        this node's own content, so that it can be restored onto the adopted context.

        Returns:
            :meth:`Mesh.adopt`'s result plus ``"recovery_point"`` (``None`` if the context was
            not here).

        Raises:
            As :meth:`Mesh.adopt`; StoreError if the snapshot could not be stored.
        """
        point = None
        if self.mesh.has_context(doc_id):
            snap = await self.create(doc_id, label=f"before adopting from {peer_id[:7]}", auto=False, reason="before adopt")
            point = snap["id"]
        result = await self.mesh.adopt(doc_id, peer_id)
        return {**result, "recovery_point": point}

    async def delete(self, snapshot_id: str) -> None:
        """Delete a snapshot. Raises NotFound if there is none, StoreError if it failed."""
        if not await self.store.delete_snapshot(snapshot_id):
            raise NotFound(f"no snapshot {snapshot_id!r}")
