"""The style policy: which style a reply to this user should have, learned from reactions.

An explicit ``/prefs`` setting always wins; the policy decides only the dimensions the
user left open. :class:`LearningPolicy` (the default) learns each user's taste with the
bandit of :mod:`agent_core.bandit`, from their reactions and from what the population
likes; :class:`DefaultsPolicy` (``[policy] learn = false``) always takes ``[style]``.

Every reaction that teaches (by the person the reply answered) triggers :meth:`learn`,
which replays the user's last ``HISTORY`` rated replies from the database (in one pass
of matrix products), so a removed or changed reaction is undone exactly. The result is
stored, so a restart forgets nothing.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent_core.bandit import (
    DIMS,
    BanditConfig,
    Population,
    Posterior,
    Realisation,
    RealisationCounts,
    StyleBandit,
    UserStats,
    features,
)
from agent_core.config import PolicySettings, StyleDefaults
from agent_core.stores import CommandStore, PolicyStore
from agent_core.style import DIMENSIONS, Style

log = logging.getLogger(__name__)

POLICY_NAME = "bandit-v1"
HISTORY = 500  # rated replies replayed when relearning a user
REALISATION_WINDOW = 2000  # the latest replies (everyone's) that say how often a requested value shows
POSTERIOR_CACHE = 4096  # users whose posterior is kept between their messages

_QUESTION = re.compile(r"\?\s*$|^\s*(what|why|how|when|where|who|which|whose|is|are|can|could|do|does|did|should"
                       r"|would|will|may|might)\b", re.I)  # fmt: skip
_TASK = re.compile(r"^\s*(please\s+)?(write|make|create|list|give|explain|summari[sz]e|translate|draft|plan|generate"
                   r"|show|find|compare|describe|suggest|recommend|fix|calculate|help|tell me|rewrite|outline)\b",
                   re.I)  # fmt: skip


def classify(text: str) -> str:
    """The context of a message: ``task`` (a request), ``question``, or ``chat``."""
    if _TASK.search(text):
        return "task"
    if _QUESTION.search(text):
        return "question"
    return "chat"


@dataclass(frozen=True)
class Choice:
    style: Style
    log: dict[str, Any]  # stored with the reply: how the style was decided


class StylePolicy(ABC):
    async def prepare(self, user_id: int) -> None:
        """Load what :meth:`choose` will need for this user (called beside the other reads
        of a message, so a cold start costs no extra round trip). Optional."""
        return None

    @abstractmethod
    async def choose(self, user_id: int, text: str, fixed: dict[str, str], key: int) -> Choice:
        """The style for a reply to ``text``; ``fixed`` holds the user's explicit settings;
        ``key`` identifies the message (with the seed, it makes the choice reproducible)."""

    @abstractmethod
    async def learn(self, user_id: int) -> None:
        """This user's reactions changed: update what is known about them."""

    async def shown(self, requested: Style, observed: Style) -> None:
        """A reply asked for ``requested`` came out as ``observed`` (read from its text).
        Optional: a policy that plans for what the user will see learns from it."""
        return None

    @abstractmethod
    async def reset(self, user_id: int) -> None:
        """Forget what was learned about this user (``/prefs reset learning``)."""

    @abstractmethod
    async def describe(self, user_id: int, fixed: dict[str, str]) -> str:
        """In plain words: what is known about this user's style, and how sure."""

    @abstractmethod
    async def beliefs(self, user_id: int) -> dict[str, Any]:
        """What is known about this user's style, as data (for /export)."""


class DefaultsPolicy(StylePolicy):
    """The configured default for every dimension the user has not fixed; learns nothing."""

    def __init__(self, defaults: StyleDefaults) -> None:
        self.defaults = defaults.model_dump()

    async def choose(self, user_id: int, text: str, fixed: dict[str, str], key: int) -> Choice:
        style = Style.from_dict({dim: fixed.get(dim, self.defaults[dim]) for dim in DIMENSIONS})
        return Choice(style, {"policy": "defaults", "context": classify(text), "propensity": 1.0})

    async def learn(self, user_id: int) -> None:
        """Learning is off: reactions are stored, styles stay as configured."""
        return None

    async def reset(self, user_id: int) -> None:
        """Nothing was learned, so nothing to forget."""
        return None

    async def describe(self, user_id: int, fixed: dict[str, str]) -> str:
        return "Learned: nothing; learning from reactions is off here ([policy] learn = false)."

    async def beliefs(self, user_id: int) -> dict[str, Any]:
        return {"learning": "off"}


class LearningPolicy(StylePolicy):
    def __init__(self, store: PolicyStore, settings: PolicySettings, defaults: StyleDefaults) -> None:
        self.store = store
        self.settings = settings
        self.bandit = StyleBandit(BanditConfig(gamma=settings.discount))
        self._users: dict[int, UserStats] = {}  # write-through cache of policy_users
        self._stored: set[int] | None = None  # users with a policy_users row (others need no read)
        self._posteriors: OrderedDict[int, Posterior] = OrderedDict()  # derived: dropped when an input changes
        self._population: Population | None = None
        self._fresh: Posterior | None = None  # the posterior of any user nothing is known about
        self._learned_since_refit = 0
        self._counts: RealisationCounts | None = None  # how often each requested value showed
        self._realisation: Realisation | None = None  # their estimate, as of the last refit
        # Before anyone has reacted, lean a little toward the configured [style].
        self.default_mean = np.zeros(len(features(Style.from_dict(defaults.model_dump()), "chat")))
        for j, dim in enumerate(DIMS):
            self.default_mean[1 + j] = 0.05 if getattr(defaults, dim) == DIMENSIONS[dim][0] else -0.05

    # --- state ------------------------------------------------------------------------------

    async def _stats(self, user_id: int) -> UserStats:
        if user_id not in self._users:
            if self._stored is None:
                self._stored = await self.store.policy_user_ids()
            saved = await self.store.policy_user(user_id) if user_id in self._stored else None
            self._users[user_id] = UserStats.from_bytes(saved[0]) if saved else UserStats()
        return self._users[user_id]

    async def prepare(self, user_id: int) -> None:
        await self._stats(user_id)

    async def _posterior(self, user_id: int) -> Posterior:
        if user_id in self._posteriors:
            self._posteriors.move_to_end(user_id)
            return self._posteriors[user_id]
        stats, population = await self._stats(user_id), await self.population()
        if stats.n == 0 and user_id not in population.owners:  # nothing known: everyone new shares one
            if self._fresh is None:
                self._fresh = self.bandit.posterior(stats, population, None)
            return self._fresh
        posterior = self.bandit.posterior(stats, population, user_id)
        self._posteriors[user_id] = posterior
        if len(self._posteriors) > POSTERIOR_CACHE:
            self._posteriors.popitem(last=False)
        return posterior

    async def population(self) -> Population:
        if self._population is None:
            saved = await self.store.policy_population()
            self._population = Population.from_bytes(saved) if saved else await self.refit()
        return self._population

    async def refit(self) -> Population:
        """Refit what the population likes from every user's stored statistics."""
        users = {u: UserStats.from_bytes(blob) for u, blob in await self.store.all_policy_users()}
        population = self.bandit.population(users, prior_mean=self.default_mean)
        await self.store.save_policy_population(population.to_bytes(), len(users))
        self._population, self._learned_since_refit = population, 0
        self._realisation = None  # recomputed from the counts at the next choice
        self._posteriors.clear()
        self._fresh = None
        log.info("style policy: population refit from %d users, %d prototypes", len(users), len(population.prototypes))
        return population

    async def realisation(self) -> Realisation:
        """How often each requested value shows in the text, from the latest replies: counted
        at every reply, brought into the choices at each refit (with the population), so
        that choices between two refits depend only on the user's own events."""
        counts = await self._realisation_counts()
        if self._realisation is None:
            self._realisation = counts.estimate()
        return self._realisation

    async def _realisation_counts(self) -> RealisationCounts:
        if self._counts is None:
            self._counts = await realisation_counts(self.store, REALISATION_WINDOW)
            self._counts.window = REALISATION_WINDOW
        return self._counts

    async def shown(self, requested: Style, observed: Style) -> None:
        (await self._realisation_counts()).add(requested, observed)

    # --- deciding ------------------------------------------------------------------------------

    async def choose(self, user_id: int, text: str, fixed: dict[str, str], key: int) -> Choice:
        fixed_dims = {d: v for d, v in fixed.items() if d in DIMENSIONS}
        context = classify(text)
        posterior = await self._posterior(user_id)
        rng = np.random.default_rng([self.settings.seed, user_id, key])
        decision = self.bandit.choose(posterior, context, fixed_dims, rng, await self.realisation())
        entry = {"policy": POLICY_NAME, "context": context, "propensity": round(decision.propensity, 4),
                 "marginals": decision.marginals, "fixed": sorted(fixed_dims)}  # fmt: skip
        return Choice(decision.style, entry)

    # --- learning ------------------------------------------------------------------------------

    async def learn(self, user_id: int) -> None:
        saved = await self.store.policy_user(user_id)
        reset_at = saved[1] if saved else 0.0
        rated = await self.store.rated_styles(user_id, reset_at, HISTORY)
        X = np.array([_features(style_json, context or "chat") for style_json, context, _ in rated])
        y = np.clip(np.array([reward for _, _, reward in rated], dtype=float), -1.0, 1.0)
        stats = UserStats.replay(X, y, self.bandit.config)
        self._users[user_id] = stats
        if self._stored is not None:
            self._stored.add(user_id)
        self._posteriors.pop(user_id, None)
        await self.store.save_policy_user(user_id, stats.to_bytes())
        self._learned_since_refit += 1
        if self._learned_since_refit >= self.settings.refit_every:
            await self.refit()

    async def reset(self, user_id: int) -> None:
        self._users[user_id] = UserStats()
        if self._stored is not None:
            self._stored.add(user_id)
        self._posteriors.pop(user_id, None)
        await self.store.save_policy_user(user_id, UserStats().to_bytes(), reset_at=time.time())

    # --- explaining ------------------------------------------------------------------------------

    async def beliefs(self, user_id: int) -> dict[str, Any]:
        stats = await self._stats(user_id)
        posterior = await self._posterior(user_id)
        return {
            "reactions_learned_from": stats.n,
            "prefers": {dim: {"value": v, "probability": round(p, 3)} for dim, (v, p) in
                        self.bandit.beliefs(posterior).items()},
        }  # fmt: skip

    async def describe(self, user_id: int, fixed: dict[str, str]) -> str:
        stats = await self._stats(user_id)
        if stats.n == 0:
            return "Learned: nothing from you yet; I start from what most people like. React to my replies!"
        posterior = await self._posterior(user_id)
        phrases = []
        for dim, (value, p) in self.bandit.beliefs(posterior).items():
            if dim in fixed:
                phrases.append(f"{dim}: {fixed[dim]} (your /prefs setting)")
            elif p < 0.65:
                phrases.append(f"{dim}: no clear preference yet")
            else:
                phrases.append(f"{dim}: {value} ({_confidence(p)}, {p:.0%})")
        return f"Learned from {stats.n} of your reactions: " + "; ".join(phrases) + "."


async def realisation_counts(
    store: PolicyStore | CommandStore, replies: int, user_id: int | None = None
) -> RealisationCounts:
    """Asked against shown over the latest ``replies`` replies (everyone's, or one user's)."""
    counts = RealisationCounts()
    for asked, shown, n in await store.realisations(replies, user_id):
        counts.add(Style.from_dict(json.loads(asked)), Style.from_dict(json.loads(shown)), n)
    return counts


@functools.lru_cache(maxsize=1024)
def _features(style_json: str, context: str) -> np.ndarray:
    """The features of a stored reply (styles and contexts are few: each is decoded once)."""
    x = features(Style.from_dict(json.loads(style_json)), context)
    x.flags.writeable = False
    return x


def _confidence(p: float) -> str:
    return "sure" if p >= 0.95 else "fairly sure" if p >= 0.8 else "I think so"
