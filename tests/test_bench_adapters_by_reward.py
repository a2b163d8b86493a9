"""bench/adapters.py --population: how simulated users rate replies and how their like rate is read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent_core.style import Style
from bench.adapters_by_reward import best_style, described, like_rate, prompt_for, rate, summarise
from bench.learning import NOT_AN_ANSWER, SimUser, draw_users

pytestmark = pytest.mark.no_database  # no database in these tests: not run again on PostgreSQL

BULLETS = Style.from_dict({"length": "brief", "tone": "casual", "emoji": "none", "format": "bullets"})
TASTES = Path(__file__).resolve().parent.parent / "bench" / "populations" / "text_tastes.json"
WITH = "For example, walk 20 minutes a day and you will sleep better."
WITHOUT = "Walking daily helps sleep."


def _user() -> SimUser:
    return SimUser(base=0.3, effects={("length", "brief"): 0.1}, drift_turn=None, drift_effects={}, react_prob=1.0,
                   text_effects={"has_number": 0.4}, name="Ada")  # fmt: skip


def test_ratings_follow_the_text_effects() -> None:
    rows = [{"prompt": prompt_for("How do I sleep better?", BULLETS), "text": t} for t in [WITH, WITHOUT] * 300]
    rated = rate(_user(), rows, np.random.default_rng(0), user_id=7)
    with_number = [e.label for e in rated if e.completion == WITH]
    without = [e.label for e in rated if e.completion == WITHOUT]
    assert 0.6 < np.mean(with_number) < 0.9 and 0.25 < np.mean(without) < 0.55  # 0.7-0.8 against 0.3-0.4
    assert [e.at for e in rated[:3]] == [0.0, 1.0, 2.0] and {e.user_id for e in rated} == {7}


def test_the_like_rate_is_the_expected_like_of_the_text_and_its_style() -> None:
    user = _user()
    assert like_rate(user, [WITH]) > like_rate(user, [WITHOUT]) + 0.35
    assert best_style(user).length == "brief"


def test_prompts_are_the_bots_system_message_with_the_asked_style() -> None:
    messages = prompt_for("Tips for tea?", BULLETS)
    assert [m["role"] for m in messages] == ["system", "user"] and messages[1]["content"] == "Tips for tea?"
    assert BULLETS.instructions() in messages[0]["content"]


def test_the_shipped_text_tastes_population_has_text_effects_for_everyone() -> None:
    population = json.loads(TASTES.read_text(encoding="utf-8"))
    users = draw_users(population, 12, np.random.default_rng([0, 1]))
    assert all(u.text_effects for u in users)
    assert json.loads(json.dumps(described(users[0])))["text_effects"] == users[0].text_effects  # saved with results
    assert len({tuple(sorted(u.text_effects)) for u in users}) == 3  # three kinds of taste


def test_the_summary_averages_the_arms_pools_the_aucs_and_gives_each_gains_paired_sd() -> None:
    def user(base: float, steered: float) -> dict[str, object]:
        arms = {"base": 0.9, "population": 0.9, "user": 0.9, "steered": 0.8, "user_steered": 0.8}
        return {"like_rate_base": base, "like_rate_population": base, "like_rate_user": base + 0.05,
                "like_rate_steered": steered, "like_rate_user_steered": steered + 0.02,
                "like_rate_best_of_4_reward": base, "like_rate_best_of_4_oracle": base + 0.2,
                "real_answer_rate": arms, "feature_rates": {arm: {"has_number": 0.5} for arm in arms},
                "train_seconds": 100.0, "promoted": steered > base,
                "metrics": {"teaching": {"seconds": 40.0 + 20 * base}}}  # fmt: skip

    pooled = {"scores": [0.9, 0.8, 0.2, 0.1], "chances": [0.6, 0.5, 0.5, 0.4], "labels": [True, False, True, False]}
    summary = summarise([user(0.5, 0.7), user(0.6, 0.6)], 30.0, {"promote": True}, pooled)
    assert summary["like_rate_steered"] == pytest.approx(0.65) and summary["promoted"] == 1
    assert summary["gain_sd"]["steered"] == pytest.approx(np.std([0.2, 0.0], ddof=1))
    assert summary["gain_sd"]["user"] == pytest.approx(0.0)
    assert summary["reward_auc"] == pytest.approx(0.75) and summary["oracle_auc"] == pytest.approx(0.875)
    assert summary["real_answer_rate"]["steered"] == pytest.approx(0.8)
    assert summary["feature_rates"]["user"]["has_number"] == pytest.approx(0.5)
    assert summary["sample_seconds_per_user"] == pytest.approx(51.0)  # (50 + 52) / 2: the decoding of the nights


def test_a_simulated_user_dislikes_a_reply_that_is_not_an_answer_whatever_it_holds() -> None:
    user = SimUser(base=0.5, effects={}, drift_turn=None, drift_effects={}, react_prob=1.0,
                   text_effects={"has_number": 0.4})  # fmt: skip
    style = Style.from_dict({"length": "brief", "tone": "casual", "emoji": "none", "format": "prose"})
    good = "Walk for 20 minutes before bed and keep your bedroom cool, about 18 degrees, to sleep better."
    looping = "Sleep 8 hours. Sleep 8 hours. Sleep 8 hours. Sleep 8 hours."
    assert user.like_prob(style, 0, good, "How can I sleep better?") == pytest.approx(0.9)
    assert user.like_prob(style, 0, looping, "How can I sleep better?") == NOT_AN_ANSWER  # degenerate
    assert user.like_prob(style, 0, "I love 3 kinds of cheese, 42 in all.", "How can I sleep better?") == NOT_AN_ANSWER
    assert user.like_prob(style, 0, looping) > 0.5  # without its message there is nothing to judge it against
