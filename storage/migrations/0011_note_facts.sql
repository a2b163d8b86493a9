-- 0011: notes kept without being asked, and recalled by meaning (agent_core/memory/).
--
-- source:    'user' (/remember, "remember that ...") or 'auto' (a fact the user stated in passing);
-- slot:      what the note is about ("home", "pet:cat"): a newer note with the same slot
--            replaces it (sealed like the text under encryption at rest);
-- slot_key:  the slot as the search index holds a word (a keyed hash under encryption), to find
--            the note a correction replaces without opening every note;
-- embedding: the note's text as a vector (all-MiniLM-L6-v2, float16, base64; sealed like the text).
ALTER TABLE memories ADD COLUMN source TEXT NOT NULL DEFAULT 'user';
ALTER TABLE memories ADD COLUMN slot TEXT;
ALTER TABLE memories ADD COLUMN slot_key TEXT;
ALTER TABLE memories ADD COLUMN embedding TEXT;
CREATE INDEX memories_slot ON memories(user_id, slot_key);
