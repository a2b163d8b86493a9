"""What nightly training reads and writes: rated replies, runs, adapters, and the lock.

An adapter row moves through ``candidate`` → ``active`` (promoted) → ``retired``
(replaced by a newer one), or ends ``rejected`` (failed the gate, or rolled back).
At most one adapter per owner is active; the population adapter has ``user_id`` NULL.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from storage.database import Database


@dataclass(frozen=True)
class RatedReply:
    """One reply its addressee reacted to: the prompt exactly as sent, and the net reward."""

    message_id: int
    user_id: int
    prompt: list[dict[str, str]]
    text: str
    reward: float  # mean of the addressee's standing reactions, in [-1, 1]
    created_at: float
    style: dict[str, str] | None = None  # the style that was asked for (the decoding control's)


@dataclass(frozen=True)
class Candidate:
    """A user and how much feedback they gave since their last training."""

    user_id: int
    name: str
    new_rated: int
    rated: int
    last_trained: float  # 0: never


@dataclass(frozen=True)
class AdapterRow:
    """One row of ``adapters``. Serving reads only whose it is, its version and its files
    (``Store.reply_context``, :meth:`TrainingRecords.serving`); the rest keep their defaults there."""

    user_id: int | None  # None: the population adapter
    version: int
    path: str
    status: str = "active"
    parent: str = ""  # what it was trained on top of: "base", or another adapter's name
    metrics: dict[str, Any] = field(default_factory=dict)  # the held-out figures of its gate
    created_at: float = 0.0
    since: float | None = None  # when it took its status (an active one: since when it serves)

    @property
    def name(self) -> str:
        owner = "population" if self.user_id is None else f"user-{self.user_id}"
        return f"{owner}-v{self.version}"


class TrainingRecords:
    def __init__(self, db: Database) -> None:
        self.db = db

    # --- the lock ------------------------------------------------------------------------

    async def acquire_lock(self, holder: str, ttl_s: float) -> bool:
        """Take the training lock unless a live holder has it. A holder renews it every
        ``ttl_s / 4`` (:meth:`renew_lock`); it is taken over only once it has been expired
        for ``ttl_s / 4 + 5`` s more, so that a holder cut off from the database by an
        outage shorter than ``ttl_s`` renews it before anyone can take it."""
        now = time.time()
        stale_before = now - (ttl_s / 4 + 5.0)
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO training_lock (id, holder, acquired_at, expires_at) VALUES (1, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, acquired_at = excluded.acquired_at,"
                " expires_at = excluded.expires_at WHERE training_lock.expires_at < ?",
                (holder, now, now + ttl_s, stale_before),
            )
            row = next(iter(await conn.execute_fetchall("SELECT holder FROM training_lock WHERE id = 1")))
            return str(row[0]) == holder

    async def renew_lock(self, holder: str, ttl_s: float) -> bool:
        """Extend ``holder``'s lock; False if it no longer holds it."""
        cur = await self.db.execute(
            "UPDATE training_lock SET expires_at = ? WHERE id = 1 AND holder = ?", (time.time() + ttl_s, holder)
        )
        return cur.rowcount == 1

    async def release_lock(self, holder: str) -> None:
        await self.db.execute("DELETE FROM training_lock WHERE id = 1 AND holder = ?", (holder,))

    async def lock_holder(self) -> str | None:
        row = await self.db.fetchone(
            "SELECT holder FROM training_lock WHERE id = 1 AND expires_at >= ?", (time.time(),)
        )
        return str(row[0]) if row else None

    # --- data ----------------------------------------------------------------------------

    async def candidates(self, user_ids: list[int] | None = None) -> list[Candidate]:
        """Every user with rated replies, with how many are new since their last good run."""
        rows = await self.db.fetchall(
            "WITH rated AS (SELECT m.user_id, MAX(r.created_at) AS created_at FROM messages m"
            "   JOIN reactions r ON r.message_id = m.id AND r.user_id = m.user_id AND r.removed_at IS NULL"
            "   WHERE m.role = 'assistant' AND m.prompt IS NOT NULL GROUP BY m.id, m.user_id),"
            " last AS (SELECT user_id, MAX(started_at) AS at FROM training_runs"
            "   WHERE kind = 'user' AND status = 'succeeded' GROUP BY user_id)"
            " SELECT u.id, u.name, SUM(CASE WHEN rated.created_at > COALESCE(last.at, 0) THEN 1 ELSE 0 END),"
            " COUNT(*), COALESCE(last.at, 0)"
            " FROM rated JOIN users u ON u.id = rated.user_id LEFT JOIN last ON last.user_id = u.id"
            " GROUP BY u.id, u.name, last.at ORDER BY u.id"
        )
        found = [Candidate(int(r[0]), str(r[1]), int(r[2]), int(r[3]), float(r[4])) for r in rows]
        return [c for c in found if user_ids is None or c.user_id in user_ids]

    async def rated_replies(self, user_id: int | None = None, limit: int | None = None) -> list[RatedReply]:
        """Rated replies of one user (or of everyone), oldest first; with ``limit``, the newest ones."""
        newest = " LIMIT ?" if limit is not None else ""
        rows = await self.db.fetchall(
            "SELECT id, user_id, prompt, text, reward, rated_at, style FROM (SELECT m.id, m.user_id, m.prompt,"
            " m.text, AVG(r.reward) AS reward, MIN(r.created_at) AS rated_at, m.created_at AS sent_at, m.style"
            " FROM messages m"
            " JOIN reactions r ON r.message_id = m.id AND r.user_id = m.user_id AND r.removed_at IS NULL"
            " WHERE m.role = 'assistant' AND m.prompt IS NOT NULL AND (CAST(? AS BIGINT) IS NULL OR m.user_id = ?)"
            " GROUP BY m.id ORDER BY m.created_at DESC, m.id DESC" + newest + ") AS rated ORDER BY sent_at, id",
            (user_id, user_id) if limit is None else (user_id, user_id, limit),
        )
        cipher = self.db.cipher
        return [
            RatedReply(
                int(r[0]),
                int(r[1]),
                json.loads(cipher.open(r[2], "messages.prompt")),
                cipher.open(r[3], "messages.text"),
                float(r[4]),
                float(r[5]),
                _style(r[6]),
            )
            for r in rows
        ]

    # --- runs ----------------------------------------------------------------------------

    async def start_run(self, user_id: int | None, rated: int) -> int:
        kind = "population" if user_id is None else "user"
        run_id = await self.db.insert(
            "INSERT INTO training_runs (user_id, kind, status, started_at, rated) VALUES (?, ?, 'running', ?, ?)",
            (user_id, kind, time.time(), rated),
        )
        return int(run_id or 0)

    async def log_run(self, run_id: int, line: str) -> None:
        await self.db.execute("UPDATE training_runs SET log = log || ? WHERE id = ?", (line.rstrip() + "\n", run_id))

    async def finish_run(
        self,
        run_id: int,
        status: str,
        *,
        metrics: dict[str, Any] | None = None,
        decision: str | None = None,
        adapter_version: int | None = None,
    ) -> None:
        await self.db.execute(
            "UPDATE training_runs SET status = ?, finished_at = ?, metrics = ?, decision = ?, adapter_version = ?"
            " WHERE id = ?",
            (status, time.time(), json.dumps(metrics) if metrics else None, decision, adapter_version, run_id),
        )

    async def fail_unfinished_runs(self) -> int:
        """Runs left 'running' by a process that died: marked failed. Call holding the lock."""
        cursor = await self.db.execute(
            "UPDATE training_runs SET status = 'failed', finished_at = ?,"
            " log = log || 'the training process ended before this run finished\n' WHERE status = 'running'",
            (time.time(),),
        )
        return int(cursor.rowcount)

    async def last_trained(self, user_id: int | None) -> float:
        """When the owner's last successful run started (0: never)."""
        row = await self.db.fetchone(
            "SELECT MAX(started_at) FROM training_runs WHERE status = 'succeeded' AND user_id IS ?", (user_id,)
        )
        return float(row[0]) if row and row[0] is not None else 0.0

    async def runs(self, user_id: int | None = None, limit: int = 20) -> list[dict[str, Any]]:
        rows = await self.db.fetchall(
            "SELECT id, user_id, kind, status, decision, adapter_version, rated, started_at, finished_at, metrics, log"
            " FROM training_runs WHERE (CAST(? AS BIGINT) IS NULL OR user_id = ?) ORDER BY id DESC LIMIT ?",
            (user_id, user_id, limit),
        )
        return [{**dict(r), "metrics": json.loads(r["metrics"]) if r["metrics"] else {}} for r in rows]

    # --- adapters ------------------------------------------------------------------------

    async def next_version(self, user_id: int | None) -> int:
        row = await self.db.fetchone("SELECT COALESCE(MAX(version), 0) FROM adapters WHERE user_id IS ?", (user_id,))
        return int(row[0]) + 1 if row else 1

    async def serving(self, user_id: int) -> AdapterRow | None:
        """The adapter serving this user: their own, else the population's, else None (the base model)."""
        row = await self.db.fetchone(
            "SELECT version, path, user_id, status_at FROM adapters WHERE status = 'active'"
            " AND (user_id = ? OR user_id IS NULL) ORDER BY user_id IS NULL, version DESC LIMIT 1",
            (user_id,),
        )
        return AdapterRow(row[2], int(row[0]), str(row[1]), since=row[3]) if row else None

    async def active(self, user_id: int | None) -> AdapterRow | None:
        """The owner's own active adapter (no fallback to the population's)."""
        rows = await self._adapters("WHERE user_id IS ? AND status = 'active'", (user_id,))
        return rows[0] if rows else None

    async def adapters(self, user_id: int | None = None, *, everyone: bool = True) -> list[AdapterRow]:
        if everyone:
            return await self._adapters("", ())
        return await self._adapters("WHERE user_id IS ?", (user_id,))

    async def _adapters(self, where: str, params: tuple[Any, ...]) -> list[AdapterRow]:
        rows = await self.db.fetchall(
            f"SELECT user_id, version, path, status, parent, metrics, created_at FROM adapters {where}"
            " ORDER BY user_id IS NOT NULL, user_id, version DESC",
            params,
        )
        return [
            AdapterRow(r[0], int(r[1]), str(r[2]), str(r[3]), str(r[4]), json.loads(r[5] or "{}"), float(r[6]))
            for r in rows
        ]

    async def add_adapter(
        self, user_id: int | None, version: int, path: str, *, promote: bool, parent: str, metrics: dict[str, Any]
    ) -> None:
        """Record a trained candidate; when promoted it replaces the owner's active adapter at once."""
        now = time.time()
        async with self.db.transaction() as conn:
            if promote:
                await conn.execute(
                    "UPDATE adapters SET status = 'retired', status_at = ? WHERE user_id IS ? AND status = 'active'",
                    (now, user_id),
                )
            await conn.execute(
                "INSERT INTO adapters (user_id, version, path, status, metrics, created_at, parent, status_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (user_id, version, path, "active" if promote else "rejected", json.dumps(metrics), now, parent, now),
            )

    async def retire_adapters(self, user_id: int) -> int:
        """Take the user's own adapters out of service for good (/prefs reset learning):
        the active one and those a rollback would bring back; how many were serving."""
        async with self.db.transaction() as conn:
            serving = await conn.execute_fetchall(
                "SELECT COUNT(*) FROM adapters WHERE user_id = ? AND status = 'active'", (user_id,)
            )
            await conn.execute(
                "UPDATE adapters SET status = 'rejected', status_at = ? WHERE user_id = ?"
                " AND status IN ('active', 'retired')",
                (time.time(), user_id),
            )
        return int(next(iter(serving))[0])

    async def rollback(self, user_id: int | None) -> tuple[AdapterRow | None, AdapterRow | None]:
        """Take the active adapter out of service and bring back the one before it.

        Returns (the adapter taken out, the adapter now serving or None for the
        fallback: the population adapter or the base model). The one taken out is
        marked rejected, so a second rollback goes one version further back.
        """
        now = time.time()
        current = await self.active(user_id)
        if current is None:
            return None, None
        previous = next(
            (
                a
                for a in await self.adapters(user_id, everyone=False)
                if a.status == "retired" and a.version < current.version
            ),
            None,
        )
        async with self.db.transaction() as conn:
            await conn.execute(
                "UPDATE adapters SET status = 'rejected', status_at = ? WHERE user_id IS ? AND version = ?",
                (now, user_id, current.version),
            )
            if previous is not None:
                await conn.execute(
                    "UPDATE adapters SET status = 'active', status_at = ? WHERE user_id IS ? AND version = ?",
                    (now, user_id, previous.version),
                )
        return current, previous


def _style(stored: str | None) -> dict[str, str] | None:
    """A stored style (JSON) as a dict; None where none was stored or it reads as none."""
    value = json.loads(stored) if stored else None
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) and value else None
