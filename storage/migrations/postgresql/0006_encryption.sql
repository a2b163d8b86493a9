-- 0006: which key the sealed columns are under (storage/crypto.py).
CREATE TABLE encryption (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    key_id       BYTEA,
    rotating_to  BYTEA
);
