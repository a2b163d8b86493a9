"""The connector contract: what every platform connector does, written down once.

A connector knows its platform and nothing else; the core knows no platform. It:

1. turns what its platform sends into :mod:`agent_core.events` (Message, Reaction,
   Command), using the platform library's own handlers and command system, and hands
   them to the :class:`~agent_core.agent.Agent`;
2. sends the :class:`~agent_core.events.Reply` it gets back and reports the platform's
   id of the sent message (:meth:`Connector.deliver`), so a later reaction finds the reply.
3. once started, answers what a stopped process left unanswered on its platform
   (:meth:`Connector.answer_unanswered`), and, while it runs, the messages whose answer
   was deferred because the model failed (:meth:`Connector.answer_deferred`); both are
   started by the supervisor, with nothing to write per platform. Such late replies
   carry ``Reply.late``: a connector sends them as a reply to their message.

Required of every connector: :meth:`configured`, :meth:`start`, :meth:`stop`, :meth:`send`.

Optional capabilities have plain fallbacks here, so a platform without them does
without: a typing indicator (:attr:`Connector.has_typing`), message edits
(:attr:`Connector.can_edit`), private replies (``Reply.private``: a connector
that cannot answer ephemerally or in a direct message answers in the chat), long
replies (:func:`split_text` at :attr:`Connector.max_length`).

Adding a platform is one module in ``bots/`` (this class and its
:class:`~agent_core.platforms.PlatformSpec`) plus one line in ``bots/__init__.py``: see bots/README.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar, ParamSpec

from agent_core.agent import Agent, Unanswered
from agent_core.config import Config
from agent_core.events import Message, Reply
from bots.streaming import LiveReply

log = logging.getLogger(__name__)

TYPING_REFRESH_S = 4.0  # platforms show "typing" for about 5 s after each call
DEFERRED_RETRY_S = 2.0  # a deferred answer is tried this long after the model failed, then
DEFERRED_RETRY_MAX_S = 60.0  # backing off to this while it keeps failing

P = ParamSpec("P")


class Connector(ABC):
    #: The platform's name in events and the database ("telegram", "terminal", ...).
    platform: ClassVar[str]
    #: The longest message the platform takes; longer replies are split (None: no limit).
    max_length: ClassVar[int | None] = None
    #: Whether the platform has a typing indicator (:meth:`show_typing`).
    has_typing: ClassVar[bool] = False
    #: Whether sent messages can be edited (:meth:`edit`), e.g. to stream a reply.
    can_edit: ClassVar[bool] = False

    def __init__(self, agent: Agent, config: Config) -> None:
        self.agent = agent
        self.config = config
        #: Set when the connector ended by itself (the terminal at end of input).
        self.finished = asyncio.Event()

    @classmethod
    @abstractmethod
    def configured(cls, config: Config) -> bool:
        """Whether ``attune run`` should start this connector (its token is set, ...)."""

    @abstractmethod
    async def start(self) -> None:
        """Connect and begin receiving events; return once running. Raises if it cannot
        connect (the runner logs it and tries again later)."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop receiving, finish what is in hand, disconnect."""

    @abstractmethod
    async def send(self, reply: Reply) -> str | None:
        """Send ``reply`` to its chat (split to :attr:`max_length`, privately if
        ``reply.private`` and the platform can); the platform's id of the last message
        sent, or None if the platform has no ids."""

    async def answer_unanswered(self) -> None:
        """Answer the messages of this platform that a stopped process had stored but not
        answered (:meth:`Agent.unanswered`), side by side; the runner calls it once the
        connector has started. A message the platform sends again is stored already, so it
        gets no second reply."""
        missed = await self.agent.unanswered(self.platform)
        if not missed:
            return
        log.info("%s: answering %d message(s) left unanswered when the bot last stopped", self.platform, len(missed))

        async def one(message: Unanswered) -> None:
            try:
                await self.deliver(await self.agent.answer_unanswered(message))
            except Exception:
                log.exception("%s: could not answer a message left unanswered", self.platform)

        await asyncio.gather(*(one(m) for m in missed))

    async def answer_deferred(self) -> None:
        """Runs while the connector runs (the supervisor starts it): answers the messages
        whose answer was deferred because the model could not write one, as soon as it
        can again, each as a reply to its message. Tries again after
        :data:`DEFERRED_RETRY_S`, backing off to :data:`DEFERRED_RETRY_MAX_S` while the model
        still fails."""
        waiting = self.agent.deferred[self.platform]
        delay = DEFERRED_RETRY_S
        while True:
            await waiting.wait()
            await asyncio.sleep(delay)
            waiting.clear()
            try:
                done = await self._answer_deferred_now(waiting)
            except Exception as exc:  # the database is away too: try again later
                log.warning("%s: could not answer deferred messages yet (%s)", self.platform, exc)
                waiting.set()
                done = False
            delay = DEFERRED_RETRY_S if done else min(delay * 2, DEFERRED_RETRY_MAX_S)

    async def _answer_deferred_now(self, waiting: asyncio.Event) -> bool:
        """Answer the deferred messages one by one, oldest first; False when the model
        fails again (the message is deferred again, and ``waiting`` set)."""
        answered = 0
        while (missed := await self.agent.next_deferred(self.platform)) is not None:
            try:
                reply = await self.agent.answer_unanswered(missed)
            except Exception:
                self.agent.try_again_later(missed)
                raise
            if waiting.is_set():  # deferred again: the model still fails
                await self.deliver(reply)  # the apology, for one never told (None for the others)
                return False
            await self.deliver(reply)
            answered += 1
        if answered:
            log.info("%s: answered %d message(s) whose answer was deferred", self.platform, answered)
        return True

    async def show_typing(self, chat_id: str) -> None:
        """Show that a reply is being written. Only called when :attr:`has_typing` is true."""
        raise NotImplementedError(f"{self.platform} has no typing indicator")

    async def edit(self, chat_id: str, platform_message_id: str, text: str) -> None:
        """Replace the text of a message the bot sent. Only called when :attr:`can_edit`
        is true; elsewhere a reply is sent once, whole."""
        raise NotImplementedError(f"{self.platform} cannot edit messages")

    async def deliver(self, reply: Reply | None) -> None:
        """Send a reply from the agent and report its platform id back to the core."""
        if reply is None:
            return
        platform_id = await self.send(reply)
        if platform_id is not None:
            await self.agent.delivered(reply, platform_id)

    def stream_edit_interval(self) -> float:
        """Seconds between edits of a reply shown while it is written; 0 sends the final
        text only. ``[<platform>] stream_edit_interval_s`` where the platform can edit."""
        section = getattr(self.config.settings, self.platform, None)
        return float(getattr(section, "stream_edit_interval_s", 0.0)) if self.can_edit else 0.0

    async def respond(self, message: Message) -> None:
        """Hand a message to the agent with the typing indicator on, and deliver the reply:
        shown as it is written (edited at the platform's rate) where the connector can edit
        and streaming is on, else sent once, whole."""
        interval = self.stream_edit_interval()
        live = LiveReply(self, message, interval) if interval > 0 else None
        async with self.typing(message.chat_id):
            reply = await self.agent.handle_message(message, on_text=live.add if live else None)
        if live is not None:
            await live.finish(reply)
        else:
            await self.deliver(reply)

    @contextlib.asynccontextmanager
    async def typing(self, chat_id: str) -> AsyncIterator[None]:
        """Keep the typing indicator on while the block runs (where the platform has one)."""
        if not self.has_typing:
            yield
            return

        async def keep_typing() -> None:
            while True:
                with contextlib.suppress(Exception):  # a lost indicator is not worth a failure
                    await self.show_typing(chat_id)
                await asyncio.sleep(TYPING_REFRESH_S)

        task = asyncio.create_task(keep_typing())
        try:
            yield
        finally:
            task.cancel()

    def chunks(self, text: str) -> list[str]:
        return split_text(text, self.max_length)


def split_text(text: str, limit: int | None) -> list[str]:
    """``text`` in pieces of at most ``limit`` characters, cut at a paragraph, line or
    word boundary where there is one in the second half of a piece."""
    if limit is None or len(text) <= limit:
        return [text]
    pieces = []
    while len(text) > limit:
        window = text[:limit]
        cut = max(window.rfind("\n\n"), window.rfind("\n"), window.rfind(" "))
        cut = cut if cut >= limit // 2 else limit
        pieces.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    if text:
        pieces.append(text)
    return pieces


def outline(value: Any, depth: int = 4) -> str:
    """The shape of a platform payload for a log line, without its values (which may be
    what someone wrote): ``{message: {message_id: int, chat: {id: int}, text: str[5]}}``."""
    if isinstance(value, dict):
        if depth == 0:
            return "{...}"
        return "{" + ", ".join(f"{str(k)[:40]}: {outline(v, depth - 1)}" for k, v in list(value.items())[:20]) + "}"
    if isinstance(value, list):
        return f"[{outline(value[0], depth - 1)}, ...]" if value and depth else f"list[{len(value)}]"
    if isinstance(value, str):
        return f"str[{len(value)}]"
    return type(value).__name__


def skip_broken(handler: Callable[P, Awaitable[Any]]) -> Callable[P, Awaitable[None]]:
    """Wrap a platform event handler: an event it cannot handle is logged and skipped,
    and the connector keeps running."""

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            await handler(*args, **kwargs)
        except Exception:
            log.exception("skipped an event that %s could not handle", handler.__qualname__)

    return wrapper
