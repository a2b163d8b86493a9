"""Which of a user's notes reach the prompt: those relevant to the message, and only those.

A note's relevance is the cosine similarity between the message and the note, plus the
best similarity between the message and the questions its *kind* typically helps answer
("I am vegetarian" is a ``diet`` note: "What should I cook tonight?"; a note of no known
kind counts its own similarity twice), plus a bonus when the message shares one of its
words (the FTS5 / PostgreSQL keyword half). A note is recalled when that reaches
``[agent] memory_threshold`` and is not far behind the best note; at most ``[agent]
memory_notes`` of them, best first. Being the newest note counts for nothing. Before the
embedding model is in, the keyword half decides alone.

Measured on held-out phrasings (README, "Memory"): the sum separates the notes a
question needs from the rest better than either part alone or their maximum.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from agent_core.memory.facts import second_person

# What a note of each kind helps with, as the questions people ask (matched by meaning).
KIND_QUESTIONS: dict[str, tuple[str, ...]] = {
    "diet": (
        "What should I cook for dinner?",
        "Any ideas for lunch?",
        "Can you suggest a recipe?",
        "What should I eat?",
        "Recommend a restaurant.",
        "Plan my meals for the week.",
        "What snack should I have?",
        "What's my diet?",
        "What can't I eat?",
        "Suggest a dish for a dinner party.",
    ),
    "allergy": (
        "What am I allergic to?",
        "Do I have any allergies?",
        "Is this food safe for me?",
        "Can you suggest a recipe?",
        "What snack should I buy?",
        "What should I cook for dinner?",
        "What should I order at a restaurant?",
        "What should I bake?",
    ),
    "health": (
        "What exercise should I do?",
        "Plan a workout for me.",
        "What should I eat to stay healthy?",
        "How can I sleep better?",
        "Is this medicine okay for me?",
        "How can I feel better?",
    ),
    "home": (
        "Where do I live?",
        "What is the weather like here?",
        "What should I do this weekend nearby?",
        "Recommend a place to visit near me.",
        "What time zone am I in?",
        "Where can I go for a walk around here?",
        "What's a good local restaurant?",
        "How do I get around my city?",
    ),
    "origin": ("Where am I from?", "Where did I grow up?", "What language do people speak where I come from?"),
    "work": (
        "What do I do for work?",
        "What is my job?",
        "How can I manage my work schedule?",
        "How do I deal with stress at work?",
        "How can I unwind after a long shift?",
        "How can I get a promotion?",
        "How should I plan my sleep around my job?",
        "Any tips for a tiring day at work?",
    ),
    "study": (
        "What am I studying?",
        "Help me practise what I am learning.",
        "How can I study better?",
        "Give me an exercise to practise.",
    ),
    "pet": (
        "What is my pet called?",
        "What should I feed my pet?",
        "How do I take care of my pet?",
        "What toy should I buy for my pet?",
        "My pet seems sick, what should I do?",
        "How often should I walk it?",
        "How do I keep my animal entertained?",
    ),
    "family": (
        "What is my partner's name?",
        "What gift should I buy for my family?",
        "What can we do together as a family this weekend?",
        "How do I plan a family dinner?",
        "Who is in my family?",
    ),
    "birthday": (
        "When is the birthday?",
        "What gift should I buy?",
        "How should we celebrate?",
        "Plan a birthday party.",
        "What present would someone love?",
        "What should I do for the anniversary?",
    ),
    "age": ("How old am I?", "What is my age?"),
    "plan": (
        "What are my plans?",
        "When is my appointment?",
        "What should I pack for my trip?",
        "How do I prepare for it?",
        "Any tips for next week?",
        "How do I stay calm before the big day?",
    ),
    "name": ("What is my name?", "What should you call me?", "Do you know who I am?", "Greet me."),
    "taste": (
        "What do I like?",
        "What do I love?",
        "What do I enjoy?",
        "Recommend something I would enjoy.",
        "What should I do in my free time?",
        "What should I do this weekend?",
        "Recommend some music.",
        "What should I watch tonight?",
    ),
    "favourite": ("What is my favourite?", "Recommend something I would enjoy.", "What should I choose?"),
    "language": ("What languages do I speak?", "Translate this for me.", "Help me practise a language."),
    "vehicle": ("What car do I drive?", "How do I look after my car?", "How can I save fuel?"),
    "hobby": (
        "What are my hobbies?",
        "What should I do in my free time?",
        "What should I do this weekend?",
        "How can I get better at my hobby?",
    ),
}
# A reply to a request starts from the best note ("Since you are vegetarian, ..."), so that a
# 135M model uses it, when recall by meaning is this sure of it (above the threshold) and
# the note is of a kind that changes an answer.
LEAD_ABOVE = 0.25
LEAD_KINDS = {"name", "diet", "allergy", "health", "home", "pet", "taste", "hobby", "plan", "birthday", "work", "study",
              "favourite", "language", "vehicle", "family"}  # fmt: skip
_ASIDE = re.compile(r"\s*\([^)]*\)")
KEYWORD_BONUS = 0.25  # a shared word (not a stop word) counts this much on top of the meaning
BEHIND_BEST = 0.25  # a note this much less relevant than the best one stays out (it would only distract)


@dataclass(frozen=True)
class Candidate:
    """One of the user's notes, as recall weighs it."""

    id: int
    text: str
    slot: str | None
    vector: np.ndarray | None  # the note's text, embedded when it was kept (None: kept before the model was in)
    keyword: bool  # the message shares one of its words


def kind_of(slot: str | None) -> str | None:
    return slot.split(":", 1)[0] if slot else None


def score(candidate: Candidate, query: np.ndarray | None, kinds: Mapping[str, np.ndarray]) -> float:
    """How relevant the note is to the message whose vector is ``query`` (None: keywords only)."""
    bonus = KEYWORD_BONUS if candidate.keyword else 0.0
    if query is None:
        return 1.0 + bonus if candidate.keyword else 0.0
    itself = float(candidate.vector @ query) if candidate.vector is not None else 0.0
    examples = kinds.get(kind_of(candidate.slot) or "")
    kind = float((examples @ query).max()) if examples is not None and len(examples) else itself
    return itself + kind + bonus


def relevant(scored: Sequence[tuple[float, Candidate]], *, cap: int, threshold: float) -> list[tuple[float, Candidate]]:
    """The notes to recall for the message, best first, from each note's :func:`score`: at
    most ``cap``, each at least ``threshold`` and not far behind the best."""
    best = max((s for s, _ in scored), default=0.0)
    kept = [(s, c) for s, c in scored if s >= threshold and s >= best - BEHIND_BEST]
    kept.sort(key=lambda sc: -sc[0])
    return kept[: max(cap, 0)]


def lead(note: str) -> str:
    """The reply's first words from a note it should use: "They are vegetarian." -> "Since you are vegetarian," """
    said = second_person(_ASIDE.sub("", note)).strip().rstrip(".!")
    return f"Since {said},"
