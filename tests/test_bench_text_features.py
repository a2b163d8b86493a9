"""The text features simulated users react to (bench/text_features.py) and population files that use them."""

from __future__ import annotations

import numpy as np
import pytest

from agent_core.style import Style
from bench.learning import draw_users
from bench.text_features import FEATURES, check

pytestmark = pytest.mark.no_database  # no database in these tests: not run again on PostgreSQL

CASES = {
    "asks_followup": ("Try tea. Would you like more ideas?", "Try tea. That is all."),
    "has_number": ("Sleep 8 hours.", "Sleep enough."),
    "gives_example": ("Eat fruit, for example apples.", "Eat fruit."),
    "opens_with_filler": ("Sure! Drink water.", "Drink water. Sure is good."),
    "mentions_name": ("Good idea, Ada.", "Good idea, Adam."),
    "short_sentences": (
        "Walk more. Sleep well.",
        "Walk more whenever the weather and your busy week allow you to do so.",
    ),
    "uses_you": ("Your plan works.", "The plan works."),
    "ends_with_summary": ("Walk.\nIn short, move daily.", "In short, walk.\nMove daily."),
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_each_feature_reads_the_text(feature: str) -> None:
    has, lacks = CASES[feature]
    assert FEATURES[feature](has, "Ada") is True
    assert FEATURES[feature](lacks, "Ada") is False


def test_an_unknown_feature_is_named_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown text feature 'jokes'.*asks_followup"):
        check("jokes")


def test_text_effects_add_to_the_like_chance_of_a_reply_with_that_feature() -> None:
    population = {"archetypes": [{"name": "curious", "weight": 1, "base": 0.5, "noise": 0.0, "react_prob": 1,
                                  "effects": {"length": {"brief": 0.1}},
                                  "text_effects": [{"feature": "asks_followup", "effect": 0.3}]}]}  # fmt: skip
    (user,) = draw_users(population, 1, np.random.default_rng(0))
    style = Style(length="brief", tone="casual", emoji="none", format="prose")
    assert user.like_prob(style, 0) == pytest.approx(0.6)  # no text: the style alone
    assert user.like_prob(style, 0, "Try tea. More?") == pytest.approx(0.9)
    assert user.like_prob(style, 0, "Try tea.") == pytest.approx(0.6)


def test_files_without_text_effects_draw_the_same_users_as_before() -> None:
    population = {"archetypes": [{"name": "a", "weight": 1, "base": 0.5, "noise": 0.1, "react_prob": 0.5,
                                  "effects": {"tone": {"formal": 0.2}}}]}  # fmt: skip
    rng = np.random.default_rng(3)
    users = draw_users(population, 5, rng)
    again = np.random.default_rng(3)
    again.choice(1, size=5, p=[1.0])
    expected = [0.2 + again.normal(0, 0.1) for _ in range(5)]
    assert [u.effects[("tone", "formal")] for u in users] == pytest.approx(expected)
    assert all(u.text_effects == {} for u in users) and users[0].name != users[1].name
