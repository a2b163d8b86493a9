"""Prompt assembly within a token budget, and the memory helpers."""

from __future__ import annotations

import pytest

from agent_core.memory.facts import explicit_note
from agent_core.prompts import PromptParts, build_prompt
from agent_core.rewards import RewardMap, normalize
from agent_core.style import Style
from bots.slack import reaction_name as slack_reaction_name

pytestmark = pytest.mark.no_database  # no database in these tests: not run again on PostgreSQL

STYLE = Style(length="brief", tone="formal", emoji="none", format="bullets")


def words(text: str) -> int:
    return len(text.split())


def parts(**kw: object) -> PromptParts:
    base: dict[str, object] = {
        "system_prompt": "You are a bot.",
        "user_name": "Ann",
        "style": STYLE,
        "notes": ["note one", "note two"],
        "turns": [("user", f"turn {i} " * 5) for i in range(6)],
        "text": "the new message",
    }
    return PromptParts(**(base | kw))  # type: ignore[arg-type]


def test_everything_fits_in_a_large_budget() -> None:
    messages = build_prompt(parts(), budget=10_000, count=words, overhead=2)
    assert len(messages) == 8
    assert messages[0]["role"] == "system" and "- note two" in messages[0]["content"]
    assert "bulleted list" in messages[0]["content"] and "formal" in messages[0]["content"]
    assert messages[-1] == {"role": "user", "content": "the new message"}


def test_oldest_turns_are_dropped_first() -> None:
    full = build_prompt(parts(), budget=10_000, count=words, overhead=2)
    total = sum(words(m["content"]) + 2 for m in full)
    messages = build_prompt(parts(), budget=total - 1, count=words, overhead=2)
    assert [m["content"] for m in messages[1:-1]] == [m["content"] for m in full[2:-1]]
    assert sum(words(m["content"]) + 2 for m in messages) <= total - 1


def test_then_notes_then_the_start_of_the_message() -> None:
    one_note = build_prompt(parts(turns=[], notes=["note one"]), budget=10_000, count=words, overhead=2)
    budget = sum(words(m["content"]) + 2 for m in one_note)
    tight = build_prompt(parts(), budget=budget, count=words, overhead=2)
    assert "- note one" in tight[0]["content"] and "note two" not in tight[0]["content"]
    assert len(tight) == 2  # every turn went before the last note
    long_text = " ".join(f"w{i}" for i in range(200))
    cut = build_prompt(parts(turns=[], notes=[], text=long_text), budget=60, count=words, overhead=2)
    assert cut[-1]["content"].endswith("w199") and not cut[-1]["content"].startswith("w0 ")
    assert sum(words(m["content"]) + 2 for m in cut) <= 60


@pytest.mark.parametrize(
    ("text", "note"),
    [
        ("remember that my cat is called Tom.", ("my cat is called Tom", "")),
        ("Please remember: I'm vegetarian", ("I'm vegetarian", "")),
        ("REMEMBER THAT tea > coffee", ("tea > coffee", "")),
        ("remember that I'm vegan. What can I cook tonight?", ("I'm vegan", "What can I cook tonight?")),
        ("Can you remember that I'm vegan, what can I cook?", ("I'm vegan", "what can I cook?")),
        ("do you remember that song?", None),
        ("remember", None),
        ("I remember that day", None),
    ],
)
def test_remember_phrases(text: str, note: tuple[str, str] | None) -> None:
    assert explicit_note(text) == note


def test_reward_mapping_folds_modifiers_and_clamps() -> None:
    rewards = RewardMap({"👍": 1.0, "❤️": 0.9, "thumbsdown": -1.0})
    assert rewards("👍🏿") == 1.0 and rewards("❤") == 0.9 and rewards("❤️") == 0.9
    assert rewards(":thumbsdown:") == -1.0 and rewards("🤷") == 0.0
    assert normalize(slack_reaction_name(":+1::skin-tone-5:")) == "+1"  # Slack's names, read by its connector
