"""Every query attune runs, named for what it does; no SQL lives outside storage/."""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from storage.database import Database
from storage.note_search import note_terms, search_terms

log = logging.getLogger(__name__)

_CACHE_SIZE = 50_000


@dataclass(frozen=True)
class Received:
    """An incoming message, committed: who sent it, where, and its row id."""

    user_id: int
    chat_id: int
    message_id: int


@dataclass(frozen=True)
class Unanswered:
    """A message stored by a process that stopped before answering it, claimed by this one."""

    received: Received
    text: str
    created_at: float
    platform: str
    platform_chat_id: str
    chat_kind: str
    platform_user_id: str
    display_name: str
    platform_message_id: str | None
    event_id: str | None


@dataclass(frozen=True)
class ReplyRef:
    """A stored bot reply that a reaction points at."""

    message_id: int
    user_id: int  # the person the reply answered


@dataclass(frozen=True)
class MemoryNote:
    id: int
    text: str
    created_at: float


@dataclass(frozen=True)
class ActiveAdapter:
    version: int
    path: str
    user_id: int | None  # None: the population adapter


@dataclass(frozen=True)
class ReplyContext:
    """Everything a reply to one user needs from the database, read at once."""

    preferences: dict[str, str]
    adapter: ActiveAdapter | None
    notes: list[str]  # long-term notes: those relevant to the message best first, then the newest
    turns: list[tuple[str, str]]  # (role, text) of this user's recent turns in this chat, oldest first


class _LRU(OrderedDict[tuple[str, str], int]):
    def get_fresh(self, key: tuple[str, str]) -> int | None:
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key: tuple[str, str], value: int) -> None:
        self[key] = value
        if len(self) > _CACHE_SIZE:
            self.popitem(last=False)


def _search_query(dialect: str, terms: list[str]) -> str | None:
    if not terms:
        return None
    return " OR ".join(f'"{t}"' for t in terms) if dialect == "sqlite" else " ".join(terms)


# Notes relevant to a message, best first, in each engine's full-text search: FTS5 with
# BM25 on SQLite; on PostgreSQL the GIN-indexed term array, ranked by terms matched.
_RELEVANT = {
    "sqlite": " UNION ALL SELECT * FROM (SELECT 'note', CAST(m.id AS TEXT), m.text, bm25(memories_fts)"
    "  FROM memories_fts f JOIN memories m ON m.id = f.rowid WHERE memories_fts MATCH :query"
    "  ORDER BY bm25(memories_fts) LIMIT :notes) AS note",
    "postgresql": " UNION ALL SELECT * FROM (SELECT 'note', CAST(m.id AS TEXT), m.text,"
    "  -(SELECT COUNT(*) FROM unnest(f.words) AS w WHERE w = ANY(attune_stems(:query))) AS rank"
    "  FROM memories_fts f JOIN memories m ON m.id = f.rowid WHERE f.words && attune_stems(:query)"
    "  ORDER BY rank, m.id DESC LIMIT :notes) AS note",
}


async def _insert(conn: Any, sql: str, params: tuple[Any, ...]) -> int:
    """Run an INSERT in one hop; the new row's id."""
    return int((await conn.execute_insert(sql, params))[0])


class Store:
    """Queries over one :class:`Database`; ids in and out are the core's own."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.cipher = db.cipher
        self._users = _LRU()  # (platform, platform user id) -> user id
        self._chats = _LRU()  # (platform, platform chat id) -> chat id

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
                user_id = await _insert(conn, "INSERT INTO users (name, created_at) VALUES (?, ?)",
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

    async def totals(self) -> dict[str, int]:
        """Counts over all users, for operators."""
        row = await self.db.fetchone(
            "SELECT (SELECT COUNT(*) FROM users),"
            " (SELECT COUNT(*) FROM messages WHERE role = 'user'),"
            " (SELECT COUNT(*) FROM messages WHERE role = 'assistant'),"
            " (SELECT COUNT(*) FROM reactions WHERE removed_at IS NULL),"
            " (SELECT COUNT(*) FROM adapters WHERE status = 'active')"
        )
        assert row is not None
        return dict(zip(("users", "messages", "replies", "reactions", "active_adapters"), map(int, row), strict=True))

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
        style: dict[str, str],
        adapter_version: str | None,
        prompt: Sequence[Mapping[str, str]],
        policy: Mapping[str, Any] | None = None,
        observed: dict[str, str] | None = None,
    ) -> int:
        """Store the bot's answer to ``received``, with the exact prompt it came from, how
        its style was decided (``style``: the style asked for) and the style its text has
        (``observed``). The message no longer awaits a reply."""
        async with self.db.transaction() as conn:
            reply_id = await self._insert_reply(conn, received, text, style, adapter_version, prompt, policy, observed)
            await conn.execute("UPDATE messages SET awaiting_reply = NULL WHERE id = ?", (received.message_id,))
        return reply_id

    async def _insert_reply(
        self, conn: Any, received: Received, text: str, style: dict[str, str], adapter_version: str | None,
        prompt: Sequence[Mapping[str, str]], policy: Mapping[str, Any] | None, observed: dict[str, str] | None,
    ) -> int:  # fmt: skip
        return await _insert(
            conn,
            "INSERT INTO messages (chat_id, user_id, role, text, reply_to, style, adapter_version,"
            " prompt, policy, created_at, observed_style) VALUES (?, ?, 'assistant', ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                received.chat_id,
                received.user_id,
                self.cipher.seal(text, "messages.text"),
                received.message_id,
                json.dumps(style),
                adapter_version,
                self.cipher.seal(json.dumps(list(prompt), ensure_ascii=False), "messages.prompt"),
                json.dumps(policy) if policy is not None else None,
                time.time(),
                json.dumps(observed) if observed is not None else None,
            ),
        )

    async def settle(self, message_id: int) -> None:
        """The person was told their message got no answer (busy, the model failed): it no
        longer awaits one."""
        await self.db.execute("UPDATE messages SET awaiting_reply = NULL WHERE id = ?", (message_id,))

    async def claim_unanswered(self, platform: str, owner: str, *, before: float) -> list[Unanswered]:
        """The messages of ``platform`` received before ``before`` that another process
        (not ``owner``) took and never answered, oldest first, each now claimed by
        ``owner``: a message is claimed by one process only (the update checks the old
        owner), so none is answered twice."""
        rows = await self.db.fetchall(
            "SELECT m.id, m.user_id, m.chat_id, m.text, m.created_at, m.platform_message_id, m.event_id,"
            " m.awaiting_reply, c.platform_chat_id, c.kind, i.platform_user_id, i.display_name"
            " FROM messages m JOIN chats c ON c.id = m.chat_id"
            " JOIN identities i ON i.user_id = m.user_id AND i.platform = c.platform"
            " WHERE m.awaiting_reply IS NOT NULL AND m.awaiting_reply != ? AND m.created_at < ? AND c.platform = ?"
            " ORDER BY m.id",
            (owner, before, platform),
        )
        claimed = []
        for r in rows:
            cur = await self.db.execute(
                "UPDATE messages SET awaiting_reply = ? WHERE id = ? AND awaiting_reply = ?", (owner, r[0], r[7])
            )
            if cur.rowcount != 1:
                continue  # another process claimed it first
            claimed.append(Unanswered(
                received=Received(user_id=int(r[1]), chat_id=int(r[2]), message_id=int(r[0])),
                text=self.cipher.open(r[3], "messages.text"), created_at=float(r[4]), platform=platform,
                platform_chat_id=str(r[8]), chat_kind=str(r[9]), platform_user_id=str(r[10]),
                display_name=str(r[11] or ""), platform_message_id=r[5], event_id=r[6],
            ))  # fmt: skip
        return claimed

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

    async def reply_context(
        self, user_id: int, chat_id: int, text: str, *, before: float, turns: int, notes: int
    ) -> ReplyContext:
        """What a reply to ``text`` (sent at ``before``) needs: preferences, the serving
        adapter, notes recalled by relevance (FTS5, BM25) then recency, and recent turns.
        Strictly this user's: in a group chat nobody else's turns or notes come back.

        One statement, so one round trip: the parts are tagged by ``kind``."""
        terms = search_terms(self.cipher, user_id, text)
        query = _search_query(self.db.dialect, terms)
        rows = await self.db.fetchall(
            "SELECT 'pref' AS kind, key AS a, value AS b, NULL AS c FROM preferences WHERE user_id = :user"
            " UNION ALL SELECT * FROM (SELECT 'adapter', CAST(version AS TEXT), path, user_id FROM adapters"
            "  WHERE status = 'active' AND (user_id = :user OR user_id IS NULL)"
            "  ORDER BY user_id IS NULL, version DESC LIMIT 1) AS adapter"
            " UNION ALL SELECT * FROM (SELECT 'turn', role, text, id FROM messages"
            "  WHERE user_id = :user AND chat_id = :chat AND created_at < :before"
            "  ORDER BY id DESC LIMIT :turns) AS turn"
            + (_RELEVANT[self.db.dialect] if terms else "")
            + " UNION ALL SELECT * FROM (SELECT 'newest', CAST(id AS TEXT), text, -id FROM memories"
            "  WHERE user_id = :user ORDER BY id DESC LIMIT :notes) AS newest",
            {"user": user_id, "chat": chat_id, "before": before, "turns": turns, "notes": notes, "query": query},
        )
        by_kind: dict[str, list[Any]] = {"pref": [], "adapter": [], "turn": [], "note": [], "newest": []}
        for row in rows:
            by_kind[row[0]].append(row)
        adapter = next((ActiveAdapter(int(r[1]), str(r[2]), r[3]) for r in by_kind["adapter"]), None)
        recalled: dict[int, str | bytes] = {}
        for row in sorted(by_kind["note"], key=lambda r: r[3]) + by_kind["newest"]:
            recalled.setdefault(int(row[1]), row[2])
        return ReplyContext(
            preferences={str(r[1]): str(r[2]) for r in by_kind["pref"]},
            adapter=adapter,
            notes=[self.cipher.open(n, "memories.text") for n in list(recalled.values())[: max(notes, 0)]],
            turns=[(str(r[1]), self.cipher.open(r[2], "messages.text")) for r in reversed(by_kind["turn"])],
        )

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

    # --- long-term memory ------------------------------------------------------------

    async def add_memory(self, user_id: int, text: str) -> int:
        async with self.db.transaction() as conn:
            memory_id = await _insert(
                conn,
                "INSERT INTO memories (user_id, text, created_at) VALUES (?, ?, ?)",
                (user_id, self.cipher.seal(text, "memories.text"), time.time()),
            )
            await conn.execute(
                "INSERT INTO memories_fts (rowid, terms) VALUES (?, ?)",
                (memory_id, note_terms(self.cipher, user_id, text)),
            )
        return memory_id

    async def delete_memory(self, user_id: int, memory_id: int) -> bool:
        """Delete one of this user's notes; False if there is no such note of theirs."""
        cur = await self.db.execute("DELETE FROM memories WHERE id = ? AND user_id = ?", (memory_id, user_id))
        return cur.rowcount == 1

    async def list_memories(self, user_id: int, limit: int = 1000) -> list[MemoryNote]:
        rows = await self.db.fetchall(
            "SELECT id, text, created_at FROM memories WHERE user_id = ? ORDER BY id DESC LIMIT ?",
            (user_id, limit),
        )
        return [MemoryNote(int(r[0]), self.cipher.open(r[1], "memories.text"), float(r[2])) for r in rows]

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

    # --- adapters --------------------------------------------------------------------

    async def active_adapter(self, user_id: int) -> ActiveAdapter | None:
        """The adapter serving this user: their own, else the population's, else None."""
        row = await self.db.fetchone(
            "SELECT version, path, user_id FROM adapters WHERE status = 'active'"
            " AND (user_id = ? OR user_id IS NULL) ORDER BY user_id IS NULL, version DESC LIMIT 1",
            (user_id,),
        )
        return ActiveAdapter(int(row[0]), str(row[1]), row[2]) if row else None

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
        memories = await rows("SELECT id, text, created_at FROM memories WHERE user_id = ? ORDER BY id")
        for memory in memories:
            memory["text"] = self.cipher.open(memory["text"], "memories.text")
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

    # --- the style policy ----------------------------------------------------------------

    async def rated_replies(self, user_id: int, since: float, limit: int) -> list[tuple[str, str | None, float]]:
        """The last ``limit`` replies this user rated (reactions given at or after
        ``since``), oldest first: (the style the reply has as JSON, the context the policy
        saw, mean standing reward). The style is the one observed in the text; for replies
        stored before that was recorded, the requested one."""
        rows = await self.db.fetchall(
            "SELECT * FROM (SELECT m.id, COALESCE(m.observed_style, m.style), json_extract(m.policy, '$.context'),"
            " AVG(r.reward) FROM messages m"
            " JOIN reactions r ON r.message_id = m.id AND r.user_id = m.user_id AND r.removed_at IS NULL"
            " WHERE m.user_id = ? AND m.role = 'assistant' AND m.style IS NOT NULL AND r.created_at >= ?"
            " GROUP BY m.id ORDER BY m.id DESC LIMIT ?) AS rated ORDER BY id",
            (user_id, since, limit),
        )
        return [(str(r[1]), r[2], float(r[3])) for r in rows]

    async def realisations(self, recent: int, user_id: int | None = None) -> list[tuple[str, str, int]]:
        """How the last ``recent`` replies (all users', or one user's) turned out: (style
        asked for as JSON, style observed as JSON, how many replies)."""
        mine = " AND user_id = ?" if user_id is not None else ""
        params: tuple[Any, ...] = (user_id, recent) if user_id is not None else (recent,)
        rows = await self.db.fetchall(
            "SELECT style, observed_style, COUNT(*) FROM (SELECT style, observed_style FROM messages"
            " WHERE role = 'assistant' AND style IS NOT NULL AND observed_style IS NOT NULL" + mine
            + " ORDER BY id DESC LIMIT ?) AS recent GROUP BY style, observed_style",
            params,
        )  # fmt: skip
        return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]

    async def policy_user(self, user_id: int) -> tuple[bytes, float] | None:
        """What the policy learned about this user, and when they last reset it."""
        row = await self.db.fetchone("SELECT stats, reset_at FROM policy_users WHERE user_id = ?", (user_id,))
        return (bytes(row[0]), float(row[1])) if row else None

    async def save_policy_user(self, user_id: int, stats: bytes, reset_at: float | None = None) -> None:
        await self.db.execute(
            "INSERT INTO policy_users (user_id, stats, reset_at, updated_at) VALUES (?, ?, COALESCE(?, 0), ?)"
            " ON CONFLICT (user_id) DO UPDATE SET stats = excluded.stats, updated_at = excluded.updated_at,"
            " reset_at = COALESCE(?, policy_users.reset_at)",
            (user_id, stats, reset_at, time.time(), reset_at),
        )

    async def policy_user_ids(self) -> set[int]:
        return {int(r[0]) for r in await self.db.fetchall("SELECT user_id FROM policy_users")}

    async def all_policy_users(self) -> list[tuple[int, bytes]]:
        rows = await self.db.fetchall("SELECT user_id, stats FROM policy_users")
        return [(int(r[0]), bytes(r[1])) for r in rows]

    async def policy_population(self) -> bytes | None:
        row = await self.db.fetchone("SELECT model FROM policy_population WHERE id = 1")
        return bytes(row[0]) if row else None

    async def save_policy_population(self, model: bytes, users: int) -> None:
        await self.db.execute(
            "INSERT INTO policy_population (id, model, users, updated_at) VALUES (1, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET model = excluded.model, users = excluded.users,"
            " updated_at = excluded.updated_at",
            (model, users, time.time()),
        )

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
