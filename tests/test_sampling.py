"""Nightly data by sampling: the serving model's candidates, ranked by the user's reward model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent_core.llm.base import ChatMessage
from agent_core.reward_model import RewardModel
from agent_core.style import Style
from agent_core.training import worker
from agent_core.training.dataset import Example
from agent_core.training.sampling import Sampler, rank, requests
from tests.conftest import TEST_CACHE

pytestmark = pytest.mark.no_database  # no database in these tests: not run again on PostgreSQL

PROMPTS: list[list[ChatMessage]] = [
    [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": "How do I brew tea?"}],
    [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": "Ideas for a rainy day?"}],
]
BRIEF = Style("brief", "casual", "none", "prose")


def test_requests_vary_temperature_and_style_and_keep_the_prompt_as_sent() -> None:
    batch = requests(PROMPTS, [BRIEF, None], 4, max_new_tokens=120, adapter=None, seed=3)
    assert len(batch) == 8 and all(r.messages is PROMPTS[i // 4] for i, r in enumerate(batch))
    assert batch[0].style == BRIEF and batch[0].max_new_tokens == 64  # the style it was asked for, its budget
    assert len({r.temperature for r in batch[:4]}) == 4
    assert len({r.style for r in batch}) > 2
    assert [r.style for r in batch] == [r.style for r in requests(PROMPTS, [BRIEF, None], 4, max_new_tokens=120,
                                                                   adapter=None, seed=3)]  # fmt: skip


def test_the_replies_the_user_would_see_all_keep_the_style_asked_for() -> None:
    batch = requests(PROMPTS, [BRIEF, None], 3, max_new_tokens=120, adapter=None, seed=3, vary_style=False)
    assert [r.style for r in batch] == [BRIEF] * 3 + [None] * 3 and len({r.temperature for r in batch[:3]}) == 3


def test_nightly_prompts_come_with_the_style_the_bot_asked_for() -> None:
    rows = [Example(p, "reply", True, 1.0, float(i), 1, i, s)
            for i, (p, s) in enumerate([(PROMPTS[0], BRIEF.as_dict()), (PROMPTS[1], None), (PROMPTS[0], None),
                                         (PROMPTS[1], {"length": "long"})])]  # fmt: skip
    prompts, asked = worker._prompts(rows, 4)
    assert prompts == [PROMPTS[0], PROMPTS[1]]  # distinct, the newest of each, oldest first
    assert asked == [None, None]  # the newest of each: none stored, and one no Style can read
    prompts, asked = worker._prompts(rows[:2], 4)
    assert asked == [BRIEF, None]


@pytest.fixture(scope="module")
def sampler(tiny_model_dir: Path) -> Iterator[Sampler]:
    made = Sampler(str(tiny_model_dir), TEST_CACHE / "models", threads=1, repetition_penalty=1.1, no_repeat_ngram=4)
    yield made
    made.close()


def test_the_sampled_data_holds_the_best_and_worst_candidates_by_the_reward_model(sampler: Sampler) -> None:
    batch = requests(PROMPTS, [BRIEF, BRIEF], 4, max_new_tokens=24, adapter=None, seed=0)
    texts = sampler.generate(batch)
    assert len(texts) == 8 and all(t.strip() for t in texts)
    assert len(set(texts)) > 1  # sampled, not one greedy answer
    # a reward model that learned this user likes long replies with many words
    rng = np.random.default_rng(0)
    liked = [" ".join(rng.choice(["tea", "water", "leaf", "pot", "cup"], 30)) for _ in range(20)]
    disliked = [" ".join(rng.choice(["tea", "water", "leaf"], 3)) for _ in range(20)]
    model = RewardModel.fit_population([], []).fit_user(liked + disliked, [1.0] * 20 + [-1.0] * 20)
    ranked = rank(PROMPTS, texts, 4, model.score)
    assert [r.prompt for r in ranked] == PROMPTS
    for r, own in zip(ranked, (texts[:4], texts[4:]), strict=True):
        scores = model.score(own)
        assert r.candidates == own and r.scores == pytest.approx(list(scores))
        assert r.best == own[int(np.argmax(scores))] and r.worst == own[int(np.argmin(scores))]
        assert r.spread == pytest.approx(float(scores.max() - scores.min()))
