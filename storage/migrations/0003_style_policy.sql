-- 0003: the style policy's state and log.

-- How each reply's style was decided: context, the probability of the choice, the
-- probability of each value per dimension (JSON), for evaluating policies offline.
ALTER TABLE messages ADD COLUMN policy TEXT;

-- What the policy learned about each user (agent_core.bandit.UserStats, binary).
-- reset_at: /prefs reset learning; reactions before it are no longer learned from.
CREATE TABLE policy_users (
    user_id     INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    stats       BLOB NOT NULL,
    reset_at    REAL NOT NULL DEFAULT 0,
    updated_at  REAL NOT NULL
);

-- What the population likes (agent_core.bandit.Population, binary): one row.
CREATE TABLE policy_population (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    model       BLOB NOT NULL,
    users       INTEGER NOT NULL,
    updated_at  REAL NOT NULL
);
