"""The conversation: people and chats, messages and replies, reactions, and what a reply needs to be written."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from storage.note_search import search_terms
from storage.rows import MemoryNote, Received, ReplyContext, ReplyRef, Unanswered
from storage.tables import Tables, insert
from storage.training import AdapterRow

log = logging.getLogger(__name__)

# ``messages.awaiting_reply`` of a message whose answer was deferred: the model could not
# answer it, and the person was told the answer comes as soon as it can.
DEFERRED = "deferred"


def _search_query(dialect: str, terms: list[str]) -> str | None:
    if not terms:
        return None
    return " OR ".join(f'"{t}"' for t in terms) if dialect == "sqlite" else " ".join(terms)


# The notes that share a word with a message, in each engine's full-text search: FTS5 on
# SQLite; on PostgreSQL the GIN-indexed term array.
_MATCHING = {
    "sqlite": "SELECT rowid FROM memories_fts WHERE memories_fts MATCH :query",
    "postgresql": "SELECT rowid FROM memories_fts WHERE words && attune_stems(:query)",
}


class Conversations(Tables):
    """The message pipeline's queries (``agent_core.stores.MessageStore``)."""

    # --- people and places -------------------------------------------------------

    async def resolve_user(self, platform: str, platform_user_id: str, name: str = "") -> int:
        """The user behind a platform identity, created on first sight."""
        key = (platform, platform_user_id)
        cached = self._users.get_fresh(key)
        if cached is not None:
            return cached
        async with self.db.transaction() as conn:
            rows = await conn.execute_fetchall(
                "SELECT user_id FROM identities WHERE platform = ? AND platform_user_id = ?", key
            )
            if rows:
                user_id = int(next(iter(rows))[0])
            else:
                now = time.time()
                user_id = await insert(conn, "INSERT INTO users (name, created_at) VALUES (?, ?)",
                                        (name or platform_user_id, now))  # fmt: skip
                await conn.execute(
                    "INSERT INTO identities (platform, platform_user_id, user_id, display_name, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (platform, platform_user_id, user_id, name, now),
                )
        self._users.put(key, user_id)
        return user_id

    async def find_user(self, platform: str, platform_user_id: str) -> int | None:
        """The user behind a platform identity, or None if never seen (nothing is created)."""
        row = await self.db.fetchone(
            "SELECT user_id FROM identities WHERE platform = ? AND platform_user_id = ?", (platform, platform_user_id)
        )
        return int(row[0]) if row else None

    async def user_exists(self, user_id: int) -> bool:
        return await self.db.fetchone("SELECT 1 FROM users WHERE id = ?", (user_id,)) is not None

    async def resolve_chat(self, platform: str, platform_chat_id: str, kind: str = "private") -> int:
        """The chat behind a platform's conversation id, created on first sight."""
        key = (platform, platform_chat_id)
        cached = self._chats.get_fresh(key)
        if cached is not None:
            return cached
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT OR IGNORE INTO chats (platform, platform_chat_id, kind, created_at) VALUES (?, ?, ?, ?)",
                (platform, platform_chat_id, kind, time.time()),
            )
            rows = await conn.execute_fetchall("SELECT id FROM chats WHERE platform = ? AND platform_chat_id = ?", key)
            chat_id = int(next(iter(rows))[0])
        self._chats.put(key, chat_id)
        return chat_id

    async def set_display_name(self, platform: str, platform_user_id: str, name: str) -> None:
        """The name a person chose (web chat): on their identity and their user."""
        user_id = await self.resolve_user(platform, platform_user_id, name)
        async with self.db.transaction() as conn:
            await conn.execute(
                "UPDATE identities SET display_name = ? WHERE platform = ? AND platform_user_id = ?",
                (name, platform, platform_user_id),
            )
            await conn.execute("UPDATE users SET name = ? WHERE id = ?", (name, user_id))

    # --- messages ------------------------------------------------------------------

    async def claim_event(self, platform: str, event_id: str, chat_id: str | None = None) -> bool:
        """Record a platform event id (in the platform's chat ``chat_id``); False if it was handled before."""
        cur = await self.db.execute(
            "INSERT OR IGNORE INTO processed_events (platform, event_id, processed_at, chat_id) VALUES (?, ?, ?, ?)",
            (platform, event_id, time.time(), chat_id),
        )
        return cur.rowcount == 1

    async def receive_message(
        self, user_id: int, chat_id: int, text: str, *, platform_message_id: str | None, event_id: str | None,
        at: float, owner: str | None = None,
    ) -> Received | None:  # fmt: skip
        """Commit an incoming message; None if its event id was seen before in this chat.
        ``owner`` (a process's boot id) marks it as awaiting that process's reply until
        :meth:`add_reply` or :meth:`settle`."""
        message_id = await self.db.insert(
            "INSERT OR IGNORE INTO messages (chat_id, user_id, role, text, platform_message_id, event_id, created_at,"
            " awaiting_reply) VALUES (?, ?, 'user', ?, ?, ?, ?, ?)",
            (chat_id, user_id, self.cipher.seal(text, "messages.text"), platform_message_id, event_id, at, owner),
        )
        if message_id is None:
            return None
        return Received(user_id=user_id, chat_id=chat_id, message_id=message_id)

    async def add_reply(
        self,
        received: Received,
        *,
        text: str,
        style: dict[str, str] | None,
        adapter_version: str | None,
        prompt: Sequence[Mapping[str, str]] | None,
        policy: Mapping[str, Any] | None = None,
        observed: dict[str, str] | None = None,
    ) -> int:
        """Store the bot's answer to ``received``, with the exact prompt it came from, how
        its style was decided (``style``: the style asked for) and the style its text has
        (``observed``); ``style`` and ``prompt`` are None for a reply memory wrote without
        the model ("Noted: ..."), which nothing learns from. The message no longer awaits a reply."""
        async with self.db.transaction() as conn:
            reply_id = await self._insert_reply(conn, received, text, style, adapter_version, prompt, policy, observed)
            await conn.execute("UPDATE messages SET awaiting_reply = NULL WHERE id = ?", (received.message_id,))
        return reply_id

    async def _insert_reply(
        self, conn: Any, received: Received, text: str, style: dict[str, str], adapter_version: str | None,
        prompt: Sequence[Mapping[str, str]], policy: Mapping[str, Any] | None, observed: dict[str, str] | None,
    ) -> int:  # fmt: skip
        return await insert(
            conn,
            "INSERT INTO messages (chat_id, user_id, role, text, reply_to, style, adapter_version,"
            " prompt, policy, created_at, observed_style) VALUES (?, ?, 'assistant', ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                received.chat_id,
                received.user_id,
                self.cipher.seal(text, "messages.text"),
                received.message_id,
                json.dumps(style) if style is not None else None,
                adapter_version,
                self.cipher.seal(json.dumps(list(prompt), ensure_ascii=False), "messages.prompt")
                if prompt is not None
                else None,
                json.dumps(policy) if policy is not None else None,
                time.time(),
                json.dumps(observed) if observed is not None else None,
            ),
        )

    async def settle(self, message_id: int) -> None:
        """The person was told their message got no answer (busy, the model failed): it no
        longer awaits one."""
        await self.db.execute("UPDATE messages SET awaiting_reply = NULL WHERE id = ?", (message_id,))

    async def defer(self, message_id: int) -> None:
        """The model could not answer now and the person was told the answer comes later:
        the message awaits a reply from whichever process can write one
        (:meth:`claim_deferred`, or :meth:`claim_unanswered` after a restart)."""
        await self.db.execute("UPDATE messages SET awaiting_reply = ? WHERE id = ?", (DEFERRED, message_id))

    _UNANSWERED = (
        "SELECT m.id, m.user_id, m.chat_id, m.text, m.created_at, m.platform_message_id, m.event_id,"
        " m.awaiting_reply, c.platform_chat_id, c.kind, i.platform_user_id, i.display_name"
        " FROM messages m JOIN chats c ON c.id = m.chat_id"
        " JOIN identities i ON i.user_id = m.user_id AND i.platform = c.platform"
    )

    async def claim_unanswered(self, platform: str, owner: str, *, before: float) -> list[Unanswered]:
        """The messages of ``platform`` received before ``before`` that another process
        (not ``owner``) took and never answered, or that wait for a later answer, oldest
        first, each now claimed by ``owner``: a message is claimed by one process only
        (the update checks the old owner), so none is answered twice."""
        rows = await self.db.fetchall(
            self._UNANSWERED
            + " WHERE m.awaiting_reply IS NOT NULL AND m.awaiting_reply != ? AND m.created_at < ? AND c.platform = ?"
            " ORDER BY m.id",
            (owner, before, platform),
        )
        return [claimed for r in rows if (claimed := await self._claim(r, platform, owner)) is not None]

    async def claim_deferred(self, platform: str, owner: str) -> Unanswered | None:
        """The oldest message of ``platform`` whose answer was deferred (:meth:`defer`),
        now claimed by ``owner``; None if there is none."""
        while True:
            rows = await self.db.fetchall(
                self._UNANSWERED + " WHERE m.awaiting_reply = ? AND c.platform = ? ORDER BY m.id LIMIT 1",
                (DEFERRED, platform),
            )
            if not rows:
                return None
            claimed = await self._claim(rows[0], platform, owner)
            if claimed is not None:
                return claimed

    async def _claim(self, r: Any, platform: str, owner: str) -> Unanswered | None:
        cur = await self.db.execute(
            "UPDATE messages SET awaiting_reply = ? WHERE id = ? AND awaiting_reply = ?", (owner, r[0], r[7])
        )
        if cur.rowcount != 1:
            return None  # another process claimed it first
        return Unanswered(
            received=Received(user_id=int(r[1]), chat_id=int(r[2]), message_id=int(r[0])),
            text=self.cipher.open(r[3], "messages.text"), created_at=float(r[4]), platform=platform,
            platform_chat_id=str(r[8]), chat_kind=str(r[9]), platform_user_id=str(r[10]),
            display_name=str(r[11] or ""), platform_message_id=r[5], event_id=r[6], told=r[7] == DEFERRED,
        )  # fmt: skip

    async def set_platform_message_id(self, message_id: int, platform_message_id: str) -> None:
        await self.db.execute(
            "UPDATE messages SET platform_message_id = ? WHERE id = ?", (platform_message_id, message_id)
        )

    async def find_reply(self, platform: str, platform_chat_id: str, platform_message_id: str) -> ReplyRef | None:
        row = await self.db.fetchone(
            "SELECT m.id, m.user_id FROM messages m JOIN chats c ON c.id = m.chat_id"
            " WHERE c.platform = ? AND c.platform_chat_id = ? AND m.platform_message_id = ?"
            " AND m.role = 'assistant'",
            (platform, platform_chat_id, platform_message_id),
        )
        return ReplyRef(message_id=int(row[0]), user_id=int(row[1])) if row else None

    async def reply_context(self, user_id: int, chat_id: int, *, before: float, turns: int) -> ReplyContext:
        """What a reply to a message sent at ``before`` needs: preferences, the serving
        adapter and this user's recent turns in this chat (the notes it recalls come from
        :meth:`note_candidates`). Strictly this user's: in a group chat nobody else's turns
        come back.

        One statement, so one round trip: the parts are tagged by ``kind``."""
        rows = await self.db.fetchall(
            "SELECT 'pref' AS kind, key AS a, value AS b, NULL AS c FROM preferences WHERE user_id = :user"
            " UNION ALL SELECT * FROM (SELECT 'adapter', CAST(version AS TEXT), path, user_id FROM adapters"
            "  WHERE status = 'active' AND (user_id = :user OR user_id IS NULL)"
            "  ORDER BY user_id IS NULL, version DESC LIMIT 1) AS adapter"
            " UNION ALL SELECT * FROM (SELECT 'turn', role, text, id FROM messages"
            "  WHERE user_id = :user AND chat_id = :chat AND created_at < :before"
            "  ORDER BY id DESC LIMIT :turns) AS turn",
            {"user": user_id, "chat": chat_id, "before": before, "turns": turns},
        )
        by_kind: dict[str, list[Any]] = {"pref": [], "adapter": [], "turn": []}
        for row in rows:
            by_kind[row[0]].append(row)
        adapter = next((AdapterRow(r[3], int(r[1]), str(r[2])) for r in by_kind["adapter"]), None)
        return ReplyContext(
            preferences={str(r[1]): str(r[2]) for r in by_kind["pref"]},
            adapter=adapter,
            turns=[(str(r[1]), self.cipher.open(r[2], "messages.text")) for r in reversed(by_kind["turn"])],
        )

    async def note_candidates(self, user_id: int, text: str, limit: int = 200) -> list[MemoryNote]:
        """This user's notes that recall weighs for a message ``text``: their newest ``limit``,
        each with its vector and whether it shares a word with ``text`` (the keyword half:
        FTS5 on SQLite, the term array on PostgreSQL)."""
        terms = search_terms(self.cipher, user_id, text)
        query = _search_query(self.db.dialect, terms)
        matching = f"m.id IN ({_MATCHING[self.db.dialect]})" if terms else "FALSE"
        rows = await self.db.fetchall(
            f"SELECT m.id, m.text, m.created_at, m.source, m.slot, m.embedding, {matching} FROM memories m"
            " WHERE m.user_id = :user ORDER BY m.id DESC LIMIT :limit",
            {"user": user_id, "limit": limit, "query": query},
        )
        return [self.note(r, keyword=bool(r[6])) for r in rows]

    async def history(self, user_id: int, chat_id: int, limit: int = 100) -> list[dict[str, Any]]:
        """This user's last messages in this chat, oldest first, each reply with the emoji
        they have on it."""
        rows = await self.db.fetchall(
            "SELECT * FROM (SELECT m.id, m.role, m.text, m.platform_message_id,"
            " (SELECT GROUP_CONCAT(r.emoji) FROM reactions r WHERE r.message_id = m.id AND r.user_id = m.user_id"
            "  AND r.removed_at IS NULL) AS reactions"
            " FROM messages m WHERE m.user_id = ? AND m.chat_id = ? ORDER BY m.id DESC LIMIT ?) AS recent ORDER BY id",
            (user_id, chat_id, limit),
        )
        return [
            {
                "role": r[1],
                "text": self.cipher.open(r[2], "messages.text"),
                "id": r[3],
                "reactions": str(r[4]).split(",") if r[4] else [],
            }
            for r in rows
        ]

    # --- reactions -------------------------------------------------------------------

    async def add_reaction(self, message_id: int, user_id: int, emoji: str, reward: float) -> bool:
        """Store a reaction; False if the same person's same emoji was already there."""
        async with self.db.transaction() as conn:
            rows = await conn.execute_fetchall(
                "SELECT removed_at FROM reactions WHERE message_id = ? AND user_id = ? AND emoji = ?",
                (message_id, user_id, emoji),
            )
            if any(row[0] is None for row in rows):
                return False
            await conn.execute(
                "INSERT INTO reactions (message_id, user_id, emoji, reward, created_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (message_id, user_id, emoji) DO UPDATE SET reward = excluded.reward,"
                " created_at = excluded.created_at, removed_at = NULL",
                (message_id, user_id, emoji, reward, time.time()),
            )
            return True

    async def remove_reaction(self, message_id: int, user_id: int, emoji: str) -> float | None:
        """Mark a reaction taken back; its reward, or None if there was none standing."""
        async with self.db.transaction() as conn:
            rows = await conn.execute_fetchall(
                "SELECT id, reward FROM reactions WHERE message_id = ? AND user_id = ? AND emoji = ?"
                " AND removed_at IS NULL",
                (message_id, user_id, emoji),
            )
            row = next(iter(rows), None)
            if row is None:
                return None
            await conn.execute("UPDATE reactions SET removed_at = ? WHERE id = ?", (time.time(), row[0]))
            return float(row[1])
