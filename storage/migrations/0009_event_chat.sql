-- 0009: a handled event records the chat it happened in, so that /forget all removes the
-- event ids of the person's private chats by that column, whatever a platform's event ids
-- look like (agent_core.platforms.PlatformSpec.event_ids). NULL for older rows.
ALTER TABLE processed_events ADD COLUMN chat_id TEXT;
