"""The Agent: every platform's events come here, replies go back.

``handle_message`` is the pipeline of one message, top to bottom; ``handle_reaction``
and ``handle_command`` are the other two ways in; ``delivered`` records the platform's
id of a sent reply so that a later reaction on it finds it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import secrets
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import Any

from agent_core.access import Access
from agent_core.commands import Caller, Commands, parse_command
from agent_core.config import Settings
from agent_core.events import Command, Event, Message, Reaction, Reply, well_formed
from agent_core.llm import (
    AdapterRef,
    ChatMessage,
    GenerationRequest,
    LLMBackend,
    LLMBusy,
    LLMError,
    Steering,
    base_model_dir,
)
from agent_core.memory import Handled, Memory, Recalled
from agent_core.memory.model_facts import ModelFacts
from agent_core.operations import Operations
from agent_core.policy import DefaultsPolicy, LearningPolicy, StylePolicy
from agent_core.prompts import PromptParts, build_prompt
from agent_core.ratelimit import OneAtATime, RateLimiter
from agent_core.rewards import RewardMap, normalize
from agent_core.steering import ReplySteering
from agent_core.style import Style, finish, measure_style, token_budget
from agent_core.training.job import TrainingJob
from storage import (
    UNAVAILABLE,
    AdapterRow,
    Received,
    ReplyContext,
    Store,
    Unanswered,
    Unavailable,
)

log = logging.getLogger(__name__)

OnText = Callable[[str], Awaitable[None]]
APOLOGY = "Sorry, I couldn't come up with an answer just now. Your message is saved: I'll answer as soon as I can."
NOT_SAVED = "Sorry, I couldn't save your message just now, so I haven't answered it. Please send it again."
NOT_ALLOWED = "Sorry, this bot only talks with the people it was set up for."
CUT_NOTE = "(Your message was longer than I can read: I answered its first {limit} characters.)"
MISSED = ("Sorry, I couldn't answer this message in time, and it is too long ago to answer now. "
          "Please send it again if it still matters.")  # fmt: skip
DATABASE_DOWN = "Sorry, I can't reach my database just now; please try again in a moment."
BUSY = "I'm answering a lot of people at once right now. Your message is saved; please try again in a minute."


@dataclass(frozen=True)
class ReactionOutcome:
    """What a reaction did: stored or not, its reward, whether it trains the policy."""

    stored: bool  # False: a duplicate, or on a message that is not a stored reply
    reward: float = 0.0
    trains: bool = False  # only the person a reply answered teaches their own policy


class Agent:
    def __init__(self, settings: Settings, store: Store, llm: LLMBackend, policy: StylePolicy | None = None) -> None:
        self.settings = settings
        self.store = store
        self.llm = llm
        self.policy = policy or (
            LearningPolicy(store, settings.policy, settings.style)
            if settings.policy.learn
            else DefaultsPolicy(settings.style)
        )
        facts_model = ModelFacts(llm) if settings.memory.extract == "model" else None
        self.memory = Memory(store, settings.memory, settings.agent, facts_model)  # notes kept and recalled
        self.steering = ReplySteering(store, settings.steering)  # each user's reward model steers their replies
        self.training = TrainingJob(store.training, settings, model_dir=lambda: base_model_dir(settings),
                                    measured=self.steering.measured)  # fmt: skip
        self.operations = Operations(
            self.training, store, self.policy, llm.describe, self.steering
        )  # train now, roll back, stop, status
        self.commands = Commands(store, self.policy, describe_model=llm.describe, operations=self.operations,
                                 steering=self.steering, memory=self.memory)  # fmt: skip
        self.access = Access(settings.access)
        self.rewards = RewardMap(settings.rewards)
        limits = settings.limits
        self.limiter = RateLimiter(limits.messages_per_minute)  # per person
        everyone = limits.global_messages_per_minute
        self.global_limiter = RateLimiter(everyone) if everyone else None  # all people together
        self.one_at_a_time = OneAtATime()  # per person and chat
        self.boot = secrets.token_hex(8)  # marks the messages this process has taken and not answered yet
        self.started_at = time.time()
        self.model_loading: asyncio.Future[None] | None = None  # set by load_model(); None: started by the caller
        # per platform: set when a message's answer was deferred (the connector answers it later)
        self.deferred: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self._claimed_again: list[Unanswered] = []  # claimed deferred messages whose answering failed

    def load_model(self) -> asyncio.Future[None]:
        """Start the backend in the background (``llm.start()``), so that the platforms
        connect meanwhile: a reply waits for the model, a page or a command does not."""
        self.model_loading = asyncio.ensure_future(self.llm.start())
        # Then the embedding model, in the background too (recall uses keywords meanwhile); not
        # beside the local model: transformers' loading patches process-wide state, and two
        # models loading at once in two threads left the chat model's weights wrong.
        self.model_loading.add_done_callback(lambda _: self.memory.start())
        return self.model_loading

    async def _model_ready(self) -> bool:
        """Wait for a model still loading; False if its loading failed."""
        if self.model_loading is None:
            return True
        if not self.model_loading.done():
            log.info("a reply waits for the model to finish loading")
        try:
            await asyncio.shield(self.model_loading)
        except Exception:
            return False  # the failure itself is the caller of load_model's to report
        return True

    async def close(self) -> None:
        await self.operations.close()  # a training started by /admin or the dashboard stops (adapters stay)
        if self.model_loading is not None and not self.model_loading.done():
            log.info("stopping once the model has finished loading (it cannot be interrupted)")
            await asyncio.gather(self.model_loading, return_exceptions=True)
        await self.memory.close()
        await self.llm.close()
        await self.store.db.close()

    # --- the message pipeline ------------------------------------------------------------

    async def handle_message(self, msg: Message, on_text: OnText | None = None) -> Reply | None:
        """Answer one message; None if this event was already handled (or ignored)."""
        msg = well_formed(msg)
        if not self.access.allows(msg.platform, msg.sender_id, msg.chat_id):
            return self._not_allowed(msg)
        if (command := parse_command(msg.text)) is not None:
            return await self.handle_command(Command(**_event_fields(msg), name=command[0], args=command[1]))
        if refusal := self._refusal(msg):
            return Reply(text=refusal, chat_id=msg.chat_id, in_reply_to=msg.message_id, kind="notice")
        limit = self.settings.limits.max_message_chars
        cut = len(msg.text) > limit
        if cut:  # the model never sees more than the limit; the reply says so
            msg = dataclasses.replace(msg, text=msg.text[:limit])
        try:
            async with self.one_at_a_time.hold((msg.platform, msg.sender_id, msg.chat_id)):
                reply = await self._answer(msg, on_text)
        except UNAVAILABLE as exc:  # locked past busy_timeout_ms, disk full, server gone...
            _refused("a message", msg, exc)
            return Reply(text=NOT_SAVED, chat_id=msg.chat_id, in_reply_to=msg.message_id, kind="error")
        if cut and reply is not None:
            reply = dataclasses.replace(reply, text=f"{reply.text}\n\n{CUT_NOTE.format(limit=limit)}")
        return reply

    async def _answer(self, msg: Message, on_text: OnText | None) -> Reply | None:
        """Store the message, write the reply, store it: one person's turn in one chat."""
        user = await self.store.resolve_user(msg.platform, msg.sender_id, msg.sender_name)
        chat = await self.store.resolve_chat(msg.platform, msg.chat_id, msg.chat_kind)
        now = time.time()
        received, context, recalled, _ = await asyncio.gather(  # the database's round trips, at once
            self.store.receive_message(  # committed before the reply is generated
                user, chat, msg.text, platform_message_id=msg.message_id, event_id=msg.event_id, at=now,
                owner=self.boot,
            ),
            self._context(user, chat, before=now),
            self.memory.recall(user, msg.text, msg.chat_kind),  # the notes relevant to it, and only those
            self.policy.prepare(user),
        )  # fmt: skip
        if received is None:
            return None
        handled = await self.memory.take(user, msg.text, msg.chat_kind, now=now)  # facts kept, "forget that"...
        return await self._reply(msg, received, context, recalled, handled, on_text)

    def _context(self, user: int, chat: int, *, before: float) -> Awaitable[ReplyContext]:
        return self.store.reply_context(user, chat, before=before, turns=self.settings.agent.recent_turns)

    async def _reply(
        self, msg: Message, received: Received, context: ReplyContext, recalled: Recalled, handled: Handled,
        on_text: OnText | None, late: bool = False, told: bool = False,
    ) -> Reply | None:  # fmt: skip
        """Write the reply to a stored message and store it, or tell the person it failed.
        ``late``: the message came earlier (left by a stopped process, or deferred);
        ``told``: the person already knows its answer comes later (no second apology)."""
        if handled.reply is not None:  # memory answered it ("Noted: ...", "what do you know about me?")
            return await self._memory_reply(msg, received, handled, on_text, late)
        if not await self._model_ready():
            return await self._defer(msg, received, told)
        notes, start = recalled.notes, recalled.lead if self.llm.continues else ""
        if handled.question:  # "remember that X. <question>": the model answers the question, knowing X
            msg = dataclasses.replace(msg, text=handled.question)
            notes, start = list(dict.fromkeys([*handled.kept, *notes])), ""
        choice = await self.policy.choose(received.user_id, msg.text, context.preferences,
                                          key=_draw_key(msg, received))  # fmt: skip
        style = choice.style
        prompt = self._prompt(msg, style, context, notes)
        steering = await self.steering.for_reply(received.user_id, context.preferences) if self.llm.steers else None
        if handled.before and on_text is not None:
            await on_text(handled.before + "\n\n")
        try:
            text = await self._generate(prompt, style, context.adapter, steering, on_text, start)
        except LLMBusy:
            await self.store.settle(received.message_id)
            return Reply(text=BUSY, chat_id=msg.chat_id, in_reply_to=msg.message_id, kind="error")
        if text is None:
            return await self._defer(msg, received, told)
        observed = measure_style(text)  # what the user will read: the policy learns from this
        if handled.after and on_text is not None:
            await on_text("\n\n" + handled.after)
        text = "\n\n".join(part for part in (handled.before, text, handled.after) if part)
        reply_id = await self.store.add_reply(
            received,
            text=text,
            style=style.as_dict(),
            adapter_version=context.adapter.name if context.adapter else None,
            prompt=prompt,
            policy=choice.log,
            observed=observed.as_dict(),
        )
        await self.policy.shown(style, observed)
        return Reply(text=text, chat_id=msg.chat_id, reply_id=reply_id, in_reply_to=msg.message_id,
                     style=style.as_dict(), late=late)  # fmt: skip

    async def _defer(self, msg: Message, received: Received, told: bool) -> Reply | None:
        """The model could not answer: the message waits for a later answer
        (:meth:`answer_unanswered`, once the model answers again). The person is told so
        once, not again when a later try fails too (``told``)."""
        await self.store.defer(received.message_id)
        self.deferred[msg.platform].set()
        if told:
            return None
        return Reply(text=APOLOGY, chat_id=msg.chat_id, in_reply_to=msg.message_id, kind="error", deferred=True)

    async def _memory_reply(
        self, msg: Message, received: Received, handled: Handled, on_text: OnText | None, late: bool
    ) -> Reply:
        """A reply memory wrote by itself, stored like any reply (nothing learns from it)."""
        text = handled.reply or ""
        if on_text is not None and not handled.private:
            await on_text(text)
        reply_id = await self.store.add_reply(received, text=text, style=None, adapter_version=None, prompt=None)
        return Reply(text=text, chat_id=msg.chat_id, reply_id=reply_id, in_reply_to=msg.message_id,
                     private=handled.private, late=late)  # fmt: skip

    # --- messages answered later: left by a stopped process, or deferred -------------------

    async def unanswered(self, platform: str) -> list[Unanswered]:
        """The messages of ``platform`` that a process which stopped (a crash, a kill) had
        stored but not answered, or whose answer was deferred, now claimed by this one:
        answer each with :meth:`answer_unanswered`. A message is claimed once, so it is
        answered once."""
        return await self.store.claim_unanswered(platform, self.boot, before=self.started_at)

    async def next_deferred(self, platform: str) -> Unanswered | None:
        """The oldest message of ``platform`` whose answer was deferred (the model could not
        answer it), claimed by this process: answer it with :meth:`answer_unanswered`.
        ``self.deferred[platform]`` is set whenever one is deferred."""
        for i, missed in enumerate(self._claimed_again):
            if missed.platform == platform:
                return self._claimed_again.pop(i)
        return await self.store.claim_deferred(platform, self.boot)

    def try_again_later(self, missed: Unanswered) -> None:
        """Answering ``missed`` failed on the way (the database away): it is still this
        process's, and :meth:`next_deferred` gives it again."""
        self._claimed_again.append(missed)
        self.deferred[missed.platform].set()

    async def answer_unanswered(self, missed: Unanswered) -> Reply | None:
        """The late reply to a stored message: written now if it came within
        ``[run] answer_missed_within_s``, else a notice that it was not answered; if the model
        still cannot answer, it stays deferred and the apology is sent once. None: the sender
        is no longer allowed, or was told already."""
        msg = Message(platform=missed.platform, chat_id=missed.platform_chat_id, sender_id=missed.platform_user_id,
                      sender_name=missed.display_name, chat_kind="group" if missed.chat_kind == "group" else "private",
                      event_id=missed.event_id, text=missed.text, message_id=missed.platform_message_id)  # fmt: skip
        received = missed.received
        if not self.access.allows(msg.platform, msg.sender_id, msg.chat_id):
            await self.store.settle(received.message_id)
            return None
        if time.time() - missed.created_at > self.settings.run.answer_missed_within_s:
            await self.store.settle(received.message_id)
            return Reply(text=MISSED, chat_id=msg.chat_id, in_reply_to=msg.message_id, kind="notice", late=True)
        async with self.one_at_a_time.hold((msg.platform, msg.sender_id, msg.chat_id)):
            context, recalled, _ = await asyncio.gather(
                self._context(received.user_id, received.chat_id, before=missed.created_at),
                self.memory.recall(received.user_id, msg.text, msg.chat_kind),
                self.policy.prepare(received.user_id),
            )  # fmt: skip
            # the stopped process may have kept its notes already: keeping them again replaces them
            handled = await self.memory.take(received.user_id, msg.text, msg.chat_kind, now=missed.created_at)
            return await self._reply(msg, received, context, recalled, handled, None, late=True, told=missed.told)

    def _not_allowed(self, event: Message | Command) -> Reply | None:
        """Not on ``[access]``'s allowlists: a short answer in a private chat, silence elsewhere."""
        log.info("%s:%s in chat %s is not on the allowlist; ignored", event.platform, event.sender_id, event.chat_id)
        if event.chat_kind != "private":
            return None
        in_reply_to = event.message_id if isinstance(event, Message) else None
        return Reply(text=NOT_ALLOWED, chat_id=event.chat_id, in_reply_to=in_reply_to, kind="notice")

    def _refusal(self, msg: Message) -> str | None:
        if not msg.text.strip():
            return "I got an empty message."
        wait = self.limiter.retry_after((msg.platform, msg.sender_id))
        if wait:
            return f"You're writing faster than I can answer; please wait {math.ceil(wait)} s."
        wait = self.global_limiter.retry_after("all") if self.global_limiter else 0.0
        if wait:
            return f"I'm getting more messages than I can answer right now; please try again in {math.ceil(wait)} s."
        return None

    def _prompt(self, msg: Message, style: Style, context: ReplyContext, notes: list[str]) -> list[ChatMessage]:
        parts = PromptParts(
            system_prompt=self.settings.agent.system_prompt,
            user_name=msg.sender_name,
            style=style,
            notes=notes,
            turns=context.turns,
            text=msg.text,
            persona=context.preferences.get("persona", ""),
            language=context.preferences.get("language", ""),
        )
        budget = self.llm.context_window - self._reply_room()
        return build_prompt(parts, budget=budget, count=self.llm.count_tokens, overhead=self.llm.message_overhead)

    def _reply_room(self) -> int:
        """Tokens kept for the reply: as configured, but never more than half the context."""
        return min(self.settings.llm.max_new_tokens, self.llm.context_window // 2)

    async def _generate(
        self, prompt: list[ChatMessage], style: Style, adapter: AdapterRow | None, steering: Steering | None,
        on_text: OnText | None, start: str = "",
    ) -> str | None:  # fmt: skip
        """The model's reply, streamed to ``on_text``; None (and a log line) if it failed.
        ``start``: its first words, decided already (the model writes on from them).
        Raises :class:`LLMBusy` when the backend has no room for another request."""
        llm = self.settings.llm
        request = GenerationRequest(
            messages=prompt,
            max_new_tokens=token_budget(style, self._reply_room()),
            temperature=llm.temperature,
            top_p=llm.top_p,
            adapter=AdapterRef(adapter.name, adapter.path) if adapter else None,
            style=style,
            steering=steering,
            reply_start=start,
        )
        pieces: list[str] = [start] if start else []
        if start and on_text is not None:
            await on_text(start)
        try:
            async with asyncio.timeout(llm.timeout_s):
                async for piece in self.llm.stream(request):
                    pieces.append(piece)
                    if on_text is not None:
                        await on_text(piece)
        except TimeoutError:
            log.warning("the model took longer than %.0f s; the user got an apology", llm.timeout_s)
            return None
        except LLMBusy as exc:
            log.warning("the model is busy (%s); the user was asked to try again", exc)
            raise
        except LLMError as exc:
            log.warning("the model failed (%s); the user got an apology", exc)
            return None
        return finish("".join(pieces), style) or "…"

    # --- reactions, commands, delivery -------------------------------------------------------

    async def handle_reaction(self, reaction: Reaction) -> ReactionOutcome:
        """Store a reaction (or take one back) on one of the bot's replies."""
        reaction = well_formed(reaction)
        if not self.access.allows(reaction.platform, reaction.sender_id, reaction.chat_id):
            return ReactionOutcome(stored=False)
        try:
            return await self._react(reaction)
        except UNAVAILABLE as exc:  # a reaction has no reply to carry a refusal: the log says it was not stored
            _refused("a reaction", reaction, exc)
            return ReactionOutcome(stored=False)

    async def _react(self, reaction: Reaction) -> ReactionOutcome:
        claimed = reaction.event_id is None or await self.store.claim_event(
            reaction.platform, reaction.event_id, reaction.chat_id
        )
        if not claimed:
            return ReactionOutcome(stored=False)
        reply = await self.store.find_reply(reaction.platform, reaction.chat_id, reaction.message_id)
        if reply is None:
            log.debug("reaction on %s/%s: not one of my replies", reaction.chat_id, reaction.message_id)
            return ReactionOutcome(stored=False)
        user_id = await self.store.resolve_user(reaction.platform, reaction.sender_id, reaction.sender_name)
        emoji = normalize(reaction.emoji)
        if reaction.added:
            reward = self.rewards(emoji)
            stored = await self.store.add_reaction(reply.message_id, user_id, emoji, reward)
        else:
            taken_back = await self.store.remove_reaction(reply.message_id, user_id, emoji)
            stored, reward = taken_back is not None, -(taken_back or 0.0)
        trains = stored and user_id == reply.user_id
        if trains:  # from the very next reply on
            await self.policy.learn(user_id)
            await self.steering.learn(user_id)
        return ReactionOutcome(stored=stored, reward=reward, trains=trains)

    async def handle_command(self, command: Command) -> Reply | None:
        """Run a slash command; None if this event was already handled."""
        command = well_formed(command)
        if not self.access.allows(command.platform, command.sender_id, command.chat_id):
            return self._not_allowed(command)
        try:
            if command.event_id is not None and not await self.store.claim_event(
                command.platform, command.event_id, command.chat_id
            ):
                return None
            user_id = await self.store.resolve_user(command.platform, command.sender_id, command.sender_name)
            caller = Caller(user_id, command.platform, admin=self.access.is_admin(command.platform, command.sender_id))
            result = await self.commands.run(caller, command.name, command.args)
        except UNAVAILABLE as exc:
            _refused("a command", command, exc)
            return Reply(text=DATABASE_DOWN, chat_id=command.chat_id, kind="error")
        return Reply(
            text=result.text,
            chat_id=command.chat_id,
            private=result.private,
            attachment=result.attachment,
            kind="command",
        )

    async def delivered(self, reply: Reply, platform_message_id: str) -> None:
        """The connector sent ``reply`` and the platform gave it this id."""
        if reply.reply_id is not None:
            try:
                await self.store.set_platform_message_id(reply.reply_id, platform_message_id)
            except UNAVAILABLE as exc:  # the reply was sent; only a reaction on it will not find it
                log.warning("could not record the platform id of reply %d (%s)", reply.reply_id, exc)

    async def health(self) -> dict[str, Any]:
        """Whether the database and the model can be used now, for ``GET /healthz`` and the
        dashboard: ``{"ok": bool, "database": {"ok", "detail"}, "model": {"ok", "detail"}}``."""

        async def database() -> str | None:
            try:
                async with asyncio.timeout(3.0):
                    await self.store.db.ping()
            except (*UNAVAILABLE, TimeoutError) as exc:
                return f"{type(exc).__name__}: {exc}"
            return None

        async def model() -> str | None:
            loading = self.model_loading
            if loading is not None and not loading.done():
                return "loading"
            if loading is not None and loading.exception() is not None:
                return f"failed to load: {loading.exception()}"
            return await self.llm.unreachable()

        db_problem, model_problem = await asyncio.gather(database(), model())
        parts = {
            "database": {"ok": db_problem is None, "detail": db_problem or self.store.db.where},
            "model": {"ok": model_problem is None, "detail": model_problem or self.llm.describe()},
        }
        return {"ok": all(p["ok"] for p in parts.values()), **parts}

    async def history(self, platform: str, user: str, chat: str, name: str = "") -> list[dict[str, Any]]:
        """This person's last messages in this chat, oldest first, each reply with the emoji
        on it (the web chat shows them again on reload)."""
        user_id = await self.store.resolve_user(platform, user, name)
        return await self.store.history(user_id, await self.store.resolve_chat(platform, chat))

    async def set_display_name(self, platform: str, user: str, name: str) -> None:
        """The name a person chose for themselves (the web chat asks for one)."""
        await self.store.set_display_name(platform, user, name)


def _refused(what: str, event: Event, exc: Exception) -> None:
    """One line per refused event, no traceback; none during a database outage, which the
    engine logs once when it starts and once when it ends."""
    if isinstance(exc, Unavailable):
        log.debug("refused %s from %s:%s (%s)", what, event.platform, event.sender_id, exc)
    else:
        log.error("the database refused %s from %s:%s (%s)", what, event.platform, event.sender_id, exc)


def _event_fields(msg: Message) -> dict[str, Any]:
    return {f.name: getattr(msg, f.name) for f in fields(Event)}


def _draw_key(msg: Message, received: Received) -> int:
    """What names this message in the policy's random draws: the platform's own ids where
    it sends them, so that the same events give the same choices in every run, however
    concurrent messages happened to be stored; else its row id."""
    name = msg.event_id or msg.message_id
    if name is None:
        return received.message_id
    digest = hashlib.sha256(f"{msg.platform}\x00{msg.chat_id}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big")
