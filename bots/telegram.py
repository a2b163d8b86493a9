"""Telegram, through python-telegram-bot: its handlers, its command system, its polling.

- Private chats: every message is answered. Groups: only messages that mention the bot
  (``@name``) or reply to one of its messages.
- Reactions arrive as ``message_reaction`` updates (asked for in ``allowed_updates``);
  the bot must be an administrator to see them in groups.
- Commands are registered with ``set_my_commands`` at start. In a group, answers with
  personal data (``/prefs``, ``/export``...) go to the person's private chat.
- Long polling by default; webhook mode (``[telegram] mode = "webhook"``) checks
  Telegram's secret token header (``TELEGRAM_WEBHOOK_SECRET``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

from pydantic import Field
from telegram import (
    BotCommand,
    InputFile,
    MessageEntity,
    ReactionTypeCustomEmoji,
    ReactionTypeEmoji,
    ReplyParameters,
    Update,
)
from telegram import Message as TgMessage
from telegram.constants import ChatAction, ChatType
from telegram.error import Forbidden
from telegram.ext import Application, CommandHandler, ContextTypes, ExtBot, MessageHandler, MessageReactionHandler
from telegram.ext import filters as tg_filters
from telegram.request import HTTPXRequest

from agent_core.agent import Agent
from agent_core.config import Config, Section
from agent_core.events import Command, Message, Reaction, Reply
from agent_core.platforms import PlatformSpec, Secret
from bots.base import Connector, outline, skip_broken

log = logging.getLogger(__name__)


class TelegramSettings(Section):
    """on when TELEGRAM_BOT_TOKEN is set (TELEGRAM_WEBHOOK_SECRET for webhook mode)"""

    base_url: str = "https://api.telegram.org/bot"
    """Bot API address (self-hosted server, proxy); the token is appended"""
    base_file_url: str = "https://api.telegram.org/file/bot"
    """where files are downloaded from; the token is appended"""
    mode: Literal["polling", "webhook"] = "polling"
    """"polling" (no public URL needed) or "webhook" (Telegram posts to webhook_url)"""
    poll_timeout_s: int = Field(default=30, ge=0)
    """long-polling timeout of getUpdates"""
    request_timeout_s: float = Field(default=20.0, gt=0)
    """timeout of every other Bot API call"""
    webhook_url: str = ""
    """webhook mode: the public HTTPS URL that reaches webhook_listen:webhook_port"""
    webhook_listen: str = "127.0.0.1"
    """webhook mode: the address the webhook server binds"""
    webhook_port: int = Field(default=8443, ge=1, le=65535)
    """webhook mode: its port"""
    stream_edit_interval_s: float = Field(default=3.0, ge=0.0)
    """show a reply as it is written, editing it at most this often (20 a minute fits groups); 0 = final text only"""


PLATFORM = PlatformSpec(
    name="telegram",
    settings=TelegramSettings,
    secrets=(
        Secret("telegram_bot_token", "TELEGRAM_BOT_TOKEN", "telegram.token"),
        Secret("telegram_webhook_secret", "TELEGRAM_WEBHOOK_SECRET", "telegram.webhook_secret"),
    ),
    loggers=("telegram",),
    event_ids="messages and commands '<chat id>:<message id>'; reactions 'reaction:<update id>:<emoji>:<0|1>'",
    requirements=("python-telegram-bot[webhooks]>=22,<23",),
)

ALLOWED_UPDATES = ["message", "message_reaction"]
GROUPS = {ChatType.GROUP, ChatType.SUPERGROUP}


class TolerantBot(ExtBot[None]):
    """An ExtBot that skips an update it cannot parse instead of failing the whole batch.

    python-telegram-bot parses a getUpdates batch at once; one malformed update would
    make every later poll fail on the same batch. Here a broken update is logged and
    replaced by an empty one with its id, so polling moves past it."""

    async def _post(self, endpoint: str, data: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        result = await super()._post(endpoint, data, **kwargs)
        if endpoint != "getUpdates" or not isinstance(result, list):
            return result
        kept = []
        for item in result:
            try:
                Update.de_json(item, self)
                kept.append(item)
            except Exception:
                update_id = item.get("update_id") if isinstance(item, dict) else None
                log.warning("skipped a malformed Telegram update %s: %s", update_id, outline(item))
                if isinstance(update_id, int):
                    kept.append({"update_id": update_id})
        return kept


class TelegramConnector(Connector):
    platform = "telegram"
    max_length = 4096
    has_typing = True
    can_edit = True

    def __init__(self, agent: Agent, config: Config) -> None:
        super().__init__(agent, config)
        settings = config.settings.telegram
        token = config.secrets.get("telegram_bot_token")
        if not token:
            raise ValueError("TELEGRAM_BOT_TOKEN is not set")
        timeout = settings.request_timeout_s
        bot = TolerantBot(
            token,
            base_url=settings.base_url,
            base_file_url=settings.base_file_url,
            request=HTTPXRequest(connect_timeout=timeout, read_timeout=timeout, write_timeout=timeout),
            get_updates_request=HTTPXRequest(connect_timeout=timeout, read_timeout=settings.poll_timeout_s + timeout),
        )
        self.app: Application[Any, Any, Any, Any, Any, Any] = (
            Application.builder().bot(bot).concurrent_updates(32).build()
        )
        names = [spec.name for spec in agent.commands.specs.values()]
        self.app.add_handler(CommandHandler(["start", *names], self._on_command))
        self.app.add_handler(MessageHandler(tg_filters.TEXT & ~tg_filters.COMMAND, self._on_text))
        self.app.add_handler(MessageReactionHandler(self._on_reaction))
        self.app.add_error_handler(self._on_error)

    @classmethod
    def configured(cls, config: Config) -> bool:
        return config.secrets.get("telegram_bot_token") is not None

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        settings = self.config.settings.telegram
        try:
            await self.app.initialize()  # getMe: fails here if the token or the address is wrong
            await self.app.bot.set_my_commands(
                [BotCommand(s.name, s.summary[:256]) for s in self.agent.commands.specs.values()]
            )
            await self.app.start()
            updater = self.app.updater
            assert updater is not None
            if settings.mode == "webhook":
                await updater.start_webhook(
                    listen=settings.webhook_listen, port=settings.webhook_port, url_path="telegram",
                    webhook_url=settings.webhook_url or None, allowed_updates=ALLOWED_UPDATES,
                    secret_token=self.config.secrets.get("telegram_webhook_secret"),
                )  # fmt: skip
            else:
                await updater.start_polling(
                    timeout=settings.poll_timeout_s, allowed_updates=ALLOWED_UPDATES, error_callback=self._on_poll_error
                )
        except Exception:
            await self._shutdown()
            raise
        log.info("telegram: receiving as @%s (%s)", self.app.bot.username, settings.mode)

    async def stop(self) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        updater = self.app.updater
        if updater is not None and updater.running:
            await updater.stop()
        if self.app.running:
            await self.app.stop()
        await self.app.shutdown()

    # --- events in ---------------------------------------------------------------------

    def _addressed(self, message: TgMessage) -> bool:
        """In a group: does this message mention the bot or reply to it?"""
        bot = self.app.bot
        replied_to = message.reply_to_message.from_user if message.reply_to_message else None
        if replied_to is not None and replied_to.id == bot.id:
            return True
        mentions = message.parse_entities([MessageEntity.MENTION]).values()
        return f"@{bot.username}".lower() in (m.lower() for m in mentions)

    def _base(self, update: Update) -> dict[str, Any]:
        chat, user = update.effective_chat, update.effective_user
        assert chat is not None and user is not None
        return {
            "platform": self.platform,
            "chat_id": str(chat.id),
            "sender_id": str(user.id),
            "sender_name": user.full_name,
            "chat_kind": "group" if chat.type in GROUPS else "private",
        }

    @skip_broken
    async def _on_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, user = update.effective_message, update.effective_user
        if message is None or user is None or user.is_bot or not message.text:
            return
        base = self._base(update)
        text = message.text
        if base["chat_kind"] == "group":
            if not self._addressed(message):
                return
            text = text.replace(f"@{self.app.bot.username}", "").strip() or text
        await self.respond(
            Message(**base, text=text, message_id=str(message.message_id),
                    event_id=f"{base['chat_id']}:{message.message_id}")
        )  # fmt: skip

    @skip_broken
    async def _on_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, user = update.effective_message, update.effective_user
        if message is None or user is None or user.is_bot or not message.text:
            return
        base = self._base(update)
        name = message.text.split()[0][1:].split("@")[0].lower()
        reply = await self.agent.handle_command(
            Command(**base, name="help" if name == "start" else name, args=" ".join(context.args or []),
                    event_id=f"{base['chat_id']}:{message.message_id}")
        )  # fmt: skip
        if reply is None:
            return
        if reply.private and base["chat_kind"] == "group":
            await self._send_privately(reply, user_id=base["sender_id"], group_message=message)
            return
        await self.deliver(dataclasses.replace(reply, in_reply_to=str(message.message_id)))

    async def _send_privately(self, reply: Reply, *, user_id: str, group_message: TgMessage) -> None:
        """Personal data asked for in a group goes to the person's private chat."""
        try:
            await self.send(dataclasses.replace(reply, chat_id=user_id, in_reply_to=None))
            note = "I've sent you the answer in a private chat."
        except Forbidden:
            note = f"I can't write to you privately yet: open a chat with @{self.app.bot.username} and ask there."
        await group_message.reply_text(note)

    @skip_broken
    async def _on_reaction(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        change = update.message_reaction
        if change is None or change.user is None or change.user.is_bot:
            return  # anonymous (a channel or an anonymous admin): no one to learn from
        before = {_emoji(r) for r in change.old_reaction} - {None}
        after = {_emoji(r) for r in change.new_reaction} - {None}
        base = self._base(update)
        for emoji, added in [(e, False) for e in sorted(before - after)] + [(e, True) for e in sorted(after - before)]:
            await self.agent.handle_reaction(
                Reaction(**base, message_id=str(change.message_id), emoji=str(emoji), added=added,
                         event_id=f"reaction:{update.update_id}:{emoji}:{int(added)}")
            )  # fmt: skip

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        log.error("telegram: an update failed and was skipped", exc_info=context.error)

    def _on_poll_error(self, error: Exception) -> None:
        log.warning("telegram: polling failed (%s); python-telegram-bot retries", error)

    # --- replies out -------------------------------------------------------------------

    async def send(self, reply: Reply) -> str | None:
        bot = self.app.bot
        chat_id = int(reply.chat_id)
        # Quote the message answered in groups (negative ids), where several people talk, and
        # a late answer everywhere (other messages came in between).
        quote = ReplyParameters(int(reply.in_reply_to), allow_sending_without_reply=True) if (
            reply.in_reply_to and (chat_id < 0 or reply.late)
        ) else None  # fmt: skip
        sent = None
        for i, chunk in enumerate(self.chunks(reply.text)):
            sent = await bot.send_message(chat_id, chunk, reply_parameters=quote if i == 0 else None)
        if reply.attachment is not None:
            document = InputFile(reply.attachment.content, filename=reply.attachment.filename)
            sent = await bot.send_document(chat_id, document)
        return str(sent.message_id) if sent else None

    async def show_typing(self, chat_id: str) -> None:
        await self.app.bot.send_chat_action(int(chat_id), ChatAction.TYPING)

    async def edit(self, chat_id: str, platform_message_id: str, text: str) -> None:
        await self.app.bot.edit_message_text(text[: self.max_length], chat_id=int(chat_id),
                                             message_id=int(platform_message_id))  # fmt: skip


def _emoji(reaction: object) -> str | None:
    if isinstance(reaction, ReactionTypeEmoji):
        return reaction.emoji
    if isinstance(reaction, ReactionTypeCustomEmoji):
        return f"custom:{reaction.custom_emoji_id}"
    return None  # paid reactions carry no taste
