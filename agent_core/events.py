"""Typed events: the only vocabulary between platform adapters and the core.

An adapter turns what its platform sends into a :class:`Message`, :class:`Reaction` or
:class:`Command`, hands it to the :class:`~agent_core.agent.Agent`, and sends the
:class:`Reply` it gets back. Ids are the platform's own, as strings; the core maps them
to its users, chats and messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ChatKind = Literal["private", "group"]


@dataclass(frozen=True, kw_only=True)
class Event:
    """Something a person did on a platform."""

    platform: str  # "terminal", "telegram", "discord", "slack", "web"
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
    """What the bot answers; the adapter sends it and reports its platform id back."""

    text: str
    chat_id: str
    reply_id: int | None = None  # the core's id of the stored reply (None: not stored)
    in_reply_to: str | None = None  # the platform's id of the message answered
    private: bool = False  # personal data: ephemeral or direct where the platform can
    attachment: Attachment | None = None
    kind: Literal["answer", "command", "notice", "error"] = "answer"
    style: dict[str, str] = field(default_factory=dict)
