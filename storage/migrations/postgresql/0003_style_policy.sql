-- 0003: the style policy's state and log.
ALTER TABLE messages ADD COLUMN policy TEXT;

CREATE TABLE policy_users (
    user_id     BIGINT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    stats       BYTEA NOT NULL,
    reset_at    DOUBLE PRECISION NOT NULL DEFAULT 0,
    updated_at  DOUBLE PRECISION NOT NULL
);

CREATE TABLE policy_population (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    model       BYTEA NOT NULL,
    users       INTEGER NOT NULL,
    updated_at  DOUBLE PRECISION NOT NULL
);
