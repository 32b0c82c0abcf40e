-- ctxsync store, schema version 3: one history row per version instead of one per change.
--
-- A version made by a group commit (or a peer's batched update) holds hundreds of changes;
-- sealing and inserting each as its own row cost more CPU than the rest of the commit (issue 5).
-- From this version on, a row holds the changes idx .. idx + n - 1 of one version as one sealed
-- JSON array of n records. Rows written before it hold one record (a sealed JSON object), which
-- the default n = 1 describes.
ALTER TABLE history ADD COLUMN n INTEGER NOT NULL DEFAULT 1;
