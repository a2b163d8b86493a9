"""The operator's actions on the adapters: train now, roll back, stop, and status.

``/admin``, the dashboard and ``attune train`` / ``attune adapters`` all go through
:class:`Operations`, so they refuse the same things and say the same thing about which
model serves a user afterwards: their own adapter, else the shared population adapter,
else the base model (the order ``TrainingRecords.serving`` finds them in).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from agent_core import reward_model
from agent_core.policy import REALISATION_WINDOW, StylePolicy, realisation_counts
from agent_core.steering import ReplySteering
from agent_core.stores import OperationsStore
from agent_core.training.job import POPULATION, Plan, Progress, TrainingBusy, TrainingJob
from storage.training import AdapterRow

log = logging.getLogger(__name__)

Code = Literal["train-started", "train-busy", "train-too-little", "rolled-back", "no-adapter",
               "cancelled", "not-running"]  # fmt: skip


@dataclass(frozen=True)
class Outcome:
    """What an action did: a code (the dashboard's notice), and the sentence to show."""

    code: Code
    message: str

    @property
    def ok(self) -> bool:
        return self.code in ("train-started", "rolled-back", "cancelled")


@dataclass(frozen=True)
class RolledBack(Outcome):
    taken: AdapterRow | None = None  # the adapter taken out of service
    now: str = ""  # what serves the owner from their next message on, in words


class UnknownUser(ValueError):
    """A user named on a command line or in /admin that attune does not know."""


class Operations:
    """Train now, roll back, stop, status: one copy for every surface that offers them."""

    def __init__(
        self,
        training: TrainingJob,
        store: OperationsStore,
        policy: StylePolicy | None = None,
        describe_model: Callable[[], str] = str,
        steering: ReplySteering | None = None,
    ) -> None:
        """``policy``, ``describe_model`` and ``steering`` feed :meth:`overview` only (``attune
        train`` runs without them)."""
        self.training = training
        self.records = training.records
        self.store = store
        self.policy = policy
        self.describe_model = describe_model
        self.steering = steering
        self.background: set[asyncio.Task[None]] = set()  # trainings started by train_now

    # --- who ------------------------------------------------------------------------------

    async def find_user(self, who: str) -> int | None:
        """A user by the core's number (as on the dashboard) or by ``platform:id``;
        None for ``population``. Raises :class:`UnknownUser` with what to give instead."""
        who = who.strip().removeprefix("#")
        if who == POPULATION:
            return None
        platform, _, ident = who.partition(":")
        if who.isascii() and who.isdigit():
            found = int(who) if int(who) < 2**63 and await self.store.user_exists(int(who)) else None
        else:
            found = await self.store.find_user(platform, ident) if platform and ident else None
        if found is None:
            raise UnknownUser(f"no user {who!r} (give their number, or platform:id as the platform names them)")
        return found

    # --- train now ------------------------------------------------------------------------

    async def plan(self, users: list[int] | None = None) -> Plan:
        return await self.training.plan(users)

    async def train(self, users: list[int] | None = None, *, progress: Progress | None = None) -> Plan:
        """Train in the foreground (``attune train``); raises TrainingBusy if a run holds the lock."""
        return await self.training.run(users, progress=progress)

    async def train_now(self, user_id: int, *, by: str) -> Outcome:
        """Start training one user in the background, unless it cannot run now."""
        if await self.records.lock_holder() is not None:
            return Outcome("train-busy", "A training run is already going on; try again when it has finished.")
        if not (await self.training.plan([user_id])).tasks:
            return Outcome("train-too-little", f"User {user_id} has too little rated feedback to train on yet "
                                               "(a few liked replies at least).")  # fmt: skip
        task = asyncio.create_task(self._train(user_id, by))
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return Outcome("train-started", f"Training user {user_id} now; the adapter in service stays until a "
                                        "better one is promoted.")  # fmt: skip

    async def _train(self, user_id: int, by: str) -> None:
        try:
            plan = await self.training.run([user_id])
            outcome = [(t.name, t.status) for t in plan.tasks] or plan.skipped
            log.info("%s training of user %d: %s", by, user_id, outcome)
        except TrainingBusy as exc:
            log.info("%s training of user %d skipped: %s", by, user_id, exc)
        except Exception:
            log.exception("%s training of user %d failed", by, user_id)

    # --- roll back ------------------------------------------------------------------------

    async def rollback(self, user_id: int | None) -> RolledBack:
        """Take the owner's adapter out of service (the one before it comes back, if any),
        and say which model serves them now."""
        owner = "The population" if user_id is None else f"User {user_id}"
        taken, _ = await self.records.rollback(user_id)
        if taken is None:
            why = (
                "nothing to roll back"
                if user_id is None
                else "no adapter of their own to roll back; the shared one, if any, stays"
            )
            return RolledBack("no-adapter", f"{owner} has no adapter in service ({why}).")
        now = await self.serving(user_id)
        return RolledBack("rolled-back", f"{owner}: adapter version {taken.version} taken out; now {now}.",
                          taken=taken, now=now)  # fmt: skip

    async def serving(self, user_id: int | None) -> str:
        """What serves this owner now, in words: for a user their own adapter, else the
        population's, else the base model; for the population its adapter or none."""
        own = await self.records.active(user_id)
        if own is not None:
            return f"version {own.version}"
        if user_id is not None and (shared := await self.records.active(None)) is not None:
            return f"the shared population adapter v{shared.version}"
        return "the base model" if user_id is not None else "the base model for users without their own adapter"

    # --- stop -----------------------------------------------------------------------------

    async def stop(self) -> Outcome:
        """Ask a running training to stop; the adapters in service stay as they are."""
        if await self.records.lock_holder() is None and not self.background:
            return Outcome("not-running", "No training is running.")
        self.training.cancel()
        return Outcome("cancelled", "The running training was asked to stop; the adapters in service stay as they are.")

    async def close(self) -> None:
        """The process is stopping: trainings started here stop too (adapters in service stay)."""
        if self.background:
            self.training.cancel()
            await asyncio.gather(*self.background, return_exceptions=True)

    # --- status ---------------------------------------------------------------------------

    async def running(self) -> str | None:
        """Who holds the training lock (a process, on a host), or None when idle."""
        return await self.records.lock_holder()

    async def adapters(self) -> list[AdapterRow]:
        return await self.records.adapters()

    async def totals(self) -> dict[str, int]:
        """Users, messages, replies, reactions, and adapters in service."""
        return await self.store.reports.totals()

    async def learned(self, user_id: int) -> dict[str, str | None]:
        """What the user's reward model learned, in words, and how their replies changed
        since their adapter (what /stats tells them)."""
        if self.steering is None:
            return {"terms": None, "changes": None}
        adapter = await self.records.serving(user_id)
        since = adapter.since if adapter is not None and adapter.user_id == user_id else None
        return {"terms": reward_model.describe_terms(await self.steering.terms(user_id)) or None,
                "changes": await self.steering.changes(user_id, since, self.store.reply_texts)}  # fmt: skip

    async def overview(self) -> dict[str, Any]:
        """The dashboard's data (also its JSON): the model, users and what the policy
        believes of each, activity, rewards by day, style asked and shown, adapters, runs."""
        reports = self.store.reports
        users = await reports.users()
        return {
            "model": self.describe_model(),
            "users": [u.__dict__ for u in users],
            "beliefs": {str(u.id): await self.policy.beliefs(u.id) if self.policy else {} for u in users},
            "learned": {str(u.id): await self.learned(u.id) for u in users},
            "daily": await reports.daily_activity(),
            "reward_by_day": await reports.reward_by_day(),
            "adapters": await reports.adapters(),
            "training_runs": await reports.training_runs(),
            "asked_and_shown": (await realisation_counts(self.store, REALISATION_WINDOW)).table(),
            "training": await self.running(),
        }
