-- 0001: the core schema. Times are UTC seconds since the epoch (REAL).

CREATE TABLE users (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  REAL NOT NULL
);

-- One user can be known on several platforms.
CREATE TABLE identities (
    platform          TEXT NOT NULL,
    platform_user_id  TEXT NOT NULL,
    user_id           INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    display_name      TEXT NOT NULL DEFAULT '',
    created_at        REAL NOT NULL,
    PRIMARY KEY (platform, platform_user_id)
);
CREATE INDEX identities_user ON identities(user_id);

CREATE TABLE chats (
    id                INTEGER PRIMARY KEY,
    platform          TEXT NOT NULL,
    platform_chat_id  TEXT NOT NULL,
    kind              TEXT NOT NULL CHECK (kind IN ('private', 'group')),
    created_at        REAL NOT NULL,
    UNIQUE (platform, platform_chat_id)
);

-- Both sides of the conversation. For a bot reply, user_id is the person it answers,
-- reply_to the message it answers, prompt the exact prompt sent to the model.
-- event_id is the platform's id of the incoming event: a redelivered one is ignored.
CREATE TABLE messages (
    id                   INTEGER PRIMARY KEY,
    chat_id              INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    user_id              INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role                 TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    text                 TEXT NOT NULL,
    platform_message_id  TEXT,
    reply_to             INTEGER REFERENCES messages(id) ON DELETE SET NULL,
    style                TEXT,
    adapter_version      TEXT,
    prompt               TEXT,
    event_id             TEXT,
    created_at           REAL NOT NULL
);
CREATE INDEX messages_user_chat ON messages(user_id, chat_id, id);
CREATE UNIQUE INDEX messages_event ON messages(chat_id, event_id) WHERE event_id IS NOT NULL;
CREATE INDEX messages_platform_id ON messages(chat_id, platform_message_id);

-- One row per (reply, person, emoji); removed_at set when the reaction is taken back.
CREATE TABLE reactions (
    id          INTEGER PRIMARY KEY,
    message_id  INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    user_id     INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    emoji       TEXT NOT NULL,
    reward      REAL NOT NULL,
    created_at  REAL NOT NULL,
    removed_at  REAL,
    UNIQUE (message_id, user_id, emoji)
);
CREATE INDEX reactions_user ON reactions(user_id);

CREATE TABLE preferences (
    user_id  INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    key      TEXT NOT NULL,
    value    TEXT NOT NULL,
    PRIMARY KEY (user_id, key)
);

CREATE TABLE memories (
    id          INTEGER PRIMARY KEY,
    user_id     INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    text        TEXT NOT NULL,
    created_at  REAL NOT NULL
);
CREATE INDEX memories_user ON memories(user_id, id);

-- Full-text index over memories. Each word is indexed with its owner's prefix
-- ("u12_cat"), so a search reads only that user's entries and costs the same whatever
-- the number of users. Rows are added with their memory (storage/queries.py) and
-- removed by the trigger, also when a user's deletion cascades.
CREATE VIRTUAL TABLE memories_fts USING fts5(terms, tokenize = "porter unicode61 tokenchars '_'");
CREATE TRIGGER memories_ad AFTER DELETE ON memories BEGIN
    DELETE FROM memories_fts WHERE rowid = old.id;
END;

-- LoRA adapters; user_id NULL for the population adapter.
CREATE TABLE adapters (
    id          INTEGER PRIMARY KEY,
    user_id     INTEGER REFERENCES users(id) ON DELETE CASCADE,
    version     INTEGER NOT NULL,
    path        TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('candidate', 'active', 'retired', 'rejected')),
    metrics     TEXT,
    created_at  REAL NOT NULL,
    UNIQUE (user_id, version)
);

CREATE TABLE training_runs (
    id           INTEGER PRIMARY KEY,
    user_id      INTEGER REFERENCES users(id) ON DELETE CASCADE,
    status       TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'cancelled')),
    started_at   REAL NOT NULL,
    finished_at  REAL,
    metrics      TEXT,
    log          TEXT NOT NULL DEFAULT ''
);

-- Ids of other platform events already handled (reactions, commands), so a redelivered
-- one is not counted twice. Messages carry their own event_id.
CREATE TABLE processed_events (
    platform      TEXT NOT NULL,
    event_id      TEXT NOT NULL,
    processed_at  REAL NOT NULL,
    PRIMARY KEY (platform, event_id)
) WITHOUT ROWID;
