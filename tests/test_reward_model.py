"""The per-user reward model: learns a taste planted in the text from reactions alone."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from agent_core import reward_model
from agent_core.config import Config
from agent_core.events import Command, Message, Reaction
from agent_core.reward_model import RewardModel, auc, held_out_auc, tokens
from agent_core.style import DIMENSIONS
from agent_core.testing import RecordingBackend
from attune.wiring import open_agent
from storage.training import TrainingRecords

TOPICS = ["tea", "running", "the garden", "sleep", "budgets", "bread", "music", "trains", "rain", "paint"]
VERBS = ["try", "keep", "plan", "start", "check", "change", "note", "share"]


def reply(rng: np.random.Generator, *, question: bool, number: bool) -> str:
    words = rng.choice(TOPICS, 3)
    verbs = rng.choice(VERBS, 3)
    parts = [f"You could {verbs[0]} {words[0]} first.", f"Then {verbs[1]} {words[1]} when it suits you."]
    if number:
        parts.append(f"About {int(rng.integers(2, 90))} minutes is enough for {words[2]}.")
    else:
        parts.append(f"Give {words[2]} a little time as well.")
    parts.append(f"Do you want to {verbs[2]} more about {words[0]}?" if question else f"Good luck with {words[0]}.")
    return " ".join(parts)


def reacted(rng: np.random.Generator, n: int, likes: str) -> tuple[list[str], list[float]]:
    """``n`` replies and the user's reactions: they like the feature ``likes`` (0.85 against 0.2)."""
    texts, rewards = [], []
    for _ in range(n):
        q, d = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
        text = reply(rng, question=q, number=d)
        has = q if likes == "question" else d
        texts.append(text)
        rewards.append(1.0 if rng.random() < (0.85 if has else 0.2) else -1.0)
    return texts, rewards


def test_tokens_mark_the_shape_of_a_reply_not_its_exact_numbers() -> None:
    assert tokens("Sure, 42 cups?\n- Tea") == ["<s>", "sure", ",", "<num>", "cups", "?", "<nl>", "-", "tea", "</s>"]


def test_auc_counts_liked_over_disliked_and_needs_both() -> None:
    assert auc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert auc([0.1, 0.9], [True, False]) == 0.0
    assert auc([0.5, 0.5], [True, False]) == 0.5
    assert auc([0.5, 0.7], [True, True]) is None


def test_it_learns_a_planted_text_preference_from_reactions() -> None:
    rng = np.random.default_rng(0)
    texts, rewards = reacted(rng, 80, likes="question")
    accuracy = held_out_auc(texts, rewards, [], [])
    assert accuracy.auc is not None and accuracy.auc >= 0.75, accuracy
    model = RewardModel.fit_population([], []).fit_user(texts, rewards)
    fresh = np.random.default_rng(1)
    asked = [reply(fresh, question=True, number=bool(i % 2)) for i in range(20)]
    told = [reply(fresh, question=False, number=bool(i % 2)) for i in range(20)]
    assert model.score(asked).mean() > model.score(told).mean() + 0.2


def test_a_new_user_starts_from_the_population_and_their_own_reactions_move_them() -> None:
    rng = np.random.default_rng(2)
    everyone, their = reacted(rng, 300, likes="question")
    population = RewardModel.fit_population(everyone, their)
    fresh = np.random.default_rng(3)
    with_q = [reply(fresh, question=True, number=False) for _ in range(20)]
    without = [reply(fresh, question=False, number=False) for _ in range(20)]
    with_n = [reply(fresh, question=False, number=True) for _ in range(20)]
    newcomer = population.fit_user([], [])
    assert newcomer.score(with_q).mean() > newcomer.score(without).mean() + 0.2  # the prior alone
    # someone who does not care about questions but likes numbers
    own_texts, own_rewards = reacted(np.random.default_rng(4), 120, likes="number")
    them = population.fit_user(own_texts, own_rewards)
    assert them.score(with_n).mean() > newcomer.score(with_n).mean() + 0.1
    assert them.score(with_n).mean() > them.score(without).mean() + 0.1


def test_no_auc_until_there_are_enough_reactions_and_it_says_how_many_more() -> None:
    texts, rewards = reacted(np.random.default_rng(5), 10, likes="question")
    accuracy = held_out_auc(texts, rewards, [], [])
    assert accuracy.auc is None and accuracy.needed == 6


async def test_stats_says_how_well_the_reward_model_predicts_the_user(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replies that ask a follow-up question are liked, the others not: /stats first asks
    for more reactions, then reports a held-out AUC well above chance."""
    rng = np.random.default_rng(6)
    backend = RecordingBackend(reply=lambda request: reply(rng, question=bool(rng.random() < 0.5), number=False))
    agent = await open_agent(make_config("[limits]\nmessages_per_minute = 100000\n"), llm=backend)
    try:

        async def stats() -> str:
            result = await agent.handle_command(Command(platform="t", chat_id="ann", sender_id="ann", name="stats"))
            assert result is not None
            return result.text

        for i in range(40):
            if i == 5:
                assert "Reward model: rate 11 more of my replies" in await stats()
            sent = await agent.handle_message(Message(platform="t", chat_id="ann", sender_id="ann", text=f"q {i}?"))
            assert sent is not None
            await agent.delivered(sent, f"r{i}")
            liked = sent.text.rstrip().endswith("?")
            await agent.handle_reaction(Reaction(platform="t", chat_id="ann", sender_id="ann", message_id=f"r{i}",
                                                 emoji="👍" if liked else "👎"))  # fmt: skip
        fits = 0
        real_fit = reward_model.held_out_auc

        def counted(*args: Any) -> reward_model.Accuracy:
            nonlocal fits
            fits += 1
            return real_fit(*args)

        monkeypatch.setattr(reward_model, "held_out_auc", counted)
        match = re.search(r"AUC (\d\.\d\d) on your (\d+) newest rated ones", await stats())
        assert match is not None and float(match[1]) >= 0.75 and int(match[2]) == 8
        assert match[0] in await stats() and fits == 1  # asked again with nothing new: not fitted again
        await agent.handle_reaction(Reaction(platform="t", chat_id="ann", sender_id="ann", message_id="r39",
                                             emoji="👎" if sent.text.rstrip().endswith("?") else "👍"))  # fmt: skip
        await stats()
        assert fits == 2  # a changed reaction: fitted anew
        records = TrainingRecords(agent.store.db)
        every = await records.rated_replies(None)
        assert len(every) == 40 and [r.message_id for r in await records.rated_replies(None, limit=3)] == [
            r.message_id for r in every[-3:]
        ]  # the newest, oldest first
        asked = [json.loads(row[0]) for row in await agent.store.db.fetchall(
            "SELECT style FROM messages WHERE role = 'assistant' ORDER BY created_at, id")]  # fmt: skip
        assert [r.style for r in every] == asked and all(set(s) == set(DIMENSIONS) for s in asked)
    finally:
        await agent.close()
