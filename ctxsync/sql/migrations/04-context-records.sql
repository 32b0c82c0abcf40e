-- ctxsync store, schema version 4: what a context unloaded from memory keeps, kept on disk too.
--
-- When the daemon unloads a context (ctxsync/mesh.py, Mesh.unload) it writes the record it keeps
-- in memory (state vector, delete set, status figures). A start that finds a record whose version,
-- lineage and rows (checkpoint upto_seq, last log seq, log row count) are still the context's
-- takes it instead of rebuilding the context from its checkpoint and log; any other record is
-- ignored (and replaced at the next unload). A cache: deleting every row loses nothing.
CREATE TABLE context_records (
    doc_id  TEXT    PRIMARY KEY REFERENCES contexts (doc_id),
    version INTEGER NOT NULL,                -- the context's version when the record was made
    lineage TEXT    NOT NULL,                -- its lineage then
    data    BLOB    NOT NULL,                -- sealed JSON (aad: "record" NUL doc id)
    upto_seq INTEGER NOT NULL,               -- its checkpoint's upto_seq then (0: none)
    last_seq INTEGER NOT NULL,               -- its last log row's seq then (0: none)
    log_rows INTEGER NOT NULL                -- its log rows then
);
