"""The style policy's state: each user's statistics, the population model, and the rated styles it learns from."""

from __future__ import annotations

import logging
import time
from typing import Any

from storage.tables import Tables

log = logging.getLogger(__name__)


class PolicyState(Tables):
    """The policy's queries (``agent_core.stores.PolicyStore``)."""

    # --- the style policy ----------------------------------------------------------------

    async def rated_styles(self, user_id: int, since: float, limit: int) -> list[tuple[str, str | None, float]]:
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
