"""Each user's reward model, kept fitted from their reactions, and the steering it gives
their next reply.

The model (:mod:`agent_core.reward_model`) reads what a user likes from the reply texts
they reacted to. After every reaction that teaches (by the person the reply answered),
:meth:`ReplySteering.learn` refits their model in this process, with everyone's model as
the prior, and stores it; every ``refit_every`` of those, everyone's model is refitted
too. Each reply reads the user's stored model (so every process serving them steers
alike) and hands it to the backend as :class:`~agent_core.llm.base.Steering`: the local
backend then writes the reply a sentence at a time, keeping the candidate sentence the
model scores best (:mod:`agent_core.llm.lookahead`).

How hard to steer (``[steering] strength``): ``"auto"`` takes what the nightly job
measured for the user (the strength whose replies their model scores best while the
reply stays within the fluency guard), and keeps the best candidate until then; a number
fixes it. ``/prefs steering off`` turns it off for one user; ``/prefs reset learning``
forgets their model (:meth:`reset`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from agent_core import reward_model
from agent_core.config import SteeringSettings
from agent_core.llm.base import Steering
from agent_core.reward_model import RewardModel, Term
from agent_core.stores import SteeringStore

log = logging.getLogger(__name__)

PREFERENCE = "steering"  # /prefs steering on|off
HISTORY = 500  # a user's newest rated replies their model is fitted on
MODELS_CACHED = 4096  # users whose parsed model is kept between their messages
CHANGE_WINDOW = 200  # the user's newest replies over which "before and since your adapter" is counted


class ReplySteering:
    """Fits, stores and hands out each user's reward model (one per process)."""

    def __init__(self, store: SteeringStore, settings: SteeringSettings) -> None:
        self.store = store
        self.settings = settings
        self._population: RewardModel | None = None
        self._models: OrderedDict[int, tuple[float, RewardModel, float | None]] = OrderedDict()
        self._learned_since_refit = 0
        self._lock = asyncio.Lock()  # one population refit at a time

    # --- serving ----------------------------------------------------------------------------

    async def for_reply(self, user_id: int, preferences: dict[str, str]) -> Steering | None:
        """The steering of this user's next reply; None when it is off (here, or for them)
        or they have no model yet (no reaction of theirs was learned from)."""
        if not self.settings.enabled or preferences.get(PREFERENCE) == "off":
            return None
        row = await self.store.reward_model(user_id)
        if row is None or row.rated == 0:
            return None
        cached = self._models.get(user_id)
        if cached is None or cached[0] != row.updated_at:
            cached = (row.updated_at, RewardModel.from_bytes(row.weights, row.rated), row.strength)
            self._models[user_id] = cached
            if len(self._models) > MODELS_CACHED:
                self._models.popitem(last=False)
        self._models.move_to_end(user_id)
        strength = self.strength(cached[2])
        if strength <= 0:
            return None
        s = self.settings
        return Steering(cached[1], candidates=s.candidates, strength=strength, temperature=s.temperature,
                        top_k=s.top_k)  # fmt: skip

    def strength(self, measured: float | None) -> float:
        """The strength a reply gets: the setting's number, or (auto) the user's measured
        one, and the best candidate until it is measured."""
        if self.settings.strength != "auto":
            return float(self.settings.strength)
        return math.inf if measured is None else measured

    # --- learning ---------------------------------------------------------------------------

    async def population(self) -> RewardModel:
        if self._population is None:
            saved = await self.store.reward_population()
            self._population = RewardModel.from_bytes(*saved) if saved else await self.refit_population()
        return self._population

    async def refit_population(self) -> RewardModel:
        """Refit everyone's model (each user's prior) from the newest rated replies."""
        async with self._lock:
            resets = await self.store.reward_reset_times()
            rows = await self.store.rated_texts(None, limit=reward_model.POPULATION_ROWS)
            rows = [(u, text, r) for u, text, r in rows if u not in resets]  # a reset user's old reactions teach no one
            model = await asyncio.to_thread(RewardModel.fit_population, [t for _, t, _ in rows],
                                            [r for _, _, r in rows])  # fmt: skip
            await self.store.save_reward_population(model.to_bytes(), len(rows))
            self._population, self._learned_since_refit = model, 0
            log.info("reward models: everyone's refitted from %d rated replies", len(rows))
            return model

    async def learn(self, user_id: int) -> None:
        """This user's reactions changed: refit their model (from the next reply on; /stats
        and the nightly job read it even where steering is off)."""
        saved = await self.store.reward_model(user_id)
        since = saved.reset_at if saved else 0.0
        rows = await self.store.rated_texts(user_id, since=since, limit=HISTORY)
        population = await self.population()
        texts, rewards = [t for _, t, _ in rows], [r for _, _, r in rows]
        model, terms = await asyncio.to_thread(_fit_user, population, texts, rewards)
        await self.store.save_reward_model(user_id, model.to_bytes(), len(rows), [t.as_dict() for t in terms])
        self._models.pop(user_id, None)
        self._learned_since_refit += 1
        if self._learned_since_refit >= self.settings.refit_every:
            await self.refit_population()

    async def reset(self, user_id: int) -> None:
        """Forget what the user's model learned: their reactions so far teach it no more."""
        population = await self.population()
        await self.store.save_reward_model(user_id, population.to_bytes(), 0, [], reset_at=time.time())
        self._models.pop(user_id, None)

    async def measured(self, user_id: int, strength: float) -> None:
        """The nightly job measured the strength that serves this user best."""
        await self.store.set_steering_strength(user_id, strength)
        self._models.pop(user_id, None)

    # --- explaining -------------------------------------------------------------------------

    async def terms(self, user_id: int) -> list[Term]:
        row = await self.store.reward_model(user_id)
        return [Term.from_dict(t) for t in row.terms] if row else []

    async def describe(self, user_id: int, preferences: dict[str, str]) -> str:
        """The /stats lines: what the model learned, in the user's words, and whether it steers."""
        row = await self.store.reward_model(user_id)
        if row is None or row.rated == 0:
            return "Reward model: nothing learned from your reactions yet."
        terms = [Term.from_dict(t) for t in row.terms]
        learned = reward_model.describe_terms(terms)
        what = (f"From your {row.rated} rated replies, {learned}." if learned else
                f"From your {row.rated} rated replies, no word or phrase stands out yet.")  # fmt: skip
        if not self.settings.enabled:
            how = "Steering is off on this bot."
        elif preferences.get(PREFERENCE) == "off":
            how = "You turned steering off (/prefs steering on brings it back)."
        else:
            strength = self.strength(row.strength)
            how = ("It steers each of my replies to you, a sentence at a time." if strength > 0 else
                   "It does not steer my replies to you: the last measurement found it did not help.")  # fmt: skip
        return f"{what} {how}"

    async def changes(
        self, user_id: int, since: float | None, reply_texts: Callable[[int, int], Awaitable[list[tuple[float, str]]]]
    ) -> str | None:
        """How the user's replies changed since their adapter came into service (``since``):
        the share of their newest :data:`CHANGE_WINDOW` replies (read by ``reply_texts``)
        holding each liked term, before and since. None without an adapter, liked terms or
        replies on both sides."""
        liked = [t for t in await self.terms(user_id) if t.weight > 0]
        if not liked or since is None:
            return None
        replies = await reply_texts(user_id, CHANGE_WINDOW)
        before = [text for at, text in replies if at < since]
        after = [text for at, text in replies if at >= since]
        if not before or not after:
            return None
        day = time.strftime("%-d %B", time.localtime(since))
        shares = [f"{t.text}: {_share(t.gram, before):.0%} → {_share(t.gram, after):.0%}" for t in liked]
        return f"Your replies since your adapter of {day}: " + "; ".join(shares) + "."

    async def export(self, user_id: int) -> dict[str, Any]:
        """The user's model as data (/export): its weights and the words behind them."""
        row = await self.store.reward_model(user_id)
        if row is None:
            return {}
        weights = np.frombuffer(row.weights, dtype=np.float32)
        return {"rated": row.rated, "strength": row.strength, "reset_at": row.reset_at, "updated_at": row.updated_at,
                "terms": row.terms, "weights": [round(float(w), 5) for w in weights]}  # fmt: skip


def _share(gram: str, texts: list[str]) -> float:
    return float(np.mean([reward_model.holds(text, gram) for text in texts]))


def _fit_user(population: RewardModel, texts: list[str], rewards: list[float]) -> tuple[RewardModel, list[Term]]:
    model = population.fit_user(texts, rewards)
    return model, reward_model.strongest_terms(model, texts, rewards)
