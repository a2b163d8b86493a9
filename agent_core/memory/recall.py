"""Which of a user's notes reach the prompt: those relevant to the message, and only those.

A note's relevance is the best cosine similarity between the message and either the note
itself or one of the questions its *kind* typically helps answer ("I am vegetarian" is a
``diet`` note: "What should I cook tonight?"), plus a bonus when the message shares one
of its words (the FTS5 / PostgreSQL keyword half). A note is recalled when that reaches
``[agent] memory_threshold``; at most ``[agent] memory_notes`` of them, best first.
Being the newest note counts for nothing. Before the embedding model is in, the keyword
half decides alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# What a note of each kind helps with, as the questions people ask (matched by meaning).
KIND_QUESTIONS: dict[str, tuple[str, ...]] = {
    "diet": (
        "What should I cook for dinner?",
        "Any dinner ideas?",
        "Can you suggest a recipe?",
        "What should I eat today?",
        "Recommend a restaurant.",
        "What should I order for lunch?",
        "Plan my meals for the week.",
        "What snack should I have?",
    ),
    "allergy": (
        "What should I cook for dinner?",
        "Is this food safe for me to eat?",
        "Can you suggest a recipe?",
        "What should I order at the restaurant?",
        "What snack should I buy?",
        "Plan my meals for the week.",
    ),
    "health": (
        "What exercise should I do?",
        "Plan a workout for me.",
        "What should I eat to stay healthy?",
        "How can I sleep better?",
        "Is this medicine okay for me?",
    ),
    "home": (
        "What is the weather like where I live?",
        "What should I do this weekend nearby?",
        "Recommend a place to visit near me.",
        "What time zone am I in?",
        "Where can I go for a walk around here?",
    ),
    "origin": ("Where am I from?", "What language do people speak where I grew up?"),
    "work": (
        "How can I manage my work schedule?",
        "When should I sleep with my job?",
        "How do I deal with stress at work?",
        "When is a good time for the gym?",
        "Help me prepare for my shift.",
        "How can I get a promotion?",
    ),
    "study": ("Help me practise what I am learning.", "How can I study better?", "Give me an exercise to practise."),
    "pet": (
        "What should I feed my pet?",
        "How do I take care of my pet?",
        "What toy should I buy for my pet?",
        "My pet seems sick, what should I do?",
    ),
    "family": (
        "What gift should I buy for my family?",
        "What can we do together as a family this weekend?",
        "How do I plan a family dinner?",
    ),
    "birthday": (
        "What gift should I buy?",
        "How should we celebrate the birthday?",
        "Plan a birthday party.",
        "What should I do for the anniversary?",
    ),
    "age": ("How old am I?",),
    "plan": (
        "What should I pack for my trip?",
        "How do I prepare for it?",
        "What should I do before my appointment?",
        "Any tips for next week?",
    ),
    "name": ("What is my name?", "Do you know who I am?"),
}
KEYWORD_BONUS = 0.25  # a shared word (not a stop word) counts this much on top of the meaning


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
    best = float(candidate.vector @ query) if candidate.vector is not None else 0.0
    examples = kinds.get(kind_of(candidate.slot) or "")
    if examples is not None and len(examples):
        best = max(best, float((examples @ query).max()))
    return best + bonus


def relevant(
    candidates: Sequence[Candidate], query: np.ndarray | None, kinds: Mapping[str, np.ndarray], *, cap: int,
    threshold: float,
) -> list[Candidate]:  # fmt: skip
    """The notes to recall for the message, best first: at most ``cap``, each at least ``threshold``."""
    scored = [(score(c, query, kinds), c) for c in candidates]
    kept = [(s, c) for s, c in scored if s >= threshold]
    kept.sort(key=lambda sc: -sc[0])
    return [c for _, c in kept[: max(cap, 0)]]
