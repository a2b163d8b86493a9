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
    """A message stored but not answered, claimed by this process: left by a process that
    stopped, or deferred because the model could not answer (``told``: the person was told
    the answer comes later)."""

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
    told: bool = False


@dataclass(frozen=True)
class ReplyRef:
    """A stored bot reply that a reaction points at."""

    message_id: int
    user_id: int  # the person the reply answered


@dataclass(frozen=True)
class MemoryNote:
    """One of a user's long-term notes."""

    id: int
    text: str
    created_at: float
    source: str = "user"  # "user": /remember or "remember that"; "auto": a fact stated in passing
    slot: str | None = None  # what it is about ("home", "pet:cat"); a newer note with the same slot replaces it
    embedding: str | None = None  # its text as a vector (agent_core.memory.embedder.to_text); None: not yet
    keyword: bool = False  # (as a recall candidate) the message shares one of its words


@dataclass(frozen=True)
class KeptNote:
    """A note just kept, and the notes about the same thing it replaced (deleted)."""

    id: int
    replaced: list[MemoryNote]


@dataclass(frozen=True)
class ReplyContext:
    """Everything a reply to one user needs from the database, read at once."""

    preferences: dict[str, str]
    adapter: AdapterRow | None  # the one serving: their own, else the population's
    turns: list[tuple[str, str]]  # (role, text) of this user's recent turns in this chat, oldest first
