-- 0005: a record of each deletion asked for by a user, with counts and never content.
CREATE TABLE audit_log (
    id       INTEGER PRIMARY KEY,
    at       REAL NOT NULL,
    action   TEXT NOT NULL,             -- 'forget_all'
    subject  INTEGER,                   -- the user's number then (their rows are gone)
    detail   TEXT NOT NULL DEFAULT ''   -- counts only
);
