-- 0011: notes kept without being asked, and recalled by meaning (see the SQLite migration).
ALTER TABLE memories ADD COLUMN source TEXT NOT NULL DEFAULT 'user';
ALTER TABLE memories ADD COLUMN slot TEXT;
ALTER TABLE memories ADD COLUMN slot_key TEXT;
ALTER TABLE memories ADD COLUMN embedding TEXT;
CREATE INDEX memories_slot ON memories(user_id, slot_key);
