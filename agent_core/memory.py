"""Per-user memory: recent turns in a chat, and long-term notes recalled by relevance and recency.

Everything here is keyed by the core's user id, so in a group chat one person's turns
and notes never reach another person's prompt.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from storage import Store

# "remember that my cat is called Tom", "please remember: I'm vegetarian"
_REMEMBER = re.compile(r"^\s*(?:please\s+)?remember(?:\s+that|\s*:)\s+(?P<note>.+?)\s*$", re.I | re.S)
MAX_NOTE_CHARS = 500


def note_to_remember(text: str) -> str | None:
    """The note in a plain-text "remember that ..." message, if it is one."""
    match = _REMEMBER.match(text)
    if not match:
        return None
    note = match.group("note").rstrip(".!")
    return note[:MAX_NOTE_CHARS] or None


@dataclass(frozen=True)
class Recollection:
    notes: list[str]  # long-term notes, most relevant first
    turns: list[tuple[str, str]]  # (role, text) of recent turns, oldest first


class Memory:
    def __init__(self, store: Store, *, recent_turns: int, notes: int) -> None:
        self.store = store
        self.recent_turns = recent_turns
        self.notes = notes

    async def remember(self, user_id: int, note: str) -> int:
        return await self.store.add_memory(user_id, note[:MAX_NOTE_CHARS])

    async def recall(self, user_id: int, chat_id: int, text: str, *, before: float) -> Recollection:
        """What to put in the prompt for this user's message ``text``, sent at time ``before``."""
        notes, turns = await asyncio.gather(
            self.store.recall_notes(user_id, text, self.notes),
            self.store.recent_turns(user_id, chat_id, self.recent_turns, before),
        )
        return Recollection(notes=[n.text for n in notes], turns=turns)
