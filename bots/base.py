"""The adapter contract: what every platform adapter does, written down once.

An adapter knows its platform and nothing else; the core knows no platform. It:

1. translates what its platform sends into :mod:`agent_core.events` (Message, Reaction,
   Command) and hands them to the :class:`~agent_core.agent.Agent`;
2. sends the :class:`~agent_core.events.Reply` it gets back, and reports the platform's
   id of the sent message with :meth:`Adapter.deliver`, so a later reaction finds it.

Required: :meth:`configured`, :meth:`start`, :meth:`stop`, :meth:`send`. Optional
capabilities (a typing indicator, ...) have plain defaults here, so a platform that
lacks them does without. Adding a platform is one module plus one line in
``bots/__init__.py``.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from typing import ClassVar

from agent_core.agent import Agent
from agent_core.config import Config
from agent_core.events import Reply

log = logging.getLogger(__name__)


class Adapter(ABC):
    #: The platform's name in events and the database ("telegram", "terminal", ...).
    platform: ClassVar[str]

    def __init__(self, agent: Agent, config: Config) -> None:
        self.agent = agent
        self.config = config
        #: Set when the adapter ended by itself (the terminal at end of input).
        self.finished = asyncio.Event()

    @classmethod
    @abstractmethod
    def configured(cls, config: Config) -> bool:
        """Whether ``attune run`` should start this adapter (its token is set, ...)."""

    @abstractmethod
    async def start(self) -> None:
        """Connect and begin receiving events; return once running."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop receiving, finish what is in hand, disconnect."""

    @abstractmethod
    async def send(self, reply: Reply) -> str | None:
        """Send ``reply`` to its chat; the platform's id of the sent message, if it has one."""

    async def show_typing(self, chat_id: str) -> None:
        """Show that a reply is being written; platforms without an indicator do nothing."""
        log.debug("%s has no typing indicator (chat %s)", self.platform, chat_id)

    async def deliver(self, reply: Reply | None) -> None:
        """Send a reply from the agent and report its platform id back to the core."""
        if reply is None:
            return
        platform_id = await self.send(reply)
        if platform_id is not None:
            await self.agent.delivered(reply, platform_id)
