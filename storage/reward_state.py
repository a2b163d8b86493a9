"""The reward models' state: each user's weights (and the words behind them), everyone's,
and the rated reply texts they are fitted on."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from storage.tables import Tables


@dataclass(frozen=True)
class RewardModelRow:
    """A user's stored reward model."""

    weights: bytes
    rated: int  # their reactions it was fitted on
    terms: list[dict[str, object]]  # the n-grams behind its strongest weights (agent_core.reward_model.Term)
    strength: float | None  # the steering strength measured for them (None: not yet)
    reset_at: float  # reactions before this are not learned from (/prefs reset learning)
    updated_at: float


class RewardState(Tables):
    """The reward models' queries (``agent_core.stores.SteeringStore``)."""

    async def reward_model(self, user_id: int) -> RewardModelRow | None:
        row = await self.db.fetchone(
            "SELECT weights, rated, terms, strength, reset_at, updated_at FROM reward_models WHERE user_id = ?",
            (user_id,),
        )
        if row is None:
            return None
        terms = json.loads(self.cipher.open(row[2], "reward_models.terms"))
        strength = None if row[3] is None else float(row[3])
        return RewardModelRow(bytes(row[0]), int(row[1]), terms, strength, float(row[4]), float(row[5]))

    async def save_reward_model(
        self, user_id: int, weights: bytes, rated: int, terms: list[dict[str, object]], *, reset_at: float | None = None
    ) -> None:
        """Store a refitted model (the measured strength stays; ``reset_at`` given: a reset)."""
        sealed = self.cipher.seal(json.dumps(terms, ensure_ascii=False), "reward_models.terms")
        await self.db.execute(
            "INSERT INTO reward_models (user_id, weights, rated, terms, reset_at, updated_at)"
            " VALUES (?, ?, ?, ?, COALESCE(?, 0), ?)"
            " ON CONFLICT (user_id) DO UPDATE SET weights = excluded.weights, rated = excluded.rated,"
            " terms = excluded.terms, updated_at = excluded.updated_at,"
            " reset_at = COALESCE(?, reward_models.reset_at),"
            " strength = CASE WHEN CAST(? AS REAL) IS NULL THEN reward_models.strength ELSE NULL END",
            (user_id, weights, rated, sealed, reset_at, time.time(), reset_at, reset_at),
        )

    async def set_steering_strength(self, user_id: int, strength: float | None) -> None:
        await self.db.execute("UPDATE reward_models SET strength = ? WHERE user_id = ?", (strength, user_id))

    async def reward_population(self) -> tuple[bytes, int] | None:
        row = await self.db.fetchone("SELECT weights, rated FROM reward_population WHERE id = 1")
        return (bytes(row[0]), int(row[1])) if row else None

    async def save_reward_population(self, weights: bytes, rated: int) -> None:
        await self.db.execute(
            "INSERT INTO reward_population (id, weights, rated, updated_at) VALUES (1, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET weights = excluded.weights, rated = excluded.rated,"
            " updated_at = excluded.updated_at",
            (weights, rated, time.time()),
        )

    async def rated_texts(
        self, user_id: int | None, since: float = 0.0, limit: int = 500
    ) -> list[tuple[int, str, float]]:
        """The newest ``limit`` replies one user (None: anyone) rated at or after ``since``,
        oldest first: (user, reply text, mean standing reward); neutral ones left out."""
        rows = await self.db.fetchall(
            "SELECT * FROM (SELECT m.id, m.user_id, m.text, AVG(r.reward) AS reward FROM messages m"
            " JOIN reactions r ON r.message_id = m.id AND r.user_id = m.user_id AND r.removed_at IS NULL"
            " WHERE m.role = 'assistant' AND m.style IS NOT NULL AND (CAST(? AS BIGINT) IS NULL OR m.user_id = ?)"
            " AND r.created_at >= ?"
            " GROUP BY m.id ORDER BY m.id DESC LIMIT ?) AS rated WHERE reward <> 0 ORDER BY id",
            (user_id, user_id, since, limit),
        )
        return [(int(r[1]), self.cipher.open(r[2], "messages.text"), float(r[3])) for r in rows]

    async def reward_reset_times(self) -> dict[int, float]:
        """Users who reset their learning, and when (their earlier reactions teach no one)."""
        rows = await self.db.fetchall("SELECT user_id, reset_at FROM reward_models WHERE reset_at > 0")
        return {int(r[0]): float(r[1]) for r in rows}
