-- 0006: which key the sealed columns are under (storage/crypto.py). No row, or key_id
-- NULL: text is stored plain. rotating_to is set while `attune keys rotate` moves every
-- value to a new key, and cleared when it has finished.
CREATE TABLE encryption (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    key_id       BLOB,
    rotating_to  BLOB
);
