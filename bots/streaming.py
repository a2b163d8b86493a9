"""Showing a reply on a chat platform while it is written: send, then edit at a rate.

Telegram, Discord and Slack have no token stream; a bot shows progress by sending the
first words and editing that message as more arrive. Each platform limits how often
(``[<platform>] stream_edit_interval_s``), so the edits here come at most that often,
from a task of their own: a slow platform never holds up the model. The final text
always replaces the last edit, and if editing fails the reply is sent afresh: nothing
the model wrote is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

from agent_core.agent import Agent
from agent_core.events import Message, Reply

log = logging.getLogger(__name__)

WRITING = " …"  # shown after the text while the reply is still being written
FIRST_DRAFT_S = 1.0  # the first draft waits this long (or the interval, if shorter)


class Editable(Protocol):
    """What a live reply needs of the platform it is shown on (every connector in
    ``bots.base`` has it; ``send`` and ``edit`` are only called where it can edit)."""

    platform: str
    agent: Agent

    async def send(self, reply: Reply) -> str | None: ...

    async def edit(self, chat_id: str, platform_message_id: str, text: str) -> None: ...

    async def deliver(self, reply: Reply | None) -> None: ...

    def chunks(self, text: str) -> list[str]: ...


class LiveReply:
    """One reply being written to ``message``'s chat: :meth:`add` each piece, then
    :meth:`finish` with the agent's final reply."""

    def __init__(self, connector: Editable, message: Message, interval_s: float) -> None:
        self.connector = connector
        self.message = message
        self.interval_s = interval_s
        self.text = ""
        self.platform_id: str | None = None  # the message being edited, once sent
        self._shown = ""
        self._changed = asyncio.Event()
        self._calling = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def add(self, piece: str) -> None:
        self.text += piece
        self._changed.set()
        if self._task is None and self.text.strip():
            self._task = asyncio.create_task(self._show())

    async def _show(self) -> None:
        """Send the text so far, then edit it whenever it changed and the interval passed.
        A reply finished within the first moment is simply sent whole, with no draft."""
        await asyncio.sleep(min(self.interval_s, FIRST_DRAFT_S))
        while True:
            await self._changed.wait()
            self._changed.clear()
            started = time.monotonic()
            text = self.text.strip()
            chat_id = self.message.chat_id
            async with self._calling:  # finish() never cancels a call half-way (a sent draft would be lost)
                try:
                    if self.platform_id is None:
                        draft = Reply(text=text + WRITING, chat_id=chat_id, in_reply_to=self.message.message_id)
                        self.platform_id = await self.connector.send(draft)
                    elif text != self._shown:
                        await self.connector.edit(chat_id, self.platform_id, text + WRITING)
                    self._shown = text
                except Exception as exc:  # a missed edit is not worth a failure; the final text follows
                    log.warning("%s: could not show the reply so far (%s)", self.connector.platform, exc)
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def finish(self, reply: Reply | None) -> None:
        """Replace what was shown with the final reply (or send it, if nothing was shown)."""
        if self._task is not None:
            async with self._calling:
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if reply is None:
            return
        if self.platform_id is None or reply.attachment is not None:
            await self.connector.deliver(reply)
            return
        first, *rest = self.connector.chunks(reply.text)
        try:
            await self.connector.edit(reply.chat_id, self.platform_id, first)
        except Exception as exc:
            log.warning("%s: could not put the final text in place (%s); sending it anew", self.connector.platform, exc)
            await self.connector.deliver(reply)
            return
        for chunk in rest:
            await self.connector.send(Reply(text=chunk, chat_id=reply.chat_id))
        await self.connector.agent.delivered(reply, self.platform_id)
