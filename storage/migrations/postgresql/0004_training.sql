-- 0004: nightly training: what each run did, and one lock so two processes never train at once.
ALTER TABLE training_runs ADD COLUMN kind TEXT NOT NULL DEFAULT 'user';
ALTER TABLE training_runs ADD COLUMN decision TEXT;
ALTER TABLE training_runs ADD COLUMN adapter_version INTEGER;
ALTER TABLE training_runs ADD COLUMN rated INTEGER NOT NULL DEFAULT 0;
CREATE INDEX training_runs_user ON training_runs(user_id, id);

ALTER TABLE adapters ADD COLUMN parent TEXT NOT NULL DEFAULT 'base';
ALTER TABLE adapters ADD COLUMN status_at DOUBLE PRECISION;

CREATE TABLE training_lock (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    holder       TEXT NOT NULL,
    acquired_at  DOUBLE PRECISION NOT NULL,
    expires_at   DOUBLE PRECISION NOT NULL
);
