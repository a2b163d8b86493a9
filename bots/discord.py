"""Discord, through discord.py: its gateway client, its application commands, raw reactions.

- Direct messages are answered; in servers, messages that mention the bot.
- ``on_raw_reaction_add`` / ``on_raw_reaction_remove`` (raw: they arrive also for
  messages no longer in the client's cache).
- Real application commands (``/prefs``, ``/remember``, ``/forget``, ``/export``,
  ``/stats``, ``/help``) with typed options, synced at start; answers with personal
  data are ephemeral.
- Intents: ``guilds``, ``guild_messages``, ``dm_messages``, ``guild_reactions``,
  ``dm_reactions`` and the privileged ``message_content`` (switch it on in the Developer
  Portal, under Bot).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
from collections.abc import Callable
from typing import Any, Literal

import discord
import discord.gateway
import discord.http
import yarl
from discord import app_commands
from pydantic import Field

from agent_core.agent import Agent
from agent_core.config import Config, Section
from agent_core.events import Command, Message, Reaction, Reply
from agent_core.platforms import PlatformSpec, Secret
from bots.base import Connector, outline, skip_broken

log = logging.getLogger(__name__)


class DiscordSettings(Section):
    """on when DISCORD_BOT_TOKEN is set"""

    api_base: str = "https://discord.com/api/v10"
    """REST API root (proxy)"""
    gateway_url: str = "wss://gateway.discord.gg/"
    """gateway WebSocket address"""
    sync_commands: bool = True
    """register the slash commands with Discord at start"""
    guild_ready_timeout_s: float = Field(default=2.0, ge=0)
    """how long to wait for the servers' data after connecting before answering"""
    stream_edit_interval_s: float = Field(default=1.5, ge=0.0)
    """show a reply as it is written, editing it at most this often (5 per 5 s per channel); 0 = final text only"""


PLATFORM = PlatformSpec(
    name="discord",
    settings=DiscordSettings,
    secrets=(Secret("discord_bot_token", "DISCORD_BOT_TOKEN", "discord.token"),),
    loggers=("discord",),
    event_ids="messages '<channel id>:<message id>'; slash commands 'interaction:<interaction id>'; "
    "reactions none (adding one twice changes nothing)",
    requirements=("discord.py>=2.4,<3",),
)

INTENTS = discord.Intents.none()
INTENTS.guilds = True
INTENTS.guild_messages = True
INTENTS.dm_messages = True
INTENTS.guild_reactions = True
INTENTS.dm_reactions = True
INTENTS.message_content = True

READY_TIMEOUT_S = 60.0
PrefsSetting = Literal["length", "tone", "emoji", "format", "language", "persona", "reset"]
AdminAction = Literal["stats", "train", "rollback"]


class _Client(discord.Client):
    """discord.py's client, with its events forwarded to the connector."""

    def __init__(self, connector: DiscordConnector, **options: Any) -> None:
        super().__init__(intents=INTENTS, **options)
        self.connector = connector
        self.tree = app_commands.CommandTree(self)
        connector.register_commands(self.tree)
        # discord.py parses gateway events in its connection loop, where one malformed
        # payload would end the connection: guard each parser so it is logged and skipped.
        parsers = self._connection.parsers
        for name, parse in list(parsers.items()):
            parsers[name] = _skipping_broken(name, parse)

    async def on_message(self, message: discord.Message) -> None:
        await self.connector.on_message(message)

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await self.connector.on_reaction(payload, added=True)

    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        await self.connector.on_reaction(payload, added=False)

    async def on_error(self, event_method: str, /, *args: Any, **kwargs: Any) -> None:
        log.exception("discord: skipped a %s event", event_method)


def _skipping_broken(name: str, parse: Callable[[Any], None]) -> Callable[[Any], None]:
    def parse_or_skip(data: Any) -> None:
        try:
            parse(data)
        except Exception:
            log.exception("discord: skipped a malformed %s event: %s", name, outline(data))

    return parse_or_skip


class DiscordConnector(Connector):
    platform = "discord"
    max_length = 2000
    has_typing = True
    can_edit = True

    def __init__(self, agent: Agent, config: Config) -> None:
        super().__init__(agent, config)
        token = config.secrets.get("discord_bot_token")
        if not token:
            raise ValueError("DISCORD_BOT_TOKEN is not set")
        self.token = token
        self.client: _Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._dm_channels: set[int] = set()

    @classmethod
    def configured(cls, config: Config) -> bool:
        return config.secrets.get("discord_bot_token") is not None

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        settings = self.config.settings.discord
        # discord.py keeps both addresses as class attributes: one per process.
        discord.http.Route.BASE = settings.api_base.rstrip("/")
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.gateway_url)
        client = _Client(self, guild_ready_timeout=settings.guild_ready_timeout_s)  # a closed client cannot restart
        try:
            await client.login(self.token)  # fails here if the token or the address is wrong
            self._task = asyncio.create_task(client.connect(reconnect=True), name="discord-gateway")
            ready = asyncio.create_task(client.wait_until_ready())
            done, _ = await asyncio.wait({ready, self._task}, timeout=READY_TIMEOUT_S,
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            if ready not in done:
                ready.cancel()
                if self._task in done:
                    self._task.result()  # raises why the gateway connection ended
                raise TimeoutError(f"the Discord gateway did not get ready in {READY_TIMEOUT_S:.0f} s")
            if settings.sync_commands:
                await client.tree.sync()
        except BaseException:
            await client.close()
            raise
        self.client = client
        log.info("discord: connected as %s", client.user)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._task

    # --- events in ---------------------------------------------------------------------

    @skip_broken
    async def on_message(self, message: discord.Message) -> None:
        client = self.client
        if client is None or client.user is None or message.author.bot or not message.content:
            return
        private = isinstance(message.channel, discord.DMChannel)
        if private:
            self._dm_channels.add(message.channel.id)
        elif client.user not in message.mentions:
            return
        text = re.sub(rf"<@!?{client.user.id}>", "", message.content).strip() or message.content
        await self.respond(
            Message(platform=self.platform, chat_id=str(message.channel.id), sender_id=str(message.author.id),
                    sender_name=message.author.display_name, chat_kind="private" if private else "group",
                    text=text, message_id=str(message.id), event_id=f"{message.channel.id}:{message.id}")
        )  # fmt: skip

    @skip_broken
    async def on_reaction(self, payload: discord.RawReactionActionEvent, *, added: bool) -> None:
        client = self.client
        if client is None or client.user is None or payload.user_id == client.user.id:
            return
        emoji = payload.emoji.name if payload.emoji.is_unicode_emoji() else f"custom:{payload.emoji.id}"
        await self.agent.handle_reaction(
            Reaction(platform=self.platform, chat_id=str(payload.channel_id), sender_id=str(payload.user_id),
                     message_id=str(payload.message_id), emoji=str(emoji), added=added)
        )  # fmt: skip

    # --- application commands ------------------------------------------------------------

    def register_commands(self, tree: app_commands.CommandTree[Any]) -> None:
        """The agent's commands as Discord application commands with typed options."""
        specs = self.agent.commands.specs
        run = self._run_command

        @tree.command(name="help", description=specs["help"].summary)
        @app_commands.describe(command="a command to explain")
        async def help_(interaction: discord.Interaction, command: str | None = None) -> None:
            await run(interaction, "help", command or "")

        @tree.command(name="prefs", description=specs["prefs"].summary)
        @app_commands.describe(setting="what to set (leave out to see them all)", value="its value, or auto")
        async def prefs(interaction: discord.Interaction, setting: PrefsSetting | None = None,
                        value: str | None = None) -> None:  # fmt: skip
            await run(interaction, "prefs", " ".join(p for p in (setting, value) if p))

        @tree.command(name="remember", description=specs["remember"].summary)
        @app_commands.describe(text="what to remember")
        async def remember(interaction: discord.Interaction, text: str) -> None:
            await run(interaction, "remember", text)

        @tree.command(name="forget", description=specs["forget"].summary)
        @app_commands.describe(note="a note's number, 'all', or 'all confirm' (leave out to list your notes)")
        async def forget(interaction: discord.Interaction, note: str | None = None) -> None:
            await run(interaction, "forget", note or "")

        @tree.command(name="export", description=specs["export"].summary)
        async def export(interaction: discord.Interaction) -> None:
            await run(interaction, "export", "")

        @tree.command(name="stats", description=specs["stats"].summary)
        async def stats(interaction: discord.Interaction) -> None:
            await run(interaction, "stats", "")

        @tree.command(name="link", description=specs["link"].summary)
        @app_commands.describe(code="the code from your other platform (leave out to get one)")
        async def link(interaction: discord.Interaction, code: str | None = None) -> None:
            await run(interaction, "link", code or "")

        @tree.command(name="admin", description=specs["admin"].summary)
        @app_commands.describe(action="what to do", user="the user's number or platform:id (train, rollback)")
        async def admin(interaction: discord.Interaction, action: AdminAction, user: str | None = None) -> None:
            await run(interaction, "admin", " ".join(p for p in (action, user) if p))

        @tree.error
        async def on_command_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
            log.error("discord: the command %s failed: %s", interaction.command and interaction.command.name, error)

    async def _run_command(self, interaction: discord.Interaction, name: str, args: str) -> None:
        reply = await self.agent.handle_command(
            Command(platform=self.platform, chat_id=str(interaction.channel_id), sender_id=str(interaction.user.id),
                    sender_name=interaction.user.display_name,
                    chat_kind="private" if interaction.guild_id is None else "group",
                    name=name, args=args, event_id=f"interaction:{interaction.id}")
        )  # fmt: skip
        if reply is None:
            return
        chunks = self.chunks(reply.text)
        file = None
        if reply.attachment is not None:
            file = discord.File(io.BytesIO(reply.attachment.content), filename=reply.attachment.filename)
        first, rest = chunks[0], chunks[1:]
        if file is not None and not rest:
            await interaction.response.send_message(first, ephemeral=reply.private, file=file)
            return
        await interaction.response.send_message(first, ephemeral=reply.private)
        for chunk in rest:
            await interaction.followup.send(chunk, ephemeral=reply.private)
        if file is not None:
            await interaction.followup.send(file=file, ephemeral=reply.private)

    # --- replies out -------------------------------------------------------------------

    async def send(self, reply: Reply) -> str | None:
        assert self.client is not None
        channel = self.client.get_partial_messageable(int(reply.chat_id))
        reference = None
        # A reply to the message in a server channel, and for a late answer in a DM too.
        if reply.in_reply_to and (reply.late or int(reply.chat_id) not in self._dm_channels):
            reference = discord.MessageReference(
                message_id=int(reply.in_reply_to), channel_id=int(reply.chat_id), fail_if_not_exists=False
            )
        sent = None
        for i, chunk in enumerate(self.chunks(reply.text)):
            sent = await channel.send(chunk, reference=reference if i == 0 else None)  # type: ignore[arg-type]
        return str(sent.id) if sent else None

    async def show_typing(self, chat_id: str) -> None:
        assert self.client is not None
        await self.client.get_partial_messageable(int(chat_id)).typing()

    async def edit(self, chat_id: str, platform_message_id: str, text: str) -> None:
        assert self.client is not None
        message = self.client.get_partial_messageable(int(chat_id)).get_partial_message(int(platform_message_id))
        await message.edit(content=text[: self.max_length])
