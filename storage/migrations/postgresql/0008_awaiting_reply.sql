-- 0008: an incoming message not answered yet carries the boot id of the process that took
-- it (`awaiting_reply`); storing the reply, or telling the person it failed, clears it.
-- A process that starts answers those a dead one left (agent_core.missed), so a message
-- stored just before a crash is not left without an answer. NULL for older rows.
ALTER TABLE messages ADD COLUMN awaiting_reply TEXT;
CREATE INDEX messages_awaiting ON messages(created_at) WHERE awaiting_reply IS NOT NULL;
