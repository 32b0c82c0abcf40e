-- ctxsync store, schema version 1.
--
-- Run once, on a new empty database, inside one BEGIN IMMEDIATE ... COMMIT by
-- ctxsync/store.py, which then sets PRAGMA user_version = 1. Later changes go
-- into ../migrations/NN-*.sql, never into this file.
--
-- Every BLOB is a Yjs v1 update or state vector as passed through the store's
-- seal function (identity until encryption at rest lands).

-- 0x63747873 = "ctxs": tells a ctxsync store from any other SQLite file.
PRAGMA application_id = 1668577395;

-- One row per context; a context exists once created or first written to.
CREATE TABLE contexts (
    doc_id        TEXT    PRIMARY KEY,
    created_at_ms INTEGER NOT NULL           -- Unix time, milliseconds
);

-- Append-only log of updates since the context's checkpoint.
-- AUTOINCREMENT: a seq is never reused after compaction deletes rows.
CREATE TABLE updates (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id  TEXT    NOT NULL REFERENCES contexts (doc_id),
    version INTEGER NOT NULL,                -- the context's local change counter
    data    BLOB    NOT NULL                 -- sealed Yjs v1 update
);

CREATE INDEX updates_doc_id_seq ON updates (doc_id, seq);

-- The merge of every update of a context up to and including upto_seq.
CREATE TABLE checkpoints (
    doc_id       TEXT    PRIMARY KEY REFERENCES contexts (doc_id),
    data         BLOB    NOT NULL,           -- sealed Yjs v1 update of the whole document
    state_vector BLOB    NOT NULL,           -- sealed Yjs state vector of data
    version      INTEGER NOT NULL,           -- highest version merged
    upto_seq     INTEGER NOT NULL            -- last updates.seq merged
);

-- Small node-wide settings.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
