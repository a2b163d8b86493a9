"""The terminal: chat with attune on standard input and output.

Each line is a message, a slash command (``/help``), or a reaction to the last reply:
``+1``, ``-1``, an emoji (``❤️``) or a name (``:tada:``). A new reaction replaces the
previous one, as on Telegram. When standard input is not a terminal the lines are read
from it, so a session can be scripted: ``printf 'hello\\n+1\\n/stats\\n' | attune chat``.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import sys
import threading
import unicodedata
from typing import TextIO

from agent_core.agent import Agent
from agent_core.commands import parse_command
from agent_core.config import Config
from agent_core.events import Command, Message, Reaction, Reply
from agent_core.platforms import PlatformSpec
from bots.base import Connector

log = logging.getLogger(__name__)

PLATFORM = PlatformSpec(
    name="terminal",
    event_ids="none: a line typed is read once",
)
SHORTHANDS = {"+1": "👍", "-1": "👎"}
_EMOJI_PARTS = {"So", "Sk", "Mn", "Cf"}  # symbols, skin tones, variation selectors, ZWJ


def as_reaction(line: str) -> str | None:
    """The emoji a line reacts with, or None if the line is a message."""
    text = line.strip()
    if text in SHORTHANDS:
        return SHORTHANDS[text]
    if len(text) > 2 and text.startswith(":") and text.endswith(":") and " " not in text:
        return text
    if 0 < len(text) <= 8 and all(unicodedata.category(c) in _EMOJI_PARTS for c in text):
        return text
    return None


def default_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "you"


class TerminalConnector(Connector):
    platform = "terminal"

    def __init__(
        self,
        agent: Agent,
        config: Config,
        *,
        user: str | None = None,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
    ) -> None:
        super().__init__(agent, config)
        self.user = user or default_user()
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.interactive = self.stdin.isatty()
        if self.interactive:
            # Line editing and history; without readline, input() writes its prompt to stderr.
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401
        self.chat_id = f"terminal:{self.user}"
        self._last_reply: str | None = None  # platform id of the last answer
        self._last_reaction: str | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def configured(cls, config: Config) -> bool:
        return False  # never started for a token; it is the fallback front end

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="terminal")
        self._task.add_done_callback(lambda _: self.finished.set())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _print(self, text: str = "", end: str = "\n") -> None:
        self.stdout.write(text + end)
        self.stdout.flush()

    async def send(self, reply: Reply) -> str | None:
        self._print(f"{self.agent.settings.agent.name}> {reply.text}")
        if reply.attachment is not None:
            self._print(reply.attachment.content.decode(errors="replace"))
        return str(reply.reply_id) if reply.reply_id is not None else None

    async def _read_line(self) -> str | None:
        """The next line, or None at end of input. A daemon thread reads, so that
        leaving never waits for a blocked ``input()``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str | None] = loop.create_future()

        def read() -> None:
            try:
                line: str | None = input("you> ") if self.interactive else self.stdin.readline()
                if not self.interactive:
                    line = line.rstrip("\n") if line else None
            except (EOFError, OSError, ValueError):
                line = None
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(line))

        threading.Thread(target=read, name="terminal-input", daemon=True).start()
        return await future

    async def _loop(self) -> None:
        if self.interactive:
            self._print(
                f"Chatting as {self.user}. Type /help for commands, +1/-1 or an emoji to react, Ctrl-D to leave."
            )
        while (line := await self._read_line()) is not None:
            if not line.strip():
                continue
            try:
                await self._handle(line)
            except Exception:  # one bad line must not end the session
                log.exception("could not handle a line of %d characters", len(line))
                self._print("(something went wrong with that; see the log)")

    def _event(self) -> dict[str, str]:
        return {"platform": self.platform, "chat_id": self.chat_id, "sender_id": self.user, "sender_name": self.user}

    async def _handle(self, line: str) -> None:
        if (emoji := as_reaction(line)) is not None:
            await self._react(emoji)
            return
        if (command := parse_command(line)) is not None:
            await self.deliver(
                await self.agent.handle_command(Command(**self._event(), name=command[0], args=command[1]))
            )
            return
        shown: list[str] = []

        async def show(piece: str) -> None:
            if not shown:
                self._print(f"{self.agent.settings.agent.name}> ", end="")
            shown.append(piece)
            self._print(piece, end="")

        reply = await self.agent.handle_message(Message(**self._event(), text=line), on_text=show)
        if reply is None:
            return
        streamed = bool(shown)
        if streamed:
            text = "".join(shown).strip()
            self._print(reply.text[len(text) :] if reply.text.startswith(text) else "")  # e.g. a note added after
        if streamed and reply.kind == "answer" and reply.reply_id is not None:
            platform_id: str | None = str(reply.reply_id)  # already shown, token by token
            await self.agent.delivered(reply, platform_id)
        else:
            platform_id = await self.send(reply)
        if reply.kind == "answer" and platform_id is not None:
            self._last_reply, self._last_reaction = platform_id, None

    async def _react(self, emoji: str) -> None:
        if self._last_reply is None:
            self._print("(nothing to react to yet)")
            return
        if self._last_reaction is not None:
            await self.agent.handle_reaction(
                Reaction(**self._event(), message_id=self._last_reply, emoji=self._last_reaction, added=False)
            )
        outcome = await self.agent.handle_reaction(Reaction(**self._event(), message_id=self._last_reply, emoji=emoji))
        self._last_reaction = emoji
        self._print(f"(reacted {emoji} to the last reply: reward {outcome.reward:+.2f})")
