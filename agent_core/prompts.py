"""Prompt assembly: profile, preferences, style, memory and recent turns, fitted to the context.

The prompt is a list of chat messages: one system message (who the bot is, the user's
persona and language, the style to answer in, the notes recalled), then the recent
turns, then the new message. When it does not fit the model's context window (less the
room for the reply), the oldest turns go first, then the least relevant notes, and as
a last resort the start of the new message is cut.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agent_core.llm.base import ChatMessage
from agent_core.style import Style


@dataclass(frozen=True)
class PromptParts:
    system_prompt: str
    user_name: str
    style: Style
    notes: list[str]
    turns: list[tuple[str, str]]
    text: str
    persona: str = ""
    language: str = ""


def system_message(parts: PromptParts, notes: list[str]) -> str:
    lines = [parts.system_prompt]
    if parts.persona:
        lines.append(f"Persona: {parts.persona}")
    if parts.user_name:
        lines.append(f"You are talking with {parts.user_name}.")
    if parts.language:
        lines.append(f"Always reply in {parts.language}.")
    lines.append(parts.style.instructions())
    if notes:
        lines.append("What you know about this user:")
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines)


def build_prompt(parts: PromptParts, *, budget: int, count: Callable[[str], int], overhead: int) -> list[ChatMessage]:
    """The chat messages for ``parts``, at most ``budget`` tokens as ``count`` measures them."""
    notes = list(parts.notes)
    turns = list(parts.turns)

    def size(text: str) -> int:
        return count(text) + overhead

    fixed = size(system_message(parts, notes)) + size(parts.text)
    turn_sizes = [size(text) for _, text in turns]
    while turns and fixed + sum(turn_sizes) > budget:
        turns.pop(0)
        turn_sizes.pop(0)
    while notes and fixed > budget:
        notes.pop()
        fixed = size(system_message(parts, notes)) + size(parts.text)
    text = parts.text
    if fixed > budget:
        room = budget - size(system_message(parts, notes))
        text = _keep_end(text, max(room - overhead, 1), count)
    messages: list[ChatMessage] = [{"role": "system", "content": system_message(parts, notes)}]
    messages += [{"role": "user" if role == "user" else "assistant", "content": t} for role, t in turns]
    messages.append({"role": "user", "content": text})
    return messages


def _keep_end(text: str, tokens: int, count: Callable[[str], int]) -> str:
    """The longest end of ``text`` that fits in ``tokens`` (binary search on characters)."""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi) // 2
        if count(text[mid:]) <= tokens:
            hi = mid
        else:
            lo = mid + 1
    return text[lo:]
