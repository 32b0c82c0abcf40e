-- ctxsync store, schema version 2: history, snapshots, lineage, webhooks (issue 6).
--
-- Every BLOB is sealed by the store's cipher (AES-256-GCM-SIV with the node's store key),
-- with a per-table associated-data prefix, so a blob cannot be moved between tables or
-- contexts unnoticed. The JSON inside is described in ctxsync/store.py.

-- lineage: random id made when the context was first created on some node, and kept by
--   every node that got the context from it. Contexts from before lineage existed all read
--   as 'legacy' (and keep syncing with each other, as they did).
-- history_from: the lowest version from which every change is in the history table.
-- base_version: versions stay monotonic when a context's log is reset (context adopt).
ALTER TABLE contexts ADD COLUMN lineage TEXT NOT NULL DEFAULT 'legacy';
ALTER TABLE contexts ADD COLUMN history_from INTEGER NOT NULL DEFAULT 1;
ALTER TABLE contexts ADD COLUMN base_version INTEGER NOT NULL DEFAULT 0;
UPDATE contexts SET history_from = 1 + max(
    coalesce((SELECT max(version) FROM updates u WHERE u.doc_id = contexts.doc_id), 0),
    coalesce((SELECT version FROM checkpoints c WHERE c.doc_id = contexts.doc_id), 0)
);

-- One row per entry change applied here (local or remote), newest history_limit kept.
CREATE TABLE history (
    doc_id  TEXT    NOT NULL REFERENCES contexts (doc_id),
    version INTEGER NOT NULL,                -- the context's local version of the change
    idx     INTEGER NOT NULL,                -- position among the changes of that version
    data    BLOB    NOT NULL,                -- sealed JSON: t_ms, origin, key, value, previous, hlc
    PRIMARY KEY (doc_id, version, idx)
) WITHOUT ROWID;

-- Named (auto = 0) and automatic (auto = 1) recovery points: the entries as they were.
CREATE TABLE snapshots (
    id            TEXT    PRIMARY KEY,
    doc_id        TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    version       INTEGER NOT NULL,
    auto          INTEGER NOT NULL,
    info          BLOB    NOT NULL,          -- sealed JSON: label, meta, reason
    entries       BLOB    NOT NULL           -- sealed JSON: {key: value JSON text}
);
CREATE INDEX snapshots_doc_id ON snapshots (doc_id, created_at_ms);

-- Webhooks and their delivery cursor (the last version delivered or dead-lettered).
CREATE TABLE webhooks (
    id            TEXT    PRIMARY KEY,
    doc_id        TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    cursor        INTEGER NOT NULL,
    data          BLOB    NOT NULL           -- sealed JSON: url, prefix, secret
);

-- Batches whose delivery failed after the last retry (the dead-letter list).
CREATE TABLE webhook_failures (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id    TEXT    NOT NULL,
    failed_at_ms  INTEGER NOT NULL,
    data          BLOB    NOT NULL           -- sealed JSON: body, error, attempts
);
CREATE INDEX webhook_failures_webhook_id ON webhook_failures (webhook_id, seq);
