"""Typed events: the only vocabulary between the platforms' connectors and the core.

A connector (``bots/``) turns what its platform sends into a :class:`Message`, :class:`Reaction` or
:class:`Command`, hands it to the :class:`~agent_core.agent.Agent`, and sends the
:class:`Reply` it gets back. Ids are the platform's own, as strings; the core maps them
to its users, chats and messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal, TypeVar

ChatKind = Literal["private", "group"]


@dataclass(frozen=True, kw_only=True)
class Event:
    """Something a person did on a platform."""

    platform: str  # the name its platform declares (agent_core.platforms.PlatformSpec.name)
    chat_id: str  # the platform's id of the conversation
    sender_id: str  # the platform's id of the person
    sender_name: str = ""  # a display name, if the platform gives one
    chat_kind: ChatKind = "private"
    event_id: str | None = None  # the platform's unique id: the same id is handled once


@dataclass(frozen=True, kw_only=True)
class Message(Event):
    """A person wrote to the bot."""

    text: str
    message_id: str | None = None  # the platform's id of this message


@dataclass(frozen=True, kw_only=True)
class Reaction(Event):
    """A person added (or took back) an emoji reaction on one of the bot's replies."""

    message_id: str  # the platform's id of the reply reacted to
    emoji: str  # a character ("👍") or a platform name ("thumbsup")
    added: bool = True


@dataclass(frozen=True, kw_only=True)
class Command(Event):
    """A slash command: ``/name args``; platforms with native commands build it directly."""

    name: str  # without the slash, lower case
    args: str = ""


@dataclass(frozen=True)
class Attachment:
    """A file to send with a reply (``/export``); plain text where a platform has no files."""

    filename: str
    content: bytes
    mime: str = "application/json"


@dataclass(frozen=True, kw_only=True)
class Reply:
    """What the bot answers; the connector sends it and reports its platform id back."""

    text: str
    chat_id: str
    reply_id: int | None = None  # the core's id of the stored reply (None: not stored)
    in_reply_to: str | None = None  # the platform's id of the message answered
    private: bool = False  # personal data: ephemeral or direct where the platform can
    attachment: Attachment | None = None
    kind: Literal["answer", "command", "notice", "error"] = "answer"
    style: dict[str, str] = field(default_factory=dict)
    deferred: bool = False  # the message is kept and will be answered later (this is the apology)
    late: bool = False  # answers a message after other things were said: sent as a reply to it everywhere


E = TypeVar("E", bound=Event)


def well_formed(event: E) -> E:
    """``event`` with every text field made valid Unicode: a surrogate pair some JSON
    decoders leave split becomes its character, a lone surrogate becomes U+FFFD. Such
    strings cannot be stored (UTF-8 refuses them) or shown; platforms do send them."""
    changes = {}
    for f in fields(event):
        value = getattr(event, f.name)
        if isinstance(value, str) and (repaired := _repair(value)) is not value:
            changes[f.name] = repaired
    return replace(event, **changes) if changes else event


def _repair(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text
