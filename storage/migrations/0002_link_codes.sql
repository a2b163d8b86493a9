-- 0002: one-time codes that join two platform accounts of one person (/link).
-- Only a hash of each code is kept; a code is single-use and expires.

CREATE TABLE link_codes (
    code_hash   TEXT PRIMARY KEY,
    user_id     INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    platform    TEXT NOT NULL,   -- where it was issued: it is entered on another platform
    expires_at  REAL NOT NULL
);
CREATE INDEX link_codes_user ON link_codes(user_id);
