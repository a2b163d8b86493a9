"""``[memory] extract = "model"``: a capable model says which facts a message states, as mem0 does.

For a configured OpenAI-compatible server or a larger local model; the default
SmolLM2-135M is not capable of it, which is why the default extractor is the rules in
agent_core/memory/facts.py. The model answers in JSON; what does not parse, names a kind
outside the list, or holds a secret is dropped, and a failed request falls back to the rules.
"""

from __future__ import annotations

import json
import logging
import re

from agent_core.llm.base import GenerationRequest, LLMBackend, LLMError
from agent_core.memory.facts import MAX_NOTE_CHARS, Fact, holds_secret

log = logging.getLogger(__name__)

KINDS = ("name", "home", "origin", "work", "study", "diet", "allergy", "health", "pet", "family", "birthday", "taste",
         "favourite", "age", "plan", "hobby", "language", "vehicle")  # fmt: skip
_NOT_A_WORD = re.compile(r"[^\w ]+")
SINGLE = {"name", "home", "origin", "work", "study", "diet", "age", "vehicle"}  # one note each: a newer one replaces it
PROMPT = f"""You keep notes about the user you are talking with. From their message, list the facts they state
about themselves: who they are, where they live, their work, family, pets, diet, allergies, health, likes and
dislikes, what to call them, plans with dates. Nothing else: not facts about other people beyond their relation to
the user, not questions, wishes or hypotheticals, and never passwords, card or account numbers or other secrets.

Answer with JSON only: {{"facts": [{{"kind": "...", "about": "...", "fact": "...", "no_longer": false}}]}}
- kind: one of {", ".join(KINDS)}
- about: two or three words naming what the fact is about ("cat", "peanuts", "job interview"); "" for name,
  home, origin, work, study, diet, age
- fact: one sentence about the user in the third person ("They live in Lisbon.", "Their cat is called Tom.")
- no_longer: true when the user says it is no longer so ("I don't live in Lisbon any more")
Answer {{"facts": []}} when the message states nothing about the user."""


class ModelFacts:
    def __init__(self, llm: LLMBackend, max_new_tokens: int = 300) -> None:
        self.llm = llm
        self.max_new_tokens = max_new_tokens

    async def extract(self, text: str) -> list[Fact] | None:
        """The facts ``text`` states, or None if the model could not be asked (use the rules)."""
        request = GenerationRequest(
            messages=[{"role": "system", "content": PROMPT}, {"role": "user", "content": text}],
            max_new_tokens=self.max_new_tokens, temperature=0.0,
        )  # fmt: skip
        try:
            answer = await self.llm.generate(request)
        except LLMError as exc:
            log.warning("the model could not extract facts (%s); the rules did", exc)
            return None
        return parse(answer)


def parse(answer: str) -> list[Fact]:
    """The facts in the model's JSON answer; what is malformed is left out."""
    match = re.search(r"\{.*\}", answer, re.S)
    try:
        items = json.loads(match.group()).get("facts", []) if match else []
    except (json.JSONDecodeError, AttributeError):
        log.info("the model's facts were not JSON; none kept from this message")
        return []
    facts: list[Fact] = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        kind, about, fact = (
            str(item.get("kind", "")).lower(),
            str(item.get("about", "")).lower().strip(),
            item.get("fact"),
        )
        if kind not in KINDS or not isinstance(fact, str) or not fact.strip() or holds_secret(fact):
            continue
        about = _NOT_A_WORD.sub("", about)[:40]
        slot = kind if kind in SINGLE or not about else f"{kind}:{about}"
        facts.append(Fact(kind, slot, fact.strip()[:MAX_NOTE_CHARS], retracts=bool(item.get("no_longer"))))
    return facts
