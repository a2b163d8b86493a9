-- 0002: one-time codes that join two platform accounts of one person (/link).
CREATE TABLE link_codes (
    code_hash   TEXT PRIMARY KEY,
    user_id     BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    platform    TEXT NOT NULL,
    expires_at  DOUBLE PRECISION NOT NULL
);
CREATE INDEX link_codes_user ON link_codes(user_id);
