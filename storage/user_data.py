"""What attune keeps about a person, as their commands see it: notes, preferences, stats, export, linking, deletion."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from storage.note_search import note_terms, slot_key
from storage.rows import KeptNote, MemoryNote
from storage.tables import Tables, insert

log = logging.getLogger(__name__)


class UserData(Tables):
    """The commands' queries (``agent_core.stores.CommandStore``), and retention."""

    # --- long-term memory ------------------------------------------------------------

    async def add_memory(
        self, user_id: int, text: str, *, source: str = "user", slot: str | None = None, embedding: str | None = None
    ) -> int:
        """Keep a note (beside any other about the same slot); its id."""
        async with self.db.transaction() as conn:
            return await self._insert_note(conn, user_id, text, source, slot, embedding)

    async def keep_note(
        self, user_id: int, text: str, *, source: str, slot: str, embedding: str | None = None
    ) -> KeptNote:
        """Keep a note about ``slot``, deleting the notes about the same slot it replaces."""
        async with self.db.transaction() as conn:
            replaced = await self._take_slot(conn, user_id, slot)
            note_id = await self._insert_note(conn, user_id, text, source, slot, embedding)
        return KeptNote(note_id, replaced)

    async def forget_slot(self, user_id: int, slot: str) -> list[MemoryNote]:
        """Delete this user's notes about ``slot`` ("I no longer live in Lisbon"); those deleted."""
        async with self.db.transaction() as conn:
            return await self._take_slot(conn, user_id, slot)

    async def set_note_embedding(self, user_id: int, memory_id: int, embedding: str) -> None:
        """Store the vector of a note kept before the embedding model was in."""
        await self.db.execute(
            "UPDATE memories SET embedding = ? WHERE id = ? AND user_id = ?",
            (self.cipher.seal(embedding, "memories.embedding"), memory_id, user_id),
        )

    async def _insert_note(
        self, conn: Any, user_id: int, text: str, source: str, slot: str | None, embedding: str | None
    ) -> int:
        cipher = self.cipher
        memory_id = await insert(
            conn,
            "INSERT INTO memories (user_id, text, created_at, source, slot, slot_key, embedding)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                user_id, cipher.seal(text, "memories.text"), time.time(), source,
                cipher.seal(slot, "memories.slot") if slot else None, slot_key(cipher, slot),
                cipher.seal(embedding, "memories.embedding") if embedding else None,
            ),
        )  # fmt: skip
        await conn.execute(
            "INSERT INTO memories_fts (rowid, terms) VALUES (?, ?)", (memory_id, note_terms(cipher, user_id, text))
        )
        return memory_id

    async def _take_slot(self, conn: Any, user_id: int, slot: str) -> list[MemoryNote]:
        rows = await conn.execute_fetchall(
            "SELECT id, text, created_at, source, slot, embedding FROM memories WHERE user_id = ? AND slot_key = ?",
            (user_id, slot_key(self.cipher, slot)),
        )
        taken = [self.note(r) for r in rows]
        for note in taken:
            await conn.execute("DELETE FROM memories WHERE id = ?", (note.id,))
        return taken

    async def delete_memory(self, user_id: int, memory_id: int) -> bool:
        """Delete one of this user's notes; False if there is no such note of theirs."""
        cur = await self.db.execute("DELETE FROM memories WHERE id = ? AND user_id = ?", (memory_id, user_id))
        return cur.rowcount == 1

    async def list_memories(self, user_id: int, limit: int = 1000) -> list[MemoryNote]:
        """This user's notes, newest first."""
        rows = await self.db.fetchall(
            "SELECT id, text, created_at, source, slot, embedding FROM memories WHERE user_id = ?"
            " ORDER BY id DESC LIMIT ?",
            (user_id, limit),
        )
        return [self.note(r) for r in rows]

    # --- preferences -----------------------------------------------------------------

    async def preferences(self, user_id: int) -> dict[str, str]:
        rows = await self.db.fetchall("SELECT key, value FROM preferences WHERE user_id = ?", (user_id,))
        return {str(r[0]): str(r[1]) for r in rows}

    async def set_preference(self, user_id: int, key: str, value: str) -> None:
        await self.db.execute(
            "INSERT INTO preferences (user_id, key, value) VALUES (?, ?, ?)"
            " ON CONFLICT (user_id, key) DO UPDATE SET value = excluded.value",
            (user_id, key, value),
        )

    async def clear_preferences(self, user_id: int, keys: list[str] | None = None) -> None:
        if keys is None:
            await self.db.execute("DELETE FROM preferences WHERE user_id = ?", (user_id,))
            return
        async with self.db.transaction() as conn:
            for key in keys:
                await conn.execute("DELETE FROM preferences WHERE user_id = ? AND key = ?", (user_id, key))

    # --- what we know about one user ---------------------------------------------------

    async def stats(self, user_id: int) -> dict[str, Any]:
        """Counts and the reward history of the replies this user rated."""
        counts = await self.db.fetchone(
            "SELECT SUM(CASE WHEN role = 'user' THEN 1 ELSE 0 END), SUM(CASE WHEN role = 'assistant' THEN 1 ELSE 0 END)"
            " FROM messages WHERE user_id = ?",
            (user_id,),
        )
        rewards = await self.db.fetchall(
            "SELECT r.reward FROM reactions r JOIN messages m ON m.id = r.message_id"
            " WHERE r.user_id = ? AND m.user_id = ? AND r.removed_at IS NULL ORDER BY r.created_at",
            (user_id, user_id),
        )
        memories = await self.db.fetchone("SELECT COUNT(*) FROM memories WHERE user_id = ?", (user_id,))
        return {
            "messages": int(counts[0] or 0),
            "replies": int(counts[1] or 0),
            "rewards": [float(r[0]) for r in rewards],
            "memories": int(memories[0]),
        }

    async def export_user(self, user_id: int) -> dict[str, Any]:
        """Everything stored about one user, as plain data."""

        async def rows(sql: str) -> list[dict[str, Any]]:
            return [dict(r) for r in await self.db.fetchall(sql, (user_id,))]

        user = await rows("SELECT id, name, created_at FROM users WHERE id = ?")
        messages = await rows(
            "SELECT m.id, c.platform, c.platform_chat_id AS chat, m.role, m.text, m.platform_message_id,"
            " m.reply_to, m.style, m.observed_style, m.policy, m.adapter_version, m.created_at FROM messages m"
            " JOIN chats c ON c.id = m.chat_id WHERE m.user_id = ? ORDER BY m.id"
        )
        for message in messages:
            message["text"] = self.cipher.open(message["text"], "messages.text")
            for key in ("style", "observed_style", "policy"):
                message[key] = json.loads(message[key]) if message[key] else None
        memories = [
            {"id": n.id, "text": n.text, "created_at": n.created_at, "source": n.source, "slot": n.slot,
             "embedding": n.embedding}
            for n in reversed(await self.list_memories(user_id, limit=1_000_000))
        ]  # fmt: skip
        return {
            "user": user[0] if user else None,
            "identities": await rows(
                "SELECT platform, platform_user_id, display_name, created_at FROM identities WHERE user_id = ?"
            ),
            "preferences": await self.preferences(user_id),
            "memories": memories,
            "messages": messages,
            "reactions": await rows(
                "SELECT message_id, emoji, reward, created_at, removed_at FROM reactions WHERE user_id = ? ORDER BY id"
            ),
            "adapters": await rows(
                "SELECT version, status, metrics, created_at FROM adapters WHERE user_id = ? ORDER BY version"
            ),
            "training_runs": await rows(
                "SELECT id, status, started_at, finished_at, metrics FROM training_runs WHERE user_id = ? ORDER BY id"
            ),
        }

    async def reply_texts(self, user_id: int, limit: int) -> list[tuple[float, str]]:
        """The last ``limit`` replies to this user, oldest first: (when, text)."""
        rows = await self.db.fetchall(
            "SELECT * FROM (SELECT id, created_at, text FROM messages WHERE user_id = ? AND role = 'assistant'"
            " ORDER BY id DESC LIMIT ?) AS recent ORDER BY id",
            (user_id, limit),
        )
        return [(float(r[1]), self.cipher.open(r[2], "messages.text")) for r in rows]

    # --- linking accounts --------------------------------------------------------------

    async def add_link_code(self, user_id: int, platform: str, code_hash: str, expires_at: float) -> None:
        """Keep a new code for this user (their older codes stop working)."""
        async with self.db.transaction() as conn:
            await conn.execute("DELETE FROM link_codes WHERE user_id = ? OR expires_at < ?", (user_id, time.time()))
            await conn.execute(
                "INSERT INTO link_codes (code_hash, user_id, platform, expires_at) VALUES (?, ?, ?, ?)",
                (code_hash, user_id, platform, expires_at),
            )

    async def take_link_code(self, code_hash: str, now: float) -> tuple[int, str] | None:
        """Use up a code: (its user, the platform it was issued on), or None if unknown or expired."""
        async with self.db.transaction() as conn:
            rows = await conn.execute_fetchall(
                "SELECT user_id, platform, expires_at FROM link_codes WHERE code_hash = ?", (code_hash,)
            )
            row = next(iter(rows), None)
            if row is None:
                return None
            await conn.execute("DELETE FROM link_codes WHERE code_hash = ?", (code_hash,))
        return (int(row[0]), str(row[1])) if row[2] >= now else None

    async def merge_users(self, source: int, target: int) -> None:
        """Make ``source``'s accounts and data ``target``'s, then delete ``source``. On a
        clash (the same setting, the same reaction) ``target``'s own stays."""
        async with self.db.transaction() as conn:
            for table in ("identities", "messages", "training_runs"):
                await conn.execute(f"UPDATE {table} SET user_id = ? WHERE user_id = ?", (target, source))
            await conn.execute(  # on a clash the source's reaction stays behind and goes with the source
                "UPDATE reactions SET user_id = ? WHERE user_id = ? AND NOT EXISTS (SELECT 1 FROM reactions t"
                " WHERE t.user_id = ? AND t.message_id = reactions.message_id AND t.emoji = reactions.emoji)",
                (target, source, target),
            )
            await conn.execute(
                "INSERT OR IGNORE INTO preferences (user_id, key, value)"
                " SELECT ?, key, value FROM preferences WHERE user_id = ?",
                (target, source),
            )
            notes = await conn.execute_fetchall("SELECT id, text FROM memories WHERE user_id = ?", (source,))
            await conn.execute("UPDATE memories SET user_id = ? WHERE user_id = ?", (target, source))
            for note_id, text in notes:  # the search index carries the owner in every word
                terms = note_terms(self.cipher, target, self.cipher.open(text, "memories.text"))
                await conn.execute("UPDATE memories_fts SET terms = ? WHERE rowid = ?", (terms, note_id))
            # The source's adapters were trained for the source alone: kept as history, retired.
            top = next(iter(await conn.execute_fetchall(
                "SELECT COALESCE(MAX(version), 0) FROM adapters WHERE user_id = ?", (target,))))[0]  # fmt: skip
            await conn.execute(
                "UPDATE adapters SET user_id = ?, status = 'retired', version = version + ? WHERE user_id = ?",
                (target, top, source),
            )
            await conn.execute("DELETE FROM users WHERE id = ?", (source,))  # cascades what is left
        for key in [k for k, v in self._users.items() if v == source]:
            self._users[key] = target

    async def delete_messages_before(self, cutoff: float) -> int:
        """Retention: delete every message (and reply, and reactions on them) older than
        ``cutoff``; notes, preferences, learned style and adapters stay. The number deleted."""
        async with self.db.transaction() as conn:
            rows = await conn.execute_fetchall("SELECT COUNT(*) FROM messages WHERE created_at < ?", (cutoff,))
            deleted = int(next(iter(rows))[0])
            if deleted:
                await conn.execute("DELETE FROM messages WHERE created_at < ?", (cutoff,))
                await conn.execute(
                    "INSERT INTO audit_log (at, action, subject, detail) VALUES (?, 'retention', NULL, ?)",
                    (time.time(), json.dumps({"messages": deleted, "before": cutoff})),
                )
        if deleted and not await self.db.scrub():
            log.warning("old messages deleted, but a reader kept the WAL from being emptied; it empties later")
        return deleted

    async def delete_user(self, user_id: int) -> dict[str, int]:
        """Delete the user and every row about them (cascades: identities, messages and the
        replies to them, memories and their index, preferences, reactions, policy state,
        adapters and training records), their private chats and the ids of their handled
        events; leave an audit record with counts only; then scrub the files. The counts."""
        counted = await self.db.fetchone(
            "SELECT (SELECT COUNT(*) FROM messages WHERE user_id = ?),"
            " (SELECT COUNT(*) FROM memories WHERE user_id = ?), (SELECT COUNT(*) FROM reactions WHERE user_id = ?)",
            (user_id, user_id, user_id),
        )
        counts = dict(zip(("messages", "memories", "reactions"), map(int, counted or (0, 0, 0)), strict=True))
        async with self.db.transaction() as conn:
            chats = [int(r[0]) for r in await conn.execute_fetchall(
                "SELECT DISTINCT c.id FROM chats c JOIN messages m ON m.chat_id = c.id"
                " WHERE m.user_id = ? AND c.kind = 'private'", (user_id,))]  # fmt: skip
            private = [(str(r[0]), str(r[1])) for r in await conn.execute_fetchall(
                f"SELECT platform, platform_chat_id FROM chats WHERE id IN ({','.join('?' * len(chats))})", chats)
            ] if chats else []  # fmt: skip
            await conn.execute("DELETE FROM reactions WHERE user_id = ?", (user_id,))
            await conn.execute("DELETE FROM users WHERE id = ?", (user_id,))
            for chat in chats:  # a private chat was theirs alone; its id is often their own
                await conn.execute(
                    "DELETE FROM chats WHERE id = ? AND NOT EXISTS (SELECT 1 FROM messages WHERE chat_id = ?)",
                    (chat, chat),
                )
            for platform, chat_id in private:  # the ids of the events handled in their private chats
                await conn.execute(
                    "DELETE FROM processed_events WHERE platform = ? AND chat_id = ?", (platform, chat_id)
                )
                prefix = f"{chat_id}:"  # rows from before 0009 have no chat_id: ids that start with it
                await conn.execute(
                    "DELETE FROM processed_events"
                    " WHERE chat_id IS NULL AND platform = ? AND substr(event_id, 1, ?) = ?",
                    (platform, len(prefix), prefix),
                )
            await conn.execute(
                "INSERT INTO audit_log (at, action, subject, detail) VALUES (?, 'forget_all', ?, ?)",
                (time.time(), user_id, json.dumps(counts)),
            )
        for key in [k for k, v in self._users.items() if v == user_id]:
            del self._users[key]
        if not await self.db.scrub():
            log.warning("user %d deleted, but a reader kept the WAL from being emptied; it empties later", user_id)
        return counts
