"""Long-term memory in the message pipeline: what a message gives memory, and what memory gives the reply.

:meth:`Memory.take` runs on each stored message: it keeps the facts the user states
about themselves (rules, or the configured model with ``[memory] extract = "model"``),
lets a newer fact replace the note it contradicts, keeps what "remember that ..." asks,
and answers what memory can answer by itself ("what do you know about me?", "forget
that", "What is my cat called?"). :meth:`Memory.recall` picks the notes relevant to a
message for its prompt (agent_core/memory/recall.py). Notes are the user's alone: by
default they are recalled only in that person's private chats.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace

import numpy as np

from agent_core.config import AgentSettings, MemorySettings
from agent_core.memory.embedder import Embedder, EmbedderUnavailable, from_text, to_text
from agent_core.memory.facts import Fact, explicit_note, extract_facts, holds_secret, second_person, third_person
from agent_core.memory.model_facts import ModelFacts
from agent_core.memory.questions import answers, asks_something, asks_to_forget_that, asks_to_list, direct_question
from agent_core.memory.recall import (
    KIND_QUESTIONS,
    LEAD_ABOVE,
    LEAD_KINDS,
    Candidate,
    kind_of,
    lead,
    relevant,
    score,
)
from agent_core.stores import MemoryStore
from storage.rows import MemoryNote

log = logging.getLogger(__name__)

TOLD = "memory_told"  # a preference: this user was told once that notes are kept without asking
FORGET_THAT_WITHIN_S = 600.0  # "forget that" reaches back this far
SECRET = ("I don't keep passwords, card or account numbers or other secrets, so I haven't noted that. "
          "Please don't send them in a chat.")  # fmt: skip
NOTHING_TO_FORGET = "I haven't kept anything from what you said just now. /forget lists your notes and deletes one."
NO_NOTES = "I don't know anything about you yet beyond this chat. Tell me, or use /remember <text>."


@dataclass(frozen=True)
class Recalled:
    """The notes for a reply's prompt, and its first words when one of them surely matters."""

    notes: list[str]
    lead: str = ""  # "Since you are vegetarian," (for a backend that continues a reply; else unused)


@dataclass(frozen=True)
class Handled:
    """What memory made of a message."""

    reply: str | None = None  # memory answered it by itself: this is the whole reply (no model)
    private: bool = False  # ...and it is about the person (sent privately where the platform can)
    before: str = ""  # said before the model's reply ("Noted: ...", "Updated: ...")
    after: str = ""  # said after it (the first automatic note's notice)
    question: str | None = None  # what the model answers instead of the whole message ("remember that X. Q?")
    kept: tuple[str, ...] = ()  # the notes this message kept (relevant to its own reply by construction)


def capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def as_said_to(note: MemoryNote) -> str:
    """A note as its user reads it: "You live in Lisbon." """
    return capitalized(second_person(note.text))


def listing(notes: list[MemoryNote], heading: str) -> str:
    """The user's notes, numbered for /forget, the automatic ones marked."""
    lines = [heading]
    for note in notes:
        mark = "  (kept automatically)" if note.source == "auto" else ""
        lines.append(f"  #{note.id}: {as_said_to(note)}{mark}")
    return "\n".join(lines)


class Memory:
    """The user's long-term notes, as the message pipeline uses them: :meth:`recall` before
    the reply, :meth:`take` on every stored message, :meth:`remember` for ``/remember``."""

    def __init__(
        self, store: MemoryStore, settings: MemorySettings, agent: AgentSettings, model: ModelFacts | None = None
    ) -> None:
        self.store = store
        self.settings = settings
        self.agent = agent
        self.model = model  # asked for facts when [memory] extract = "model"
        self.embedder = Embedder() if settings.embeddings else None
        self._kinds: dict[str, np.ndarray] = {}  # each note kind's typical questions, embedded
        self._warming: asyncio.Future[None] | None = None
        self._last_kept: dict[int, tuple[list[int], float]] = {}  # user -> (notes kept from their last message, when)

    # --- the embedding model, in the background -----------------------------------------------

    def start(self) -> asyncio.Future[None] | None:
        """Load the embedding model in the background (recall serves on keywords meanwhile)."""
        if self.embedder is not None and self._warming is None:
            self._warming = asyncio.ensure_future(self._warm(self.embedder))
        return self._warming

    async def _warm(self, embedder: Embedder) -> None:
        await embedder.start()
        if not embedder.ready:
            return
        kinds = {kind: await embedder.aembed(questions) for kind, questions in KIND_QUESTIONS.items()}
        self._kinds = kinds

    async def close(self) -> None:
        """Wait for a load still under way (a thread cannot be interrupted)."""
        if self._warming is not None and not self._warming.done():
            await asyncio.gather(self._warming, return_exceptions=True)

    @property
    def by_meaning(self) -> bool:
        """Whether recall goes by meaning yet (the model is in)."""
        return self.embedder is not None and self.embedder.ready and bool(self._kinds)

    async def _vector(self, text: str) -> str | None:
        if not self.by_meaning or self.embedder is None:
            return None
        try:
            return to_text((await self.embedder.aembed([text]))[0])
        except EmbedderUnavailable:
            return None

    # --- recall -------------------------------------------------------------------------------

    def recalls_in(self, chat_kind: str) -> bool:
        return chat_kind == "private" or self.settings.recall_in_groups

    async def recall(self, user_id: int, text: str, chat_kind: str = "private") -> Recalled:
        """The notes relevant to ``text``, best first (none in a group chat unless
        ``recall_in_groups``), and how a reply to it starts when one of them surely matters."""
        if not self.recalls_in(chat_kind) or self.agent.memory_notes <= 0:
            return Recalled([])
        candidates, by_meaning = await self.weigh(user_id, text)
        chosen = relevant(candidates, cap=self.agent.memory_notes, threshold=self.agent.memory_threshold)
        start = ""
        if chosen and by_meaning and asks_something(text) and direct_question(text) is None:
            best, note = chosen[0]
            if best >= self.agent.memory_threshold + LEAD_ABOVE and kind_of(note.slot) in LEAD_KINDS:
                start = lead(note.text)
        return Recalled([c.text for _, c in chosen], start)

    async def weigh(self, user_id: int, text: str) -> tuple[list[tuple[float, Candidate]], bool]:
        """Each of the user's notes with its relevance to ``text`` (recall.score), and whether
        that went by meaning (the embedding model is in) or by keywords alone."""
        notes = await self.store.note_candidates(user_id, text)
        if not notes:
            return [], False
        query: np.ndarray | None = None
        if self.by_meaning and self.embedder is not None:
            missing = [n for n in notes if n.embedding is None or from_text(n.embedding) is None]
            vectors = await self.embedder.aembed([text] + [n.text for n in missing])
            query = vectors[0]
            filled = {n.id: to_text(v) for n, v in zip(missing, vectors[1:], strict=True)}
            for note_id, vector in filled.items():  # kept before the model was in: stored now
                await self.store.set_note_embedding(user_id, note_id, vector)
            notes = [n if n.id not in filled else _with_vector(n, filled[n.id]) for n in notes]
        candidates = [
            Candidate(n.id, n.text, n.slot, from_text(n.embedding) if n.embedding and query is not None else None,
                      n.keyword)
            for n in notes
        ]  # fmt: skip
        return [(score(c, query, self._kinds), c) for c in candidates], query is not None

    # --- what a message gives memory ----------------------------------------------------------

    async def take(self, user_id: int, text: str, chat_kind: str = "private", *, now: float | None = None) -> Handled:
        """Keep what ``text`` says about its writer, and answer what memory can answer itself."""
        now = time.time() if now is None else now
        if asks_to_forget_that(text):
            return Handled(reply=await self._forget_last(user_id, now), private=True)
        if asks_to_list(text):
            notes = await self.store.list_memories(user_id, 50)
            heading = "Here's what I know about you (/forget <number> deletes one, /forget all everything):"
            return Handled(reply=listing(notes, heading) if notes else NO_NOTES, private=chat_kind != "private")
        if (asked := explicit_note(text)) is not None:
            return await self._remember(user_id, *asked, now=now)
        before: list[str] = []
        after = ""
        kept_texts: list[str] = []
        if self.settings.automatic:
            facts = await self._facts(text, now)
            kept: list[int] = []
            for fact in facts:
                if fact.retracts:
                    await self.store.forget_slot(user_id, fact.slot)
                    continue
                result = await self.store.keep_note(user_id, fact.text, source="auto", slot=fact.slot,
                                                    embedding=await self._vector(fact.text))  # fmt: skip
                kept.append(result.id)
                kept_texts.append(fact.text)
                if any(old.source == "user" for old in result.replaced):
                    before.append(f"Updated: {second_person(fact.text)}")
            if kept:
                self._last_kept[user_id] = (kept, now)
                after = await self._notice_once(user_id, facts, chat_kind)
        answer = await self._answer_from_notes(user_id, text, chat_kind)
        if answer is not None:
            return Handled(reply="\n\n".join([*before, answer]), kept=tuple(kept_texts))
        return Handled(before=" ".join(before), after=after, kept=tuple(kept_texts))

    async def remember(self, user_id: int, note: str) -> str:
        """``/remember <note>``: kept as "remember that <note>" is; the acknowledgement."""
        handled = await self._remember(user_id, note.strip().rstrip(".!"), "", now=time.time())
        ids = self._last_kept.get(user_id, ([], 0.0))[0] if handled.kept else []
        numbers = ", ".join(f"#{i}" for i in ids)
        return (handled.reply or handled.before) + (f" (note {numbers}; /forget lists them)" if ids else "")

    async def _facts(self, text: str, now: float) -> list[Fact]:
        if self.settings.extract == "model" and self.model is not None:
            facts = await self.model.extract(text)
            if facts is not None:
                return facts
        return extract_facts(text, now=now)

    async def _remember(self, user_id: int, note: str, rest: str, *, now: float) -> Handled:
        """ "remember that ...": keep it in the third person, acknowledge it, answer the rest.
        A note that states several facts ("I am vegetarian and I hate mushrooms") is kept as
        one note per fact, so that each is recalled, and corrected, on its own."""
        if holds_secret(note):
            return Handled(reply=SECRET, private=True) if not rest else Handled(before=SECRET, question=rest)
        facts = [f for f in extract_facts(note, now=now) if not f.retracts]
        if not facts or sum(len(f.text.split()) for f in facts) < len(note.split()) - 2:
            slot = facts[0].slot if len(facts) == 1 else None  # what it is mostly about, for corrections
            facts = [Fact(facts[0].kind if facts else "", slot or "", third_person(note))]
        ids: list[int] = []
        updated = False
        known = {n.text: n.id for n in await self.store.list_memories(user_id)}
        for fact in facts:
            vector = await self._vector(fact.text)
            if fact.slot:
                result = await self.store.keep_note(user_id, fact.text, source="user", slot=fact.slot,
                                                    embedding=vector)  # fmt: skip
                ids.append(result.id)
                updated = updated or any(old.text != fact.text for old in result.replaced)
            else:  # the same words kept again (a restarted process answering it) stay one note
                ids.append(known.get(fact.text) or await self.store.add_memory(user_id, fact.text, embedding=vector))
        self._last_kept[user_id] = (ids, now)
        text = third_person(note) if len(facts) > 1 else facts[0].text
        said = f"{'Updated' if updated else 'Noted'}: {second_person(text)}"
        kept = tuple(f.text for f in facts)
        return Handled(before=said, question=rest, kept=kept) if rest else Handled(reply=said, kept=kept)

    async def _notice_once(self, user_id: int, facts: list[Fact], chat_kind: str) -> str:
        """The first note kept without asking: say so, once, and how to see and delete it."""
        if (await self.store.preferences(user_id)).get(TOLD):
            return ""
        await self.store.set_preference(user_id, TOLD, "1")
        if chat_kind != "private":
            return ("(I keep what people tell me about themselves as their own notes, recalled only in their private "
                    "chats; /forget in a private chat shows and deletes yours.)")  # fmt: skip
        fact = next(f for f in facts if not f.retracts)
        return (f"(I'll remember that {second_person(fact.text).rstrip('.')}, and bring it up only when it matters. "
                "Ask \"what do you know about me?\" or send /forget to see and delete what I keep.)")  # fmt: skip

    async def _answer_from_notes(self, user_id: int, text: str, chat_kind: str) -> str | None:
        """A direct question that notes answer ("What is my cat called?"), answered from them."""
        asked = direct_question(text)
        if asked is None or not self.recalls_in(chat_kind):
            return None
        notes = [n for n in await self.store.list_memories(user_id, 200) if n.slot and answers(asked, n.slot)]
        if not notes:
            return None
        return " ".join(as_said_to(n) for n in reversed(notes[:5]))

    async def _forget_last(self, user_id: int, now: float) -> str:
        ids, at = self._last_kept.pop(user_id, ([], 0.0))
        notes = await self.store.list_memories(user_id, 20)
        if not ids or now - at > FORGET_THAT_WITHIN_S:  # another process kept it, or it restarted since
            ids = [n.id for n in notes[:1] if now - n.created_at <= FORGET_THAT_WITHIN_S]
        forgotten = [n for n in notes if n.id in ids]
        for note in forgotten:
            await self.store.delete_memory(user_id, note.id)
        if not forgotten:
            return NOTHING_TO_FORGET
        return "Forgotten: " + " ".join(second_person(n.text) for n in forgotten)


def _with_vector(note: MemoryNote, vector: str) -> MemoryNote:
    return replace(note, embedding=vector)
