"""Slack, through slack-bolt (async): its listeners, its slash command, Socket Mode or HTTP.

- Direct messages are answered; in channels, messages that mention the bot
  (``app_mention``), answered in the thread they came from.
- ``reaction_added`` / ``reaction_removed`` on the bot's replies; Slack's emoji names
  (``+1``, ``thumbsup``, ``heart``...) map to rewards through ``[rewards]``.
- One slash command (``/attune prefs tone formal``) carries every command; it is
  acknowledged at once (Slack wants that within 3 s) and answered ephemerally after.
- Socket Mode by default (``SLACK_APP_TOKEN``, no public URL); HTTP mode
  (``[slack] mode = "http"``) verifies each request with ``SLACK_SIGNING_SECRET``.
- Slack retries an event it thinks was lost (``X-Slack-Retry-Num``); every message is
  keyed by its channel and ``ts``, so a retry never gets a second reply.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

from aiohttp import web
from pydantic import Field
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_client import AsyncWebClient

from agent_core.agent import Agent
from agent_core.config import Config, Section
from agent_core.events import Command, Message, Reaction, Reply
from agent_core.platforms import PlatformSpec, Secret
from bots.base import Connector, outline, skip_broken

log = logging.getLogger(__name__)


class SlackSettings(Section):
    """on when SLACK_BOT_TOKEN is set (plus SLACK_APP_TOKEN, or SLACK_SIGNING_SECRET for http)"""

    api_url: str = "https://slack.com/api/"
    """Web API root (proxy, Enterprise Grid gateway)"""
    mode: Literal["socket", "http"] = "socket"
    """"socket" (Socket Mode, no public URL needed) or "http" (Slack posts events to us)"""
    http_host: str = "127.0.0.1"
    """http mode: the address Bolt's server binds"""
    http_port: int = Field(default=3000, ge=1, le=65535)
    """http mode: its port (events, commands and interactivity at /slack/events)"""
    command: str = Field(default="/attune", pattern=r"^/[a-z0-9_-]{1,31}$")
    """the slash command as created in the Slack app ("/attune prefs tone formal")"""
    stream_edit_interval_s: float = Field(default=0.0, ge=0.0)
    """0 = the final text only (chat.update is ~50 a minute for the whole workspace); above 0: edit this often"""


def reaction_name(name: str) -> str:
    """Slack names reactions, with a skin tone as a suffix: ``+1::skin-tone-2`` -> ``+1``."""
    return _SKIN_TONE.sub("", name.strip().strip(":"))


PLATFORM = PlatformSpec(
    name="slack",
    settings=SlackSettings,
    secrets=(
        Secret("slack_bot_token", "SLACK_BOT_TOKEN", "slack.bot_token"),
        Secret("slack_app_token", "SLACK_APP_TOKEN", "slack.app_token"),
        Secret("slack_signing_secret", "SLACK_SIGNING_SECRET", "slack.signing_secret"),
    ),
    loggers=("slack_bolt", "slack_sdk"),
    reaction_name=reaction_name,
    event_ids="messages '<channel>:<ts>'; reactions Slack's event_id; slash commands their trigger_id",
    requirements=("slack-bolt>=1.20", "slack-sdk>=3.30"),
)

_MENTION = re.compile(r"<@[A-Z0-9]+>")
_SKIN_TONE = re.compile(r"::skin-tone-\d$")
IGNORED_SUBTYPES = {"bot_message", "message_changed", "message_deleted", "channel_join", "channel_leave"}


class SlackConnector(Connector):
    platform = "slack"
    max_length = 4000  # Slack shows up to 40,000 characters, but advises 4,000
    can_edit = True

    def __init__(self, agent: Agent, config: Config) -> None:
        super().__init__(agent, config)
        settings = config.settings.slack
        token = config.secrets.get("slack_bot_token")
        if not token:
            raise ValueError("SLACK_BOT_TOKEN is not set")
        http = settings.mode == "http"
        if http and not config.secrets.get("slack_signing_secret"):
            raise ValueError('[slack] mode = "http" needs SLACK_SIGNING_SECRET')
        if not http and not config.secrets.get("slack_app_token"):
            raise ValueError("Socket Mode needs SLACK_APP_TOKEN (an app-level token, xapp-...)")
        self.app = AsyncApp(
            client=AsyncWebClient(token=token, base_url=settings.api_url),
            signing_secret=config.secrets.get("slack_signing_secret") or "",
            request_verification_enabled=http,
        )
        self.app.event("message")(self._on_message)
        self.app.event("app_mention")(self._on_mention)
        self.app.event("reaction_added")(self._on_reaction_added)
        self.app.event("reaction_removed")(self._on_reaction_removed)
        self.app.command(settings.command)(self._on_command)
        self.app.error(self._on_error)
        self._socket: AsyncSocketModeHandler | None = None
        self._site: web.AppRunner | None = None
        self.bot_user_id = ""

    @classmethod
    def configured(cls, config: Config) -> bool:
        return config.secrets.get("slack_bot_token") is not None

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        settings = self.config.settings.slack
        identity = await self.app.client.auth_test()  # fails here if the token or the address is wrong
        self.bot_user_id = str(identity["user_id"])
        if settings.mode == "http":
            runner = web.AppRunner(self.app.web_app(path="/slack/events", port=settings.http_port))
            await runner.setup()
            await web.TCPSite(runner, settings.http_host, settings.http_port).start()
            self._site = runner
            log.info("slack: receiving on http://%s:%d/slack/events", settings.http_host, settings.http_port)
            return
        self._socket = AsyncSocketModeHandler(self.app, self.config.secrets.get("slack_app_token"))
        await self._socket.connect_async()
        log.info("slack: connected in Socket Mode as %s", self.bot_user_id)

    async def stop(self) -> None:
        if self._socket is not None:
            await self._socket.close_async()
            self._socket = None
        if self._site is not None:
            await self._site.cleanup()
            self._site = None

    # --- events in ---------------------------------------------------------------------

    def _message(self, event: dict[str, Any], kind: str) -> Message:
        text = _MENTION.sub("", event.get("text") or "").strip()
        channel, ts = str(event["channel"]), str(event["ts"])
        return Message(
            platform=self.platform, chat_id=channel, sender_id=str(event["user"]), chat_kind=kind,  # type: ignore[arg-type]
            text=text, message_id=str(event.get("thread_ts") or ts), event_id=f"{channel}:{ts}",
        )  # fmt: skip

    def _from_a_person(self, event: dict[str, Any]) -> bool:
        return (
            bool(event.get("user"))
            and not event.get("bot_id")
            and event.get("subtype") not in IGNORED_SUBTYPES
            and event.get("user") != self.bot_user_id
        )

    @skip_broken
    async def _on_message(self, event: dict[str, Any]) -> None:
        """Direct messages; channel messages are answered through app_mention only."""
        if event.get("channel_type") == "im" and self._from_a_person(event):
            await self.respond(self._message(event, "private"))

    @skip_broken
    async def _on_mention(self, event: dict[str, Any]) -> None:
        if self._from_a_person(event):
            await self.respond(self._message(event, "group"))

    async def _react(self, event: dict[str, Any], body: dict[str, Any], added: bool) -> None:
        item = event.get("item") or {}
        if item.get("type") != "message" or not event.get("user"):
            return
        await self.agent.handle_reaction(
            Reaction(platform=self.platform, chat_id=str(item["channel"]), sender_id=str(event["user"]),
                     message_id=str(item["ts"]), emoji=reaction_name(str(event["reaction"])), added=added,
                     event_id=str(body.get("event_id") or f"{item['ts']}:{event['reaction']}:{added}"))
        )  # fmt: skip

    @skip_broken
    async def _on_reaction_added(self, event: dict[str, Any], body: dict[str, Any]) -> None:
        await self._react(event, body, added=True)

    @skip_broken
    async def _on_reaction_removed(self, event: dict[str, Any], body: dict[str, Any]) -> None:
        await self._react(event, body, added=False)

    async def _on_command(self, ack: Any, command: dict[str, Any], respond: Any) -> None:
        await ack()  # within Slack's 3 seconds; the answer follows
        try:
            name, _, args = (command.get("text") or "").strip().partition(" ")
            reply = await self.agent.handle_command(
                Command(platform=self.platform, chat_id=str(command["channel_id"]), sender_id=str(command["user_id"]),
                        chat_kind="private" if str(command["channel_id"]).startswith("D") else "group",
                        name=(name or "help").lower().lstrip("/"), args=args.strip(),
                        event_id=command.get("trigger_id"))
            )  # fmt: skip
        except Exception:
            log.exception("slack: the command %s failed", outline(command))
            await respond(text="Sorry, that command failed.", response_type="ephemeral")
            return
        if reply is not None:
            # Command answers are ephemeral: only the person who asked sees them.
            for chunk in self.chunks(_with_attachment(reply)):
                await respond(text=chunk, response_type="ephemeral")

    async def _on_error(self, error: Exception, body: dict[str, Any]) -> None:
        log.error("slack: skipped an event (%s: %s)", type(error).__name__, error)

    # --- replies out -------------------------------------------------------------------

    async def send(self, reply: Reply) -> str | None:
        ts = None
        # Answer a mention in its thread (message_id is the thread's ts); DMs need no thread,
        # except for a late answer (other messages came in between).
        thread = reply.in_reply_to if reply.late or not reply.chat_id.startswith("D") else None
        for chunk in self.chunks(_with_attachment(reply)):
            response = await self.app.client.chat_postMessage(channel=reply.chat_id, text=chunk, thread_ts=thread)
            ts = str(response["ts"])
        return ts

    async def edit(self, chat_id: str, platform_message_id: str, text: str) -> None:
        await self.app.client.chat_update(channel=chat_id, ts=platform_message_id, text=text[: self.max_length])


def _with_attachment(reply: Reply) -> str:
    """Slack's file upload is a three-step API; a JSON document goes inline instead."""
    if reply.attachment is None:
        return reply.text
    return f"{reply.text}\n```\n{reply.attachment.content.decode(errors='replace')}\n```"
