"""The rows the store hands the core: plain frozen dataclasses, the core's own ids."""

from __future__ import annotations

from dataclasses import dataclass

from storage.training import AdapterRow


@dataclass(frozen=True)
class Received:
    """An incoming message, committed: who sent it, where, and its row id."""

    user_id: int
    chat_id: int
    message_id: int


@dataclass(frozen=True)
class Unanswered:
    """A message stored by a process that stopped before answering it, claimed by this one."""

    received: Received
    text: str
    created_at: float
    platform: str
    platform_chat_id: str
    chat_kind: str
    platform_user_id: str
    display_name: str
    platform_message_id: str | None
    event_id: str | None


@dataclass(frozen=True)
class ReplyRef:
    """A stored bot reply that a reaction points at."""

    message_id: int
    user_id: int  # the person the reply answered


@dataclass(frozen=True)
class MemoryNote:
    id: int
    text: str
    created_at: float


@dataclass(frozen=True)
class ReplyContext:
    """Everything a reply to one user needs from the database, read at once."""

    preferences: dict[str, str]
    adapter: AdapterRow | None  # the one serving: their own, else the population's
    notes: list[str]  # long-term notes: those relevant to the message best first, then the newest
    turns: list[tuple[str, str]]  # (role, text) of this user's recent turns in this chat, oldest first
