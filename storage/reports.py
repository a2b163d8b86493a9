"""Read-only aggregates for the operator's dashboard: who talks, how they react, what was learned."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from storage.database import Database

# A rated reply: a reaction by the person the reply answered (only those teach).
_RATED = (
    "FROM reactions r JOIN messages m ON m.id = r.message_id"
    " WHERE r.user_id = m.user_id AND r.removed_at IS NULL AND m.role = 'assistant'"
)


@dataclass
class UserSummary:
    id: int
    name: str
    platforms: list[str]
    messages: int
    reactions: int
    mean_reward: float | None
    preferences: dict[str, str] = field(default_factory=dict)
    # dimension -> value -> (mean reward, number of rated replies with that value)
    style_rewards: dict[str, dict[str, tuple[float, int]]] = field(default_factory=dict)


class Reports:
    def __init__(self, db: Database) -> None:
        self.db = db

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

    async def users(self) -> list[UserSummary]:
        rows = await self.db.fetchall(
            "SELECT u.id, u.name,"
            " (SELECT GROUP_CONCAT(DISTINCT platform) FROM identities i WHERE i.user_id = u.id),"
            " (SELECT COUNT(*) FROM messages m WHERE m.user_id = u.id AND m.role = 'user'),"
            " (SELECT COUNT(*) FROM reactions r WHERE r.user_id = u.id AND r.removed_at IS NULL)"
            " FROM users u ORDER BY u.id"
        )
        users = {
            int(r[0]): UserSummary(int(r[0]), str(r[1]), sorted(str(r[2] or "").split(",")) if r[2] else [],
                                   int(r[3]), int(r[4]), None)
            for r in rows
        }  # fmt: skip
        for key, value, user_id in await self.db.fetchall("SELECT key, value, user_id FROM preferences"):
            if user_id in users:
                users[user_id].preferences[str(key)] = str(value)
        totals: dict[int, list[float]] = defaultdict(list)
        by_style: dict[int, dict[tuple[str, str], list[float]]] = defaultdict(lambda: defaultdict(list))
        shown = await self.db.fetchall(f"SELECT r.user_id, r.reward, COALESCE(m.observed_style, m.style) {_RATED}")
        for user_id, reward, style in shown:
            totals[user_id].append(float(reward))
            for dim, value in (json.loads(style) if style else {}).items():
                by_style[user_id][(dim, value)].append(float(reward))
        for user_id, summary in users.items():
            rewards = totals.get(user_id)
            summary.mean_reward = sum(rewards) / len(rewards) if rewards else None
            for (dim, value), values in sorted(by_style[user_id].items()):
                summary.style_rewards.setdefault(dim, {})[value] = (sum(values) / len(values), len(values))
        return list(users.values())

    async def daily_activity(self) -> list[dict[str, Any]]:
        """Messages from people and reactions, per day (UTC)."""
        rows = await self.db.fetchall(
            "SELECT day, SUM(messages), SUM(reactions) FROM ("
            " SELECT date(created_at, 'unixepoch') AS day, 1 AS messages, 0 AS reactions FROM messages"
            "  WHERE role = 'user'"
            " UNION ALL SELECT date(created_at, 'unixepoch'), 0, 1 FROM reactions"
            ") AS events GROUP BY day ORDER BY day"
        )
        return [{"day": str(r[0]), "messages": int(r[1]), "reactions": int(r[2])} for r in rows]

    async def reward_by_day(self) -> dict[str, list[tuple[str, float, int]]]:
        """Mean reward of rated replies per day: ``"all"`` and one series per user id."""
        rows = await self.db.fetchall(
            f"SELECT date(r.created_at, 'unixepoch') AS day, r.user_id, AVG(r.reward), COUNT(*) {_RATED}"
            " GROUP BY day, r.user_id ORDER BY day"
        )
        series: dict[str, list[tuple[str, float, int]]] = defaultdict(list)
        overall: dict[str, list[float]] = defaultdict(list)
        for day, user_id, mean, count in rows:
            series[str(user_id)].append((str(day), float(mean), int(count)))
            overall[str(day)] += [float(mean)] * int(count)
        series["all"] = [(day, sum(v) / len(v), len(v)) for day, v in sorted(overall.items())]
        return dict(series)

    async def adapters(self) -> list[dict[str, Any]]:
        rows = await self.db.fetchall(
            "SELECT a.id, a.user_id, u.name, a.version, a.status, a.parent, a.metrics, a.created_at"
            " FROM adapters a LEFT JOIN users u ON u.id = a.user_id ORDER BY a.created_at DESC"
        )
        return [dict(r) for r in rows]

    async def training_runs(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = await self.db.fetchall(
            "SELECT t.id, t.user_id, u.name, t.kind, t.status, t.decision, t.rated, t.started_at, t.finished_at,"
            " t.metrics, t.log"
            " FROM training_runs t LEFT JOIN users u ON u.id = t.user_id ORDER BY t.started_at DESC LIMIT ?",
            (limit,),
        )
        return [dict(r) for r in rows]
