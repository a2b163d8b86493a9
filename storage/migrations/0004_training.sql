-- 0004: nightly training: what each run did, and one lock so two processes never train at once.

-- kind: 'population' (user_id NULL) or 'user'. decision: 'promoted', 'rejected' or
-- NULL while running or when the run failed. adapter_version: the candidate it made.
ALTER TABLE training_runs ADD COLUMN kind TEXT NOT NULL DEFAULT 'user';
ALTER TABLE training_runs ADD COLUMN decision TEXT;
ALTER TABLE training_runs ADD COLUMN adapter_version INTEGER;
ALTER TABLE training_runs ADD COLUMN rated INTEGER NOT NULL DEFAULT 0;
CREATE INDEX training_runs_user ON training_runs(user_id, id);

-- What an adapter was trained on top of ('base' or 'population-v3'), and when it last
-- changed status (promoted, retired, rolled back).
ALTER TABLE adapters ADD COLUMN parent TEXT NOT NULL DEFAULT 'base';
ALTER TABLE adapters ADD COLUMN status_at REAL;

-- At most one row: the process training now. A holder that died leaves a row whose
-- expires_at passes (the holder renews it while it works), so the lock frees itself.
CREATE TABLE training_lock (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    holder       TEXT NOT NULL,
    acquired_at  REAL NOT NULL,
    expires_at   REAL NOT NULL
);
