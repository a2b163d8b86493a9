"""bench/adapters.py --population: how simulated users rate replies and how their like rate is read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent_core.style import Style
from bench.adapters_by_reward import best_style, described, like_rate, prompt_for, rate, summarise
from bench.learning import SimUser, draw_users

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


def test_the_summary_averages_users_and_leaves_out_an_auc_that_could_not_be_measured() -> None:
    def user(like_user: float, auc: float | None, oracle: float | None) -> dict[str, object]:
        part = {"nll_liked": 1.0, "preference_accuracy": None}
        return {"like_rate_base": 0.5, "like_rate_population": 0.5, "like_rate_user": like_user, "reward_auc": auc,
                "oracle_auc": oracle, "train_seconds": 100.0, "promoted": like_user > 0.5, "base": part,
                "population": part, "user": part}  # fmt: skip

    summary = summarise([user(0.7, 0.8, 0.9), user(0.5, None, 0.7)], 30.0, {"promote": True})
    assert summary["like_rate_user"] == pytest.approx(0.6) and summary["promoted"] == 1
    assert summary["reward_auc"] == pytest.approx(0.8) and summary["oracle_auc"] == pytest.approx(0.8)
    assert summary["preference_accuracy_user"] is None and summary["nll_liked_user"] == 1.0
