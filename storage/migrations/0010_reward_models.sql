-- 0010: each user's reward model, which steers their replies (agent_core/steering.py).
--
-- weights:  the logistic regression's weights (float32, agent_core.reward_model.DIM of them);
-- terms:    the word n-grams of the user's own rated replies behind its strongest weights, as
--           JSON, read back in /stats (their words: sealed under encryption at rest);
-- strength: the steering strength the nightly measurement chose for them (NULL: not yet);
-- reset_at: /prefs reset learning; reactions before it are no longer learned from.
CREATE TABLE reward_models (
    id          INTEGER PRIMARY KEY,
    user_id     INTEGER NOT NULL UNIQUE REFERENCES users(id) ON DELETE CASCADE,
    weights     BLOB NOT NULL,
    rated       INTEGER NOT NULL,
    terms       TEXT NOT NULL,
    strength    REAL,
    reset_at    REAL NOT NULL DEFAULT 0,
    updated_at  REAL NOT NULL
);

-- Everyone's reward model, each user's prior: one row.
CREATE TABLE reward_population (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    weights     BLOB NOT NULL,
    rated       INTEGER NOT NULL,
    updated_at  REAL NOT NULL
);
